"""Retrieval benchmark readers (llm2clip/evaluation/retrieval_sets*.py) on tiny fixtures in each shipped layout."""

import base64
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from llm2clip.errors import ConfigError, DataError
from llm2clip.evaluation import retrieval_long_multilingual
from llm2clip.evaluation.base import RETRIEVAL, open_dataset


def image(path: Path, color: int = 0, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (color, 255 - color, 7)).save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def write_lines(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return path


def one(name: str, root: Path, strict: bool = False, **options):
    [evalset] = open_dataset(name, root, strict, **options)
    assert evalset.task == RETRIEVAL and evalset.name == name
    return evalset


def read(evalset) -> list[tuple[str, object, list[str]]]:
    return [(it.key, it.image, it.captions) for it in evalset.items()]


CAPS = [f"caption {i}" for i in range(6)]


def karpathy(root: Path, coco: bool, extra: list | None = None) -> None:
    sub = "val2014" if coco else "flickr30k-images"
    entries = [("a.jpg", "test", CAPS[:5]), ("b.jpg", "test", CAPS), ("c.jpg", "train", CAPS[:1])] + (extra or [])
    for i, (name, _, _) in enumerate(entries[:3]):
        image(root / sub / name, i * 40)
    rows = [{"filename": n, "split": s, "sentences": [{"raw": c, "tokens": []} for c in caps],
             **({"filepath": sub} if coco else {})} for n, s, caps in entries]
    write_json(root / ("dataset_coco.json" if coco else "dataset_flickr30k.json"), {"images": rows})


def test_flickr30k_karpathy_keeps_every_caption_and_takes_the_split(tmp_path):
    karpathy(tmp_path, coco=False)
    evalset = one("flickr30k", tmp_path)
    assert evalset.folds == 1 and evalset.size == 2 and evalset.language == "en"
    images = tmp_path / "flickr30k-images"
    assert read(evalset) == [("a.jpg", images / "a.jpg", CAPS[:5]), ("b.jpg", images / "b.jpg", CAPS)]
    assert read(evalset) == read(evalset) and evalset.stats.read == 2  # deterministic; a re-read resets the counts
    assert [k for k, _, _ in read(one("flickr30k", tmp_path, split="train"))] == ["c.jpg"]
    with pytest.raises(ConfigError, match="one of test, train"):
        one("flickr30k", tmp_path, split="restval")


def test_mscoco_karpathy_resolves_filepath_and_scores_five_folds(tmp_path):
    karpathy(tmp_path, coco=True)
    evalset = one("mscoco_captions", tmp_path)
    assert evalset.folds == 5
    assert read(evalset)[1] == ("b.jpg", tmp_path / "val2014" / "b.jpg", CAPS)


def test_blip_jsons_as_llm2clip_lays_them_out(tmp_path):
    flickr, coco = tmp_path / "flickr", tmp_path / "coco"
    image(flickr / "flickr30k-images" / "1.jpg")
    write_json(flickr / "flickr30k_test.json", [{"image": "flickr30k-images/1.jpg", "caption": CAPS[:5]}])
    assert read(one("flickr30k", flickr)) == [("1.jpg", flickr / "flickr30k-images" / "1.jpg", CAPS[:5])]
    image(coco / "images" / "val2014" / "COCO_val2014_1.jpg")  # LLM2CLIP's img_root: coco/images/
    write_json(coco / "annotations" / "coco_karpathy_test.json",
               [{"image": "val2014/COCO_val2014_1.jpg", "caption": CAPS}])
    [(key, path, caps)] = read(one("mscoco_captions", coco))
    assert key == "COCO_val2014_1.jpg" and path == coco / "images" / "val2014" / key and caps == CAPS


def test_clip_benchmark_annotation_files(tmp_path):
    coco, flickr = tmp_path / "coco", tmp_path / "flickr"
    for i in (1, 2):
        image(coco / "val2014" / f"COCO_val2014_{i}.jpg", i)
    write_json(coco / "coco_test_karpathy.json", {
        "images": [{"id": 2, "file_name": "COCO_val2014_2.jpg"}, {"id": 1, "file_name": "COCO_val2014_1.jpg"}],
        "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 2, "caption": "two"},
                        {"image_id": 1, "caption": "uno"}]})
    evalset = one("mscoco_captions", coco)
    assert evalset.folds == 5
    assert [(k, c) for k, _, c in read(evalset)] == [("COCO_val2014_1.jpg", ["one", "uno"]),
                                                      ("COCO_val2014_2.jpg", ["two"])]  # torchvision's id order
    image(flickr / "10.jpg")
    image(flickr / "9.jpg")
    (flickr / "flickr30k_test_karpathy.txt").write_text(
        "image,caption\n10.jpg,a dog, running\n9.jpg,a cat\n10.jpg,a dog\n", encoding="utf-8")
    assert read(one("flickr30k", flickr)) == [("10.jpg", flickr / "10.jpg", ["a dog, running", "a dog"]),
                                              ("9.jpg", flickr / "9.jpg", ["a cat"])]


