import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llm2clip.data.lexicon import COLOR_ZH, SHAPE_ZH, plural_en
from llm2clip.data.render import render_scene
from llm2clip.data.synth import SPLITS, SynthConfig, synthesize
from llm2clip.data.world import COLORS, SHAPES, Scene, sample_scene
from llm2clip.errors import ConfigError


def _rows(world: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (world / f"{split}.jsonl").read_text().splitlines()]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    cfg = SynthConfig(num_images=24, image_size=32, shard_size=8)
    a = _tree_bytes(Path(synthesize(cfg, tmp_path / "a", progress=False) and tmp_path / "a"))
    b = _tree_bytes(Path(synthesize(cfg, tmp_path / "b", progress=False) and tmp_path / "b"))
    assert a.keys() == b.keys() and len(a) > 24 * 3
    assert [k for k in a if a[k] != b[k]] == []
    cfg.seed = 1
    synthesize(cfg, tmp_path / "c", progress=False)
    c = _tree_bytes(tmp_path / "c")
    assert a["train.jsonl"] != c["train.jsonl"]


def test_splits_are_disjoint_and_sized(world):
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["splits"] == SynthConfig(num_images=60).split_sizes() == {"train": 48, "val": 6, "test": 6}
    keys, scenes = {}, {}
    for split in SPLITS:
        rows = _rows(world, split)
        assert len(rows) == manifest["splits"][split]
        keys[split] = {r["key"] for r in rows}
        scenes[split] = {Scene.from_dict(r["attributes"]).signature() for r in rows}
    for s1, s2 in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not keys[s1] & keys[s2]
        assert not scenes[s1] & scenes[s2]


def test_split_counts_override_fractions_and_keep_train_and_val_in_place():
    sizes = SynthConfig(num_images=4800, val_fraction=0.05, test_fraction=0.05, val_images=200,
                        test_images=1000).split_sizes()
    assert sizes == {"train": 3600, "val": 200, "test": 1000}
    with pytest.raises(ConfigError, match="val and test take all 10 images"):
        SynthConfig(num_images=10, val_images=4, test_images=6).validate()


def test_caption_lengths_with_the_trained_tokenizer(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world / "tokenizer")

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rows = [r for s in SPLITS for r in _rows(world, s)]
    longs = [n_tokens(r[c]) for r in rows for c in ("long_caption", "long_caption_2", "long_caption_zh")]
    assert np.mean([n > 77 for n in longs]) >= 0.8
    shorts = [n_tokens(r[c]) for r in rows for c in ("short_caption", "short_caption_zh")]
    assert max(shorts) < 20
    assert all(5 <= len(r["short_caption"].split()) <= 15 for r in rows)


def test_long_captions_describe_every_object_short_ones_the_salient(world):
    for r in _rows(world, "train"):
        scene = Scene.from_dict(r["attributes"])
        for text in (r["long_caption"], r["long_caption_2"]):
            for o in scene.objects:
                assert f"{o.color} {o.shape}" in text
        assert r["long_caption"] != r["long_caption_2"] or len(scene.objects) == 1
        for o in scene.objects:
            assert COLOR_ZH[o.color] + SHAPE_ZH[o.shape] in r["long_caption_zh"]
        top = scene.by_salience()[0]
        assert f"{top.color} {top.shape}" in r["short_caption"]


def test_pixels_match_attributes(world):
    """The centre pixel of each solid object has the object's colour; the background elsewhere."""
    checked = 0
    for r in _rows(world, "train"):
        scene = Scene.from_dict(r["attributes"])
        image = np.asarray(Image.open(world / r["image"]).convert("RGB")).astype(int)
        cell = image.shape[0] / 3
        for o in scene.objects:
            if o.style != "solid":
                continue
            y, x = int((o.row + 0.5) * cell), int((o.col + 0.5) * cell)
            assert np.abs(image[y, x] - COLORS[o.color]).max() < 40, (r["key"], o)
            checked += 1
    assert checked > 50


def test_render_sizes_are_configurable():
    scene = sample_scene(random.Random(0))
    assert render_scene(scene, 224).size == (224, 224)
    assert render_scene(scene, 64).size == (64, 64)


