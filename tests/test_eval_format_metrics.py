"""Every benchmark layout end to end: `open_dataset` + `evaluate_set` give the metrics a brute-force reference
computes from the generated ground truth. A toy model: an image's feature is its normalised mean RGB (solid PNG
colours, exact; PIL sniffs content, so .jpg names are fine), a caption's the RGB triple it names, a class prompt's
its class's colour plus a per-prompt jitter (so ensembling matters). Captions blend their image's colour toward
another image's, so rankings are imperfect."""

from __future__ import annotations

import base64
import json
import random
import zlib
from functools import partial
from pathlib import Path

import pytest

from llm2clip.evaluation.base import open_dataset
from llm2clip.evaluation.classification import imagenet_classnames, imagenet_wnids, openai_templates
from llm2clip.evaluation.protocols import EvalOptions, evaluate_set
from tests.eval_toy import (
    CLASSNAMES,
    FOLDERS,
    IMAGENET,
    OPTIONS,
    PALETTE,
    TEMPLATES,
    ToyModel,
    blend,
    captions,
    check,
    classification_reference,
    colours,
    dump,
    nontrivial,
    png,
    put,
    put_shards,
    recall_reference,
    retrieval_reference,
    truth,
)

# -- retrieval layouts: write `rows` (colour, captions), return (dataset, options, rows in the reader's order) --

def put_rows(rows, path) -> None:
    for i, (c, _) in enumerate(rows):
        put(path(i), c)


def karpathy(root, rows, coco=False):  # Karpathy's dataset_*.json: file order; other splits are not scored
    folder = "val2014" if coco else "flickr30k-images"
    put_rows(rows, lambda i: root / folder / f"{i:012d}.jpg")
    put(root / folder / "x.jpg", (128, 128, 128))
    images = [{"filename": f"{i:012d}.jpg", "split": "test", "sentences": [{"raw": t, "tokens": []} for t in caps],
               **({"filepath": "val2014"} if coco else {})} for i, (_, caps) in enumerate(rows)]
    images.insert(3, {"filepath": folder, "filename": "x.jpg", "split": "restval", "sentences": [{"raw": "8 8 8"}]})
    dump(root / ("dataset_coco.json" if coco else "dataset_flickr30k.json"), {"images": images})
    return ("mscoco_captions" if coco else "flickr30k"), {}, rows


def blip(root, rows, coco=False):  # BLIP's / LLM2CLIP's json, paths relative to the dataset folder
    folder = "images/val2014" if coco else "flickr30k-images"
    put_rows(rows, lambda i: root / folder / f"{i}.jpg")
    dump(root / ("annotations/coco_karpathy_test.json" if coco else "flickr30k_test.json"),
         [{"image": f"{folder.removeprefix('images/')}/{i}.jpg", "caption": caps} for i, (_, caps) in enumerate(rows)])
    return ("mscoco_captions" if coco else "flickr30k"), {}, rows


def flickr_txt(root, rows):  # CLIP_benchmark's file: one 'name.jpg,caption' line per caption, interleaved
    put_rows(rows, lambda i: root / f"{i}.jpg")
    lines = [f"{i}.jpg,{caps[j]}" for j in range(3) for i, (_, caps) in enumerate(rows) if j < len(caps)]
    put(root / "flickr30k_test_karpathy.txt", "\n".join(["image,caption", *lines]) + "\n")
    return "flickr30k", {}, rows


def coco_format(root, rows):  # CLIP_benchmark's coco_test_karpathy.json: images scored in id order
    ids = random.Random(1).sample(range(100, 999), len(rows))
    put_rows(rows, lambda i: root / "val2014" / f"COCO_val2014_{ids[i]:012d}.jpg")
    anns = [{"image_id": i, "caption": t} for i, (_, caps) in zip(ids, rows, strict=True) for t in caps]
    random.Random(2).shuffle(anns)
    dump(root / "coco_test_karpathy.json", {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"}
                                                       for i in ids], "annotations": anns})
    return "mscoco_captions", {}, [row for _, row in sorted(zip(ids, rows, strict=True))]


def wds(root, rows, name):  # clip_benchmark_export_wds: 2 shards, captions one per line in <key>.txt
    put(root / "dataset_type.txt", b"retrieval\n")
    members = [[(f"k{i}.{('png', 'jpg', 'webp')[i % 3]}", png(c)), (f"k{i}.txt", "\n".join(caps).encode())]
               for i, (c, caps) in enumerate(rows)]
    put_shards(root, members)
    return name, {}, rows


