"""LLaVA data: templates, exact label masking, tokenization mismatches, bad input, the splice."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from llava_integration.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_integration.conversation import (
    V1_SYSTEM,
    MismatchCounter,
    get_template,
    render,
    tokenize_conversation,
)
from llava_integration.data import DataArguments, LlavaDataset, answer_runs
from llava_integration.evaluate import TYPES, question_type, vqa_items
from llava_integration.model import LlavaForCausalLM
from llm2clip.errors import DataError

TURNS = [{"from": "human", "value": "What colour is the star?\n<image>"}, {"from": "gpt", "value": "It is red."},
         {"from": "human", "value": "How many stars are there?"}, {"from": "gpt", "value": "There is one star."}]


@pytest.fixture(scope="module")
def tokenizer(world):
    return AutoTokenizer.from_pretrained(world / "tokenizer")


def _supervised(ids, labels):
    """Runs of consecutive supervised tokens."""
    runs, current = [], []
    for i, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_v1_masks_everything_but_the_answers(tokenizer):
    template = get_template("v1")
    text, _ = render(TURNS, template)
    assert text == (f"{V1_SYSTEM} USER: <image>\nWhat colour is the star? ASSISTANT: It is red.</s>"
                    "USER: How many stars are there? ASSISTANT: There is one star.</s>")
    ids, labels, mismatch = tokenize_conversation(TURNS, tokenizer, template)
    assert not mismatch and ids[0] == tokenizer.bos_token_id and ids.count(IMAGE_TOKEN_INDEX) == 1
    image_at = ids.index(IMAGE_TOKEN_INDEX)
    assert tokenizer.decode(ids[:image_at]).endswith("USER: ") and labels[image_at] == IGNORE_INDEX
    answers = [tokenizer.decode(r) for r in _supervised(ids, labels)]
    assert answers == [" It is red.</s>", " There is one star.</s>"]


def test_plain_supervises_the_caption_only(tokenizer):
    turns = [{"from": "human", "value": "Give a brief description of the image.\n<image>"},
             {"from": "gpt", "value": "a red star on white"}]
    ids, labels, mismatch = tokenize_conversation(turns, tokenizer, get_template("plain"))
    assert not mismatch and ids[:2] == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]  # the prompt is dropped
    assert labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert [tokenizer.decode(r) for r in _supervised(ids, labels)] == ["a red star on white\n"]
    with pytest.raises(DataError, match="unknown conversation --version"):
        get_template("llama_3")
    assert get_template("v1_mmtag").name == "v1" and get_template("vicuna_v1").name == "v1"


def test_tokenization_mismatch_is_counted_and_raises(tmp_path):
    """A tokenizer without pre-tokenization merges across the answer boundary (LLaVA #1166)."""
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    text = render(TURNS, get_template("v1"))[0]
    raw.train_from_iterator([text] * 50, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>",
                                                                                           "</s>"]))
    merging = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    _ids, labels, mismatch = tokenize_conversation(TURNS, merging, get_template("v1"))
    assert mismatch and all(lab == IGNORE_INDEX for lab in labels)
    counter = MismatchCounter(max_fraction=0.1, min_samples=5)
    for i in range(4):
        counter.update(str(i), False)
    with pytest.raises(DataError, match=r"tokenization mismatch in 1/5 samples .*--version"):
        counter.update("4", True)


def _write(tmp_path, samples, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(samples))
    return path


def _dataset(path, tokenizer, world, version="v1", max_length=512, **kw):
    from llm2clip.data.images import make_image_processor

    args = DataArguments(data_path=str(path), image_folder=str(world), **kw)
    return LlavaDataset(args, tokenizer, make_image_processor(32), version, max_length, num_image_tokens=16,
                        progress=False)


def test_bad_samples_are_skipped_and_counted_or_raise(tmp_path, tokenizer, world):
    good = json.loads((world / "llava/train_instruct.json").read_text())[:3]
    image = good[0]["image"]
    bad = [
        {"id": "missing", "image": "images/train/nope.png", "conversations": good[0]["conversations"]},
        {"id": "no-image-token", "image": image, "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A star."}]},
        {"id": "roles", "image": image, "conversations": [
            {"from": "gpt", "value": "<image>\nHi"}, {"from": "human", "value": "A star."}]},
        {"id": "long", "image": image, "conversations": [
            {"from": "human", "value": "<image>\n" + "word " * 600}, {"from": "gpt", "value": "A star."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]},
    ]
    path = _write(tmp_path, good + bad)
    dataset = _dataset(path, tokenizer, world)
    assert len(dataset) == 4  # 3 good + the text-only sample
    assert dict(dataset.skips.counts) == {"missing image": 1, "bad conversation": 2, "over-long conversation": 1}
    assert dataset.modality_lengths[-1] < 0 < dataset.modality_lengths[0]
    text_only = dataset[3]
    assert torch.equal(text_only["image"], torch.zeros(3, 32, 32)) and not text_only["has_image"]
    assert IMAGE_TOKEN_INDEX not in text_only["input_ids"].tolist()
    messages = {"missing": "does not exist", "no-image-token": "put exactly one '<image>' in the first human turn",
                "roles": "turn 0 must come from 'human'", "long": "cuts every answer"}
    for sample_id, message in messages.items():
        sample = next(b for b in bad if b["id"] == sample_id)
        with pytest.raises(DataError, match=message):
            _dataset(_write(tmp_path, [sample], f"{sample_id}.json"), tokenizer, world, strict=True)