def test_llava_files_follow_llava_format_and_answers_are_true(world):
    rows = {r["key"]: r for r in _rows(world, "train")}
    pretrain = json.loads((world / "llava/train_pretrain.json").read_text())
    assert len(pretrain) == len(rows)
    for s in pretrain:
        human, gpt = s["conversations"]
        assert human["from"] == "human" and "<image>" in human["value"] and gpt["from"] == "gpt"
        assert gpt["value"] == rows[s["id"]]["short_caption"]
        assert (world / s["image"]).is_file()
    instruct = json.loads((world / "llava/train_instruct.json").read_text())
    n_checked = 0
    for s in instruct:
        turns = s["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in turns) == 1
        scene = Scene.from_dict(rows[s["id"].removesuffix("-detail")]["attributes"])
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            q = q["value"].removeprefix("<image>\n")
            if m := re.match(r"Is there a (\w+) (\w+) in the image\?", q):
                present = any((o.color, o.shape) == m.groups() for o in scene.objects)
                assert a["value"] == ("Yes." if present else "No.")
                n_checked += 1
            elif m := re.match(r"How many (\w+) are there", q):
                shape = next(sh for sh in SHAPES if plural_en(sh, 2) == m.group(1))
                n = sum(o.shape == shape for o in scene.objects)
                expected = {0: "no", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}[n]
                assert a["value"].split()[2] == expected, (q, a["value"], n)
                n_checked += 1
    assert n_checked >= 2 * len(rows)  # each image's Q&A conversation asks a count and a yes/no question


def test_corpus_and_tokenizer(world):
    from transformers import AutoTokenizer

    corpus = (world / "corpus.txt").read_text(encoding="utf-8")
    assert "A hexagon has six sides and six corners." in corpus
    assert "The word red is 红色 in Chinese." in corpus
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    text = "a large striped red circle 一个大的红色圆形"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.pad_token and tok.eos_token and tok.mask_token is None  # like Llama: no mask token


def test_existing_dataset_is_reused_or_refused(tmp_path):
    cfg = SynthConfig(num_images=6, image_size=16)
    first = synthesize(cfg, tmp_path / "d", progress=False)
    stamp = (tmp_path / "d/train.jsonl").stat().st_mtime_ns
    assert synthesize(cfg, tmp_path / "d", progress=False) == first
    assert (tmp_path / "d/train.jsonl").stat().st_mtime_ns == stamp  # reused, not rewritten
    cfg.seed = 5
    with pytest.raises(FileExistsError, match="--overwrite"):
        synthesize(cfg, tmp_path / "d", progress=False)
    synthesize(cfg, tmp_path / "d", overwrite=True, progress=False)
    assert not (tmp_path / "d.partial").exists()


def test_text_images_limits_the_llm_text_to_the_first_train_rows(tmp_path, world):
    cfg = SynthConfig(num_images=60, image_size=32, shard_size=16, text_images=10)
    synthesize(cfg, tmp_path / "t", progress=False)
    t, train = tmp_path / "t", _rows(world, "train")  # `world` is the same config without text_images
    assert _rows(t, "train") == train  # stage 2 still trains on every train image
    assert _rows(t, "stage1_train") == train[:10] and _rows(world, "stage1_train") == train
    corpus = set((t / "corpus.txt").read_text(encoding="utf-8").splitlines())
    assert train[9]["long_caption"] in corpus and train[10]["long_caption"] not in corpus
    sources = {json.loads(line)["source"] for line in (t / "parallel.jsonl").read_text().splitlines()}
    assert train[9]["short_caption"] in sources and train[10]["long_caption"] not in sources
    with pytest.raises(ConfigError, match=r"synth\.text_images must be null or between 1 and the 48"):
        SynthConfig(num_images=60, text_images=49).validate()


def test_synonymize_swaps_every_world_word_and_keeps_capitals():
    from llm2clip.data.lexicon import SYNONYM_EN, synonymize

    text = "Large red circle on a gray background; the picture shows shapes, a reddish bigger one too."
    assert synonymize(text) == ("Big scarlet circle on a slate backdrop; the drawing shows figures, "
                                "a reddish bigger one too.")  # whole words only
    assert synonymize(text, random.Random(0), p=0.0) == text
    assert 70 < synonymize("red " * 200, random.Random(1), p=0.5).split().count("scarlet") < 130
    assert len(set(SYNONYM_EN.values())) == len(SYNONYM_EN)  # one world word per synonym


def test_synonyms_reach_only_the_llm_corpus(tmp_path, world):
    """synth.synonyms adds synonym lines to the corpus (and so the tokenizer); no caption uses a synonym,
    and a default dataset's manifest is unchanged, so one written before the key is reused."""
    from llm2clip.data.lexicon import SYNONYM_EN

    synonyms = re.compile(r"\b(" + "|".join(SYNONYM_EN.values()) + r")\b")
    corpus = (world / "corpus.txt").read_text(encoding="utf-8")
    assert not synonyms.search(corpus)
    assert "synonyms" not in json.loads((world / "manifest.json").read_text())["config"]
    cfg = SynthConfig(num_images=60, image_size=32, shard_size=16, synonyms=0.5)
    manifest = synthesize(cfg, tmp_path / "s", progress=False)
    assert manifest["config"]["synonyms"] == 0.5
    for split in (*SPLITS, "stage1_train"):
        rows = _rows(tmp_path / "s", split)
        assert rows == _rows(world, split)  # images, captions and attributes as without synonyms
        assert not any(synonyms.search(json.dumps(r)) for r in rows)
    lines = (tmp_path / "s/corpus.txt").read_text(encoding="utf-8").splitlines()
    assert "Scarlet means red." in lines and set(corpus.splitlines()) <= set(lines)
    swapped = [line for line in lines if synonyms.search(line)]
    assert len(swapped) > 2 * 48 * 0.9  # the synonym sentences, then a copy of most train captions
    with pytest.raises(ConfigError, match=r"synth\.code_switch and synth\.synonyms are shares"):
        SynthConfig(synonyms=1.5).validate()