def test_missing_image_and_empty_captions_are_counted_or_raise_under_strict(tmp_path):
    karpathy(tmp_path, coco=False, extra=[("gone.jpg", "test", CAPS[:2]), ("mute.jpg", "test", ["", "  "])])
    image(tmp_path / "flickr30k-images" / "mute.jpg")
    evalset = one("flickr30k", tmp_path)
    assert [k for k, _, _ in read(evalset)] == ["a.jpg", "b.jpg"]
    assert evalset.stats.counts == {"missing image file": 1, "empty caption": 1} and evalset.stats.read == 2
    with pytest.raises(DataError, match=r"missing image file: .*gone\.jpg does not exist"):
        read(one("flickr30k", tmp_path, strict=True))
    write_json(tmp_path / "dataset_flickr30k.json",
               {"images": [{"filename": "mute.jpg", "split": "test", "sentences": []}]})
    with pytest.raises(DataError, match="empty caption"):
        read(one("flickr30k", tmp_path, strict=True))


@pytest.mark.parametrize("name", ["flickr30k", "mscoco_captions", "urban1k", "docci", "sharegpt4v", "dci",
                                  "xm3600", "flickr30k-cn", "coco-cn", "wds/flickr30k"])
def test_an_unrecognised_layout_is_a_one_line_config_error(tmp_path, name):
    (tmp_path / "stray.txt").write_text("x")
    with pytest.raises(ConfigError, match="Fix: ") as e:
        open_dataset(name, tmp_path)
    assert "\n" not in str(e.value)


def test_unknown_options_are_rejected(tmp_path):
    karpathy(tmp_path, coco=False)
    with pytest.raises(ConfigError, match="unknown option"):
        open_dataset("flickr30k", tmp_path, splt="test")
    assert open_dataset("flickr30k", tmp_path, languages=["de"])  # --language only picks in multilingual sets


def test_urban1k_numeric_order_first_line_and_empty_caption_file(tmp_path):
    for stem, text in (("1", "first\nignored"), ("10", "ten"), ("2", "two"), ("3", "\n  \n")):
        image(tmp_path / "Urban1k" / "image" / f"{stem}.jpg", int(stem), "JPEG")
        write_lines(tmp_path / "Urban1k" / "caption" / f"{stem}.txt", [text])
    evalset = one("urban1k", tmp_path)
    assert [(k, c) for k, _, c in read(evalset)] == [("1.jpg", ["first"]), ("2.jpg", ["two"]), ("10.jpg", ["ten"])]
    assert evalset.stats.counts == {"empty caption": 1} and evalset.size == 4
    with pytest.raises(DataError, match=r"3\.txt: empty caption"):
        read(one("urban1k", tmp_path, strict=True))


def test_docci_test_split_long_descriptions(tmp_path):
    rows = [{"example_id": "t1", "split": "test", "image_file": "test_1.jpg", "description": "A long one."},
            {"example_id": "q1", "split": "qual_dev", "image_file": "qual_1.jpg", "description": "x"},
            "{not json", {"example_id": "t2", "split": "test", "image_file": "test_2.jpg", "description": "Two."}]
    write_lines(tmp_path / "docci_descriptions.jsonlines", rows)
    image(tmp_path / "images" / "test_1.jpg")
    image(tmp_path / "images" / "test_2.jpg")
    evalset = one("docci", tmp_path)
    assert read(evalset) == [("test_1.jpg", tmp_path / "images" / "test_1.jpg", ["A long one."]),
                             ("test_2.jpg", tmp_path / "images" / "test_2.jpg", ["Two."])]
    assert evalset.stats.counts == {"malformed json": 1}
    assert [k for k, _, _ in read(one("docci", tmp_path, split="qual_dev"))] == []  # counted as missing image file


