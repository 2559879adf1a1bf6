"""The shapes world's LLaVA instruction data against the tiny preset (issue #20): every question type the
VQA evaluation scores is trained on, no answer is cut by the preset's model_max_length, and no test
image's question is trained on."""

from __future__ import annotations

import json
import re
import shutil

import yaml
from transformers import AutoTokenizer

from llava_integration import preset
from llava_integration.data import DataArguments, LlavaDataset
from llava_integration.evaluate import TYPES, vqa_items
from llm2clip.data.images import make_image_processor
from llm2clip.data.lexicon import POSITION_EN, plural_en
from llm2clip.data.qa import DESCRIBE_PROMPT, DETAIL_SHARE
from llm2clip.data.world import COLORS, SHAPES, SIZES, STYLES
from tests.conftest import ROOT

RECIPE = preset.RECIPES["finetune"] + preset.TINY["finetune"]  # the tiny preset's flags, later ones winning


def _tiny_image_rows() -> int:
    """Rows an image takes in the tiny preset's LM: the tower's patches (select feature 'patch' drops CLS)."""
    cfg = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    return (cfg["synth"]["image_size"] // cfg["vision"]["patch_size"]) ** 2


def _load(world, split):
    return json.loads((world / f"llava/{split}_instruct.json").read_text())


def test_tiny_preset_length_cuts_no_answer(world):
    """Tokenized as the preset trains (its template, model_max_length and image rows): no sample is cut.
    The former layout (the ~250-token description as one more turn of each Q&A conversation) fails this."""
    max_length = int(preset._flag(RECIPE, "--model_max_length"))
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")  # what the stage-1 LM's tokenizer is trained as
    args = DataArguments(data_path=str(world / "llava/train_instruct.json"), image_folder=str(world))
    dataset = LlavaDataset(args, tokenizer, make_image_processor(32), preset._flag(RECIPE, "--version"), max_length,
                           _tiny_image_rows(), progress=False)
    assert dict(dataset.skips.counts) == {} and dataset.mismatch.mismatched == 0
    assert dataset.answers == sum(len(s["conversations"]) // 2 for s in _load(world, "train"))
    assert (dataset.truncated, dataset.answers_cut) == (0, 0), dataset.report()
    longest = max(s["length"] for s in dataset.samples)
    assert longest <= max_length, (longest, max_length)


def _family(question: str) -> str:
    """A question with its world words (colours, shapes, sizes, styles, places) masked."""
    words = {*COLORS, *SHAPES, *(plural_en(s, 2) for s in SHAPES), *SIZES, *STYLES}
    for place in sorted(POSITION_EN.values(), key=len, reverse=True):
        question = question.replace(place, "<place>")
    return re.sub(r"\b(" + "|".join(sorted(words, key=len, reverse=True)) + r")\b", "<w>", question)


def test_every_scored_question_type_is_trained_from_the_train_split_only(world):
    train, test = _load(world, "train"), _load(world, "test")
    train_items, test_items = vqa_items(world / "llava/train_instruct.json"), vqa_items(
        world / "llava/test_instruct.json")
    assert {it["type"] for it in train_items} == {it["type"] for it in test_items} == set(TYPES)
    # the same phrasing family: every test question's pattern is a training question's pattern
    assert {_family(it["question"]) for it in test_items} <= {_family(it["question"]) for it in train_items}
    # no leakage: training samples show train images only, the evaluation test images only
    assert all(s["image"].startswith("images/train/") for s in train)
    assert all(s["image"].startswith("images/test/") for s in test)
    assert all(it["image"].startswith("images/test/") for it in test_items)


def test_descriptions_and_questions_are_separate_samples(world):
    """LLaVA-Instruct's layout: one Q&A conversation per image, a one-turn description for some of them."""
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    samples = _load(world, "train")
    qa = [s for s in samples if not s["id"].endswith("-detail")]
    detail = [s for s in samples if s["id"].endswith("-detail")]
    assert [s["id"] for s in qa] == [r["key"] for r in rows]  # one conversation per image, in order
    for s in qa:
        questions = [t["value"].removeprefix("<image>\n") for t in s["conversations"][::2]]
        assert DESCRIBE_PROMPT not in questions and 3 <= len(questions) <= 4
    long_captions = {r["key"]: r["long_caption"] for r in rows}
    for s in detail:
        key = s["id"].removesuffix("-detail")
        assert s["conversations"] == [{"from": "human", "value": f"<image>\n{DESCRIBE_PROMPT}"},
                                      {"from": "gpt", "value": long_captions[key]}]
        assert s["image"] == f"images/train/{key}.png"
    assert 0.5 * DETAIL_SHARE < len(detail) / len(qa) < 1.5 * DETAIL_SHARE
    assert not preset.legacy_instruct(samples)


def test_a_run_in_the_legacy_layout_is_rewritten_before_fine_tuning(world, tmp_path):
    data = tmp_path / "data"
    (data / "llava").mkdir(parents=True)
    shutil.copy(world / "manifest.json", data / "manifest.json")
    for split in ("train", "val", "test"):  # the former layout: the description as a turn of each conversation
        legacy = []
        for s in _load(world, split):
            if s["id"].endswith("-detail"):
                legacy[-1]["conversations"] += [{"from": "human", "value": DESCRIBE_PROMPT},
                                                s["conversations"][1]]
            else:
                legacy.append(s)
        assert preset.legacy_instruct(legacy)
        (data / f"llava/{split}_instruct.json").write_text(json.dumps(legacy))
    (data / "llava/train_pretrain.json").write_text("pretrain data is not touched")
    preset.refresh_instruct_data(data)
    for split in ("train", "val", "test"):
        written = (data / f"llava/{split}_instruct.json").read_bytes()
        assert written == (world / f"llava/{split}_instruct.json").read_bytes()
    assert (data / "llava/train_pretrain.json").read_text() == "pretrain data is not touched"
    assert sorted(p.name for p in data.iterdir()) == ["llava", "manifest.json"]
    stamp = (data / "llava/train_instruct.json").stat().st_mtime_ns
    preset.refresh_instruct_data(data)  # the current layout is left alone
    assert (data / "llava/train_instruct.json").stat().st_mtime_ns == stamp