def test_truncation_counts_samples_and_the_answers_that_lose_tokens(tmp_path, tokenizer, world):
    image = json.loads((world / "llava/train_instruct.json").read_text())[0]["image"]
    sample = {"id": "two", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nHow many stars are there?"},
        {"from": "gpt", "value": "There is one star."},
        {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A red star. " * 40}]}
    path = _write(tmp_path, [sample])
    ids, labels, _ = tokenize_conversation(sample["conversations"], tokenizer, get_template("v1"))
    (_, first_answer_end), _ = answer_runs(labels)
    assert all(label == IGNORE_INDEX for label in labels[first_answer_end + 1: first_answer_end + 3])
    whole = _dataset(path, tokenizer, world, max_length=len(ids) + 15)  # 16 image rows: exactly fits
    assert (whole.truncated, whole.answers_cut, whole.answers) == (0, 0, 2)
    cut = _dataset(path, tokenizer, world, max_length=first_answer_end + 15 + 1)  # the first answer just fits
    assert (cut.truncated, cut.answers_cut, cut.answers) == (1, 1, 2)
    assert "1 samples truncated to model_max_length: 1 of 2 answer turns lose tokens" in cut.report()
    both = _dataset(path, tokenizer, world, max_length=first_answer_end + 15)  # its last token is cut too
    assert (both.truncated, both.answers_cut) == (1, 2)


def test_splice_places_image_rows_and_masks_them(tokenizer):
    """prepare_inputs_labels_for_multimodal against a hand-built reference, both padding sides."""
    torch.manual_seed(0)
    embed = nn.Embedding(50, 8)
    lm = SimpleNamespace(get_input_embeddings=lambda: embed, config=SimpleNamespace(tokenizer_padding_side="right",
                                                                                     tokenizer_model_max_length=9))
    tower = SimpleNamespace(hidden_size=4)
    model = LlavaForCausalLM.__new__(LlavaForCausalLM)
    nn.Module.__init__(model)
    model.language_model, model.mm_projector = lm, nn.Linear(4, 8)
    object.__setattr__(model, "vision_tower", tower)
    image_rows = torch.randn(3, 2, 8)  # 3 images, 2 patches each, already projected
    model.encode_images = lambda images: image_rows[: len(images)]
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7], [1, 8, 9, 0, 0], [1, IMAGE_TOKEN_INDEX, 4, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.where(mask.bool(), ids, IGNORE_INDEX)
    _, positions, out_mask, _, embeds, out_labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, torch.zeros(3, 3, 4, 4))
    assert embeds.shape == (3, 6, 8)  # longest row 1 + 1 + 2 + 2 = 6 < max length 9
    torch.testing.assert_close(embeds[0], torch.cat([embed(torch.tensor([1, 5])), image_rows[0],
                                                     embed(torch.tensor([6, 7]))]))
    assert out_labels[0].tolist() == [1, 5, IGNORE_INDEX, IGNORE_INDEX, 6, 7]
    torch.testing.assert_close(embeds[1, :3], embed(torch.tensor([1, 8, 9])))  # text only: image 1 skipped
    assert out_mask[1].tolist() == [1, 1, 1, 0, 0, 0] and positions[1, :3].tolist() == [0, 1, 2]
    torch.testing.assert_close(embeds[2, 1:3], image_rows[2])  # the third sample takes the third image
    lm.config.tokenizer_model_max_length, lm.config.tokenizer_padding_side = 4, "left"
    _, positions, out_mask, _, embeds, out_labels = model.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, torch.zeros(3, 3, 4, 4))
    assert embeds.shape == (3, 4, 8) and out_mask[1].tolist() == [0, 1, 1, 1]  # truncated, left-padded
    assert positions[1].tolist() == [0, 0, 1, 2] and out_labels[0].tolist() == [1, 5, IGNORE_INDEX, IGNORE_INDEX]
    from llm2clip.errors import ConfigError

    with pytest.raises(ConfigError, match="more -200 placeholders than the 1 images"):
        model.prepare_inputs_labels_for_multimodal(ids[[0, 2]], None, None, None, None, torch.zeros(1, 3, 4, 4))


def test_vqa_items_cover_every_question_type(world):
    items = vqa_items(world / "llava/test_instruct.json")
    assert {it["type"] for it in items} == set(TYPES)
    assert question_type("Describe the image in detail.") is None


def test_vqa_eval_on_a_file_without_scorable_questions_is_an_error_not_zero(tmp_path):
    from llava_integration.evaluate import evaluate_vqa
    from llm2clip.errors import ConfigError

    # mix665k-style conversations: real questions, none of the shapes world's typed ones
    data = [{"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."}]}]
    (tmp_path / "mix.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"holds no question of a type this evaluator scores.*lmms-eval"):
        evaluate_vqa(None, None, None, tmp_path / "mix.json", tmp_path, progress=False)


def test_group_by_length_batches_similar_lengths_without_loading_samples():
    from llava_integration.train import LlavaTrainer

    class Unloadable(list):  # the sampler takes the tokenized lengths; loading an image would fail here
        def __getitem__(self, i):
            raise AssertionError("a sample was loaded to measure it")

    lengths = [220, 220, 220, -380] * 200  # Q&A conversations, descriptions (negative: text-only, LLaVA's sign)
    dataset = Unloadable(lengths)
    dataset.modality_lengths = lengths
    args = SimpleNamespace(train_sampling_strategy="group_by_length", group_by_modality_length=False,
                           train_batch_size=4, gradient_accumulation_steps=1)
    torch.manual_seed(0)
    order = list(LlavaTrainer._get_train_sampler(SimpleNamespace(args=args, train_dataset=dataset)))
    assert sorted(order) == list(range(800))
    batches = [{abs(lengths[i]) for i in order[k: k + 4]} for k in range(0, 800, 4)]
    # HF's grouping sorts windows of 50 batches: about one mixed batch per window (random batches: ~68% mixed)
    assert sum(len(b) > 1 for b in batches) <= 8