def test_sharegpt4v_first_entries_of_the_share_captioner_json(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval_long_multilingual, "JSON_CHUNK", 7)  # refill mid-entry many times
    entries = [{"id": str(i), "image": f"{'coco/train2017' if i % 2 else 'sam/images'}/{i}.jpg",
                "conversations": [{"from": "human", "value": "<image>\nDescribe"},
                                  {"from": "gpt", "value": f"Line {i}.\nMore {i}."}]} for i in range(5)]
    for e in entries:
        image(tmp_path / e["image"])
    text = json.dumps(entries, indent=1)
    (tmp_path / retrieval_long_multilingual.SHARE4V).write_text(text[:-2] + ", {broken", encoding="utf-8")
    evalset = one("sharegpt4v", tmp_path, limit=3)  # the broken tail is never parsed
    assert read(evalset) == [(e["image"], tmp_path / e["image"], [f"Line {i}. More {i}."])
                             for i, e in enumerate(entries[:3])]
    (tmp_path / retrieval_long_multilingual.SHARE4V).unlink()
    write_json(tmp_path / "renamed.json", entries)  # any JSON list of {image, conversations}
    assert one("sharegpt4v", tmp_path).size == 5  # limit 1000 by default
    with pytest.raises(ConfigError, match="limit"):
        open_dataset("sharegpt4v", tmp_path, limit=-1)


def test_dci_all_splits_with_short_and_extra_caption(tmp_path):
    base = tmp_path / "densely_captioned_images"
    write_json(base / "splits.json", {"train": ["b.json"], "valid": [], "test": ["a.json", "lost.json"]})
    write_json(base / "annotations" / "a.json", {"image": "sa_1.jpg", "short_caption": "A dog",
                                                 "extra_caption": "It is brown.\nA ball.", "mask_data": {}})
    write_json(base / "annotations" / "b.json", {"image": "sa_2.jpg", "short_caption": "A cat.", "extra_caption": ""})
    image(base / "photos" / "sa_1.jpg")
    image(base / "photos" / "sa_2.jpg")
    evalset = one("dci", tmp_path)
    assert read(evalset) == [("sa_2.jpg", base / "photos" / "sa_2.jpg", ["A cat."]),
                             ("sa_1.jpg", base / "photos" / "sa_1.jpg", ["A dog. It is brown. A ball."])]
    assert evalset.stats.counts == {"missing annotation file": 1} and evalset.size == 3
    assert [k for k, _, _ in read(one("dci", base, split="test"))] == ["sa_1.jpg"]


def test_xm3600_one_set_per_language(tmp_path):
    lines = [{"image/key": k, "image/locale": "en",
              **{lang: {"caption": [f"{lang} {k} {j}" for j in range(2)], "caption/tokenized": []}
                 for lang in ("en", "de", "zh")}} for k in ("aa", "bb", "cc")]
    write_lines(tmp_path / "captions.jsonl", lines)
    image(tmp_path / "images" / "aa.jpg")
    image(tmp_path / "images" / "bb.jpg")  # cc.jpg missing
    sets = open_dataset("xm3600", tmp_path)
    assert [s.language for s in sets] == ["de", "en", "zh"]
    assert read(sets[0]) == [("aa", tmp_path / "images" / "aa.jpg", ["de aa 0"]),
                             ("bb", tmp_path / "images" / "bb.jpg", ["de bb 0"])]  # CLIP_benchmark: first caption
    assert all(s.stats.counts == {"missing image file": 1} for s in sets if read(s))
    picked = open_dataset("xm3600", tmp_path, languages="zh, en", captions="all")
    assert [s.language for s in picked] == ["zh", "en"] and read(picked[1])[0][2] == ["en aa 0", "en aa 1"]
    with pytest.raises(ConfigError, match="fr"):
        open_dataset("xm3600", tmp_path, languages=["fr"])