def urban1k(root, rows):  # the caption is the file's first line
    put_rows(rows, lambda i: root / "Urban1k" / "image" / f"{i + 1}.jpg")
    for i, (_, caps) in enumerate(rows):
        put(root / "Urban1k" / "caption" / f"{i + 1}.txt", f"{caps[0]}\ncolour 9 9 200 is not read\n")
    return "urban1k", {}, rows


def docci(root, rows):  # the test split of docci_descriptions.jsonlines
    put_rows(rows, lambda i: root / "images" / f"test_{i:05d}.jpg")
    put(root / "images" / "train_00000.jpg", (128, 128, 128))
    lines = [{"example_id": f"test_{i}", "split": "test", "image_file": f"test_{i:05d}.jpg", "description": caps[0]}
             for i, (_, caps) in enumerate(rows)]
    lines.insert(2, {"split": "train", "image_file": "train_00000.jpg", "description": "colour 128 128 128"})
    dump(root / "docci_descriptions.jsonlines", lines, lines=True)
    return "docci", {}, rows


def sharegpt4v(root, rows):  # only the first `limit` entries are scored; caption = the gpt turn
    entries = []
    for i, (c, caps) in enumerate([*rows, ((128, 128, 128), ["colour 128 128 128"])]):
        image = f"coco/train2017/{i:012d}.jpg" if i % 2 else f"sam/images/sa_{i}.jpg"
        put(root / image, c)
        entries.append({"id": str(i), "image": image, "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"{caps[0]}.\nPlain."}]})
    dump(root / "share-captioner_coco_lcs_sam_1246k_1107.json", entries)
    return "sharegpt4v", {"limit": len(rows)}, rows


def dci(root, rows):  # every split in splits.json order; caption = short_caption + extra_caption
    base, files = root / "densely_captioned_images", [f"{i}.json" for i in range(len(rows))]
    dump(base / "splits.json", {"train": files[6:], "valid": files[4:6], "test": files[:4]})
    put_rows(rows, lambda i: base / "photos" / f"sa_{i}.jpg")
    for i, (_, caps) in enumerate(rows):
        dump(base / "annotations" / files[i], {"image": f"sa_{i}.jpg", "short_caption": caps[0],
                                               "extra_caption": "It is plain.\nNothing else", "mask_data": {}})
    return "dci", {}, rows[6:] + rows[4:6] + rows[:4]


def chinese(root, rows, extra=(), bad=False):  # Chinese-CLIP's base64 images in a tsv, texts naming image ids
    base = root / "Flickr30k-CN"
    texts = [(t.replace("colour", "颜色"), [i]) for i, (_, caps) in enumerate(rows) for t in caps]
    random.Random(0).shuffle(texts)
    tsv = [f"{1000 + 7 * i}\t{base64.urlsafe_b64encode(png(c)).decode()}" for i, (c, _) in enumerate(rows)]
    lines = [{"text_id": n, "text": t, "image_ids": [1000 + 7 * i for i in ids]}
             for n, (t, ids) in enumerate([*texts, *extra])]
    if bad:  # an image that does not decode; a text naming an image the tsv lacks
        tsv.insert(3, f"5\t{base64.b64encode(b'not an image').decode()}")
        lines += [{"text_id": 98, "text": "颜色 1 2 3", "image_ids": [5]},
                  {"text_id": 99, "text": "颜色 7 8 9", "image_ids": [9]}]
    put(base / "test_imgs.tsv", "\n".join(tsv) + "\n")
    dump(base / "test_texts.jsonl", lines, lines=True)
    return "flickr30k-cn", {}, rows


LAYOUTS = {"flickr30k-karpathy": karpathy, "flickr30k-blip": blip, "flickr30k-clip_benchmark": flickr_txt,
           "mscoco-karpathy": partial(karpathy, coco=True), "mscoco-blip": partial(blip, coco=True),
           "mscoco-coco_format": coco_format, "wds-flickr30k": partial(wds, name="wds/flickr30k"),
           "wds-mscoco": partial(wds, name="wds/mscoco_captions"), "urban1k": urban1k, "docci": docci,
           "sharegpt4v": sharegpt4v, "dci": dci, "flickr30k-cn": chinese}
SINGLE_CAPTION = ("urban1k", "docci", "sharegpt4v", "dci")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_retrieval_layout_matches_brute_force(tmp_path, layout):
    rows = truth(zlib.crc32(layout.encode()), 1 if layout in SINGLE_CAPTION else 3)
    assert layout in SINGLE_CAPTION or max(len(caps) for _, caps in rows) > 1  # some images have several captions
    name, options, ordered = LAYOUTS[layout](tmp_path, rows)
    [evalset] = open_dataset(name, tmp_path, **options)
    got = evaluate_set(ToyModel(), evalset, OPTIONS)
    want = retrieval_reference(ordered, evalset.folds)
    check(got, want)
    nontrivial(want[""])
    assert evalset.folds == (5 if name.endswith("mscoco_captions") else 1) and evalset.stats.read == len(rows)
    if ordered != rows and evalset.folds > 1:  # the folds follow the reader's order, not the file's
        assert retrieval_reference(rows, 5)["1k"] != want["1k"]


def test_retrieval_skips_are_excluded_and_coco_1k_is_withheld(tmp_path, capsys):
    rows = truth(11)
    karpathy(tmp_path, rows, coco=True)
    data = json.loads((tmp_path / "dataset_coco.json").read_text())
    put(tmp_path / "val2014" / "broken.jpg", b"not an image")  # counted by the protocol when it fails to decode
    put(tmp_path / "val2014" / "mute.jpg", (9, 9, 200))
    for at, file, raw in ((0, "gone.jpg", "colour 10 200 10"), (6, "broken.jpg", "colour 1 2 3"), (20, "mute.jpg", "")):
        data["images"].insert(at, {"filepath": "val2014", "filename": file, "split": "test",
                                   "sentences": [{"raw": raw}]})
    dump(tmp_path / "dataset_coco.json", data)
    [evalset] = open_dataset("mscoco_captions", tmp_path)
    # the survivors are scored; 1k is withheld: a skipped image would shift every later fold's boundary
    check(evaluate_set(ToyModel(), evalset, OPTIONS), {"": retrieval_reference(rows)[""]})
    assert "1k folds not scored: 3 images were skipped" in capsys.readouterr().err
    assert evalset.stats.counts == {"missing image file": 1, "unreadable image": 1, "empty caption": 1}
    assert evalset.stats.read == 10


def xm3600_layout(root: Path, cols, caps: dict[str, list[list[str]]], extra: list | None = None) -> None:
    lines = []
    for i, c in enumerate(cols):
        put(root / "images" / f"{i:016x}.jpg", c)
        lines.append({"image/key": f"{i:016x}", "image/locale": "en",
                      **{lang: {"caption": caps[lang][i], "caption/tokenized": caps[lang][i]} for lang in caps}})
    dump(root / "captions.jsonl", lines + (extra or []), lines=True)


@pytest.mark.parametrize("mode", ["first", "all"])
def test_xm3600_each_language_matches_brute_force(tmp_path, mode):
    rng = random.Random(7)
    cols = colours(rng, 10)  # the same images; German captions blend further toward other images
    caps = {"en": captions(rng, cols, (2, 3), (0.0, 0.6)), "de": captions(rng, cols, (2, 3), (0.3, 0.8), "Farbe")}
    xm3600_layout(tmp_path, cols, caps)
    sets = open_dataset("xm3600", tmp_path, captions=mode)
    assert [s.language for s in sets] == ["de", "en"]
    got = {}
    for s in sets:
        rows = [(c, cs[:1] if mode == "first" else cs) for c, cs in zip(cols, caps[s.language], strict=True)]
        got[s.language] = evaluate_set(ToyModel(), s, OPTIONS)
        want = retrieval_reference(rows)
        check(got[s.language], want)
        nontrivial(want[""])
    assert got["de"] != got["en"]


def test_flickr30k_cn_text_naming_several_images_is_one_query(tmp_path):
    """As Chinese-CLIP's evaluation.py: such a text is one text->image query, a hit when any of its images is in
    the top k, and one candidate (a positive of each of its images) for image->text."""
    rows = truth(3)
    mix = blend(rows[2][0], rows[5][0], 0.5)
    chinese(tmp_path, rows, extra=[(f"颜色 {mix[0]} {mix[1]} {mix[2]} 两张图", [2, 5])])
    [evalset] = open_dataset("flickr30k-cn", tmp_path)
    texts = [(t, {i}) for i, (_, caps) in enumerate(rows) for t in caps] + [(f"{mix[0]} {mix[1]} {mix[2]}", {2, 5})]
    check(evaluate_set(ToyModel(), evalset, OPTIONS), {"": recall_reference([c for c, _ in rows], texts)})


def test_multilingual_skips_are_excluded(tmp_path):
    rows = truth(5)
    xm3600_layout(tmp_path / "xm", [c for c, _ in rows], {"en": [caps for _, caps in rows]},
                  extra=[{"image/key": "gone", "en": {"caption": ["colour 1 2 3"]}}])  # no images/gone.jpg
    with open(tmp_path / "xm" / "captions.jsonl", "a", encoding="utf-8") as f:
        f.write('{"image/key": broken\n')
    [evalset] = open_dataset("xm3600", tmp_path / "xm", languages="en", captions="all")
    check(evaluate_set(ToyModel(), evalset, OPTIONS), retrieval_reference(rows))
    assert evalset.stats.counts == {"missing image file": 1, "malformed json": 1} and evalset.stats.read == 10
    chinese(tmp_path / "cn", rows, bad=True)
    [evalset] = open_dataset("flickr30k-cn", tmp_path / "cn")
    check(evaluate_set(ToyModel(), evalset, OPTIONS), retrieval_reference(rows))
    assert evalset.stats.counts == {"unreadable image": 1, "missing image": 1} and evalset.stats.read == 10


# -- classification layouts: write `items` (colour, palette class), return (name, options, the model's
#    class colours, classnames, templates, items with the dataset's labels, skips expected when `bad`) ---

def imagenet(root, items, bad):  # a subset of wnid folders, scored against all 1,000 classes
    wnids, index, names = list(IMAGENET), imagenet_wnids(), imagenet_classnames()
    assert all(names[index.index(w)] == name for w, name in IMAGENET.items())  # the real ImageNet names
    for n, (c, k) in enumerate([*items, *([(b"not an image", 2)] if bad else [])]):
        put(root / "val" / wnids[k] / f"ILSVRC2012_val_{n:08d}.JPEG", c)
    return ("imagenet1k", {}, tuple(zip(IMAGENET.values(), PALETTE, strict=True)), names, openai_templates(),
            [(c, index.index(wnids[k])) for c, k in items], {"unreadable image": 1})


def imagefolder(root, items, bad):  # class names = sorted folder names, '_' read as a space
    for n, (c, k) in enumerate([*items, *([(b"not an image", 0)] if bad else [])]):
        put(root / "test" / FOLDERS[k] / f"{n}.png", c)
    return ("imagefolder", {"split": "test", "templates": TEMPLATES}, tuple(zip(CLASSNAMES, PALETTE, strict=True)),
            CLASSNAMES, TEMPLATES, items, {"unreadable image": 1})


def wds_classification(root, items, bad):  # classnames.txt, templates file, <key>.cls beside the image
    put(root / "classnames.txt", "\n".join(CLASSNAMES) + "\n")
    put(root / "zeroshot_classification_templates.txt", "\n".join(TEMPLATES) + "\n")
    samples = [[(f"{n:04d}.{('png', 'jpg', 'webp')[n % 3]}", png(c)), (f"{n:04d}.cls", f"{k}\n".encode())]
               for n, (c, k) in enumerate(items)]
    if bad:
        samples[2:2] = [[("x1.png", png((9, 9, 9))), ("x1.cls", b"6")], [("x2.cls", b"1")],
                        [("x3.webp", b"not an image"), ("x3.cls", b"2")]]
    put_shards(root, samples)
    return ("wds/toy", {}, tuple(zip(CLASSNAMES, PALETTE, strict=True)), CLASSNAMES, TEMPLATES, items,
            {"bad class index": 1, "missing image": 1, "unreadable image": 1})


CLASSIFICATION_LAYOUTS = {"imagenet1k": imagenet, "imagefolder": imagefolder, "wds": wds_classification}


def class_items(rng: random.Random) -> list[tuple[tuple, int]]:
    """Unequal classes, each image its class's colour pulled toward another class's by up to 0.7, and one
    red-class image coloured cyan, where its class ranks last (outside the top 5)."""
    return [*[(blend(PALETTE[k], PALETTE[rng.randrange(6)], rng.uniform(0, 0.7)), k)
              for k, count in enumerate([3, 2, 4, 2, 3, 2]) for _ in range(count)], ((40, 190, 200), 0)]


@pytest.mark.parametrize("bad", [False, True], ids=["clean", "skips"])
@pytest.mark.parametrize("layout", list(CLASSIFICATION_LAYOUTS))
def test_classification_layout_matches_brute_force(tmp_path, layout, bad):
    items = class_items(random.Random(4))
    write = CLASSIFICATION_LAYOUTS[layout]
    name, options, classes, classnames, templates, labelled, skips = write(tmp_path, items, bad)
    [evalset] = open_dataset(name, tmp_path, **options)
    assert evalset.classnames == classnames and evalset.templates == templates
    options = EvalOptions(batch_size=8 if len(classnames) < 10 else 2000, progress=False)  # 80k ImageNet prompts
    want = classification_reference(labelled, classnames, templates, classes)
    check(evaluate_set(ToyModel(classes), evalset, options), {"": want})
    assert 0 < want["acc1"] < want["acc5"] < 1 and want["mean_per_class_recall"] != want["acc1"]
    assert evalset.stats.counts == (skips if bad else {}) and evalset.stats.read == len(items)