def test_chinese_clip_tsv_streams_base64_images(tmp_path):
    base = tmp_path / "COCO-CN"
    raw = {i: image(tmp_path / "src" / f"{i}.png", i * 60) for i in (11, 12, 13)}
    tsv = [f"{i}\t{base64.urlsafe_b64encode(raw[i]).decode()}" for i in (11, 12)]
    write_lines(base / "test_imgs.tsv", [*tsv, f"13\t{base64.b64encode(raw[13]).decode()}", "14\t@@@", "15"])
    write_lines(base / "test_texts.jsonl", [{"text_id": 1, "text": "一只狗", "image_ids": [11]},
                                            {"text_id": 2, "text": "一只猫", "image_ids": [11, 99]},
                                            {"text_id": 3, "text": "汽车", "image_ids": [12]},
                                            {"text_id": 4, "text": "坏", "image_ids": [14]}])
    evalset = one("coco-cn", tmp_path)
    assert evalset.language == "zh"
    assert read(evalset) == [("11", raw[11], ["一只狗", "一只猫"]), ("12", raw[12], ["汽车"])]
    assert evalset.stats.counts == {"empty caption": 1, "unreadable image": 1, "malformed row": 1, "missing image": 1}
    with pytest.raises(DataError, match=r"test_imgs\.tsv:3: empty caption"):
        read(one("coco-cn", tmp_path, strict=True))


def shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def wds_export(root: Path) -> dict[str, bytes]:
    raw = {k: image(root / "src" / f"{k}.png", i * 50) for i, k in enumerate(("s0", "s1", "s2"))}
    (root / "dataset_type.txt").write_text("retrieval\n")
    shard(root / "test" / "0.tar", [("s0", {"webp": raw["s0"], "txt": b"one\n\nuno\n"}),
                                    ("s1", {"png": raw["s1"], "txt": b"two"})])
    shard(root / "test" / "1.tar", [("s2", {"jpg": raw["s2"], "txt": b"three\nthree"})])
    (root / "test" / "nshards.txt").write_text("2\n")
    return raw


def test_wds_retrieval_export(tmp_path):
    raw = wds_export(tmp_path)
    evalset = one("wds/mscoco_captions", tmp_path)
    assert evalset.folds == 5
    assert read(evalset) == [("s0", raw["s0"], ["one", "uno"]), ("s1", raw["s1"], ["two"]),
                             ("s2", raw["s2"], ["three", "three"])]
    assert one("wds/flickr30k", tmp_path).folds == 1


@pytest.mark.parametrize("cut", [1200, 1540, 2048])  # in a header, in a member's data, at a member boundary
def test_wds_truncated_shard_is_counted_not_a_crash(tmp_path, cut):
    wds_export(tmp_path)
    data = (tmp_path / "test" / "0.tar").read_bytes()
    (tmp_path / "test" / "0.tar").write_bytes(data[:cut])  # s0's .txt (the second member) is cut or lost
    evalset = one("wds/flickr30k", tmp_path)
    assert [k for k, _, _ in read(evalset)] == ["s2"]  # s0, maybe incomplete, is dropped with the shard
    assert evalset.stats.counts == {"corrupt shard": 1}
    with pytest.raises(DataError, match="corrupt shard"):
        read(one("wds/flickr30k", tmp_path, strict=True))


def test_wds_classification_export_goes_to_the_classification_reader(tmp_path, monkeypatch):
    from llm2clip.evaluation import classification

    calls = []
    monkeypatch.setattr(classification, "open_wds_classification", lambda *a: calls.append(a) or ["sets"])
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    assert open_dataset("wds/cars", tmp_path, split="test") == ["sets"]
    assert calls == [(tmp_path, False, "wds/cars", "test")]
    (tmp_path / "classnames.txt").unlink()
    shard(tmp_path / "test" / "0.tar", [("s0", {"webp": b"x", "cls": b"1"})])
    with pytest.raises(ConfigError, match=r"classnames\.txt"):
        open_dataset("wds/cars", tmp_path)
