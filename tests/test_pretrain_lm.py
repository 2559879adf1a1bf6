"""The tiny LM's pretraining: GPT-style blocks, or one text per sequence (`packing: documents`)."""

import json

import pytest
import torch

from llm2clip.errors import ConfigError
from llm2clip.stage1.pretrain_lm import PretrainLMConfig, document_batches, pretrain_lm, tokenize_corpus


def test_document_batches_hold_every_text_once_per_epoch_within_the_token_budget():
    docs = [[1, *range(10, 10 + n), 2] for n in (3, 40, 7, 7, 90, 1, 25, 60, 12, 5, 33, 2)]
    budget = 128
    batches = document_batches(docs, budget, pad_id=0, generator=torch.Generator().manual_seed(0))
    seen = []
    while len(seen) < len(docs):
        ids, labels, mask = next(batches)  # [n, longest] each
        assert ids.numel() <= budget or len(ids) == 1
        padding = labels == -100
        assert torch.equal(mask.bool(), ~padding) and not ids[padding].any()  # pad id 0 exactly there
        for row, length in zip(ids, mask.sum(1).tolist(), strict=True):
            seen.append(row[:length].tolist())
        assert mask[:, 0].all() and (mask.sum(1) == ids.shape[1]).any()  # left-aligned, no all-padding batch
    assert sorted(seen) == sorted(docs)  # exactly one epoch: every text once, whole


def test_documents_packing_trains_each_text_from_position_zero(world, tmp_path):
    """Loss falls, and the trained LM's loss on a padded batch is the loss of its texts read alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = PretrainLMConfig(enabled=True, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           seq_len=96, batch_size=4, steps=60, warmup_steps=0, packing="documents",
                           corpus=str(world / "corpus.txt"), tokenizer=str(world / "tokenizer"),
                           out=str(tmp_path / "lm"), precision="fp32")
    stats = pretrain_lm(cfg, progress=False)
    assert stats["packing"] == "documents" and stats["loss_last"] < stats["loss_first"] - 0.5
    assert 0 < stats["tokens_seen"] <= cfg.steps * cfg.batch_size * cfg.seq_len

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lm")
    texts = (world / "corpus.txt").read_text().splitlines()[:5]
    docs = [doc[:cfg.seq_len] for doc in tokenize_corpus(texts, tokenizer)]
    ids, labels, mask = next(document_batches(docs, 10_000, tokenizer.pad_token_id, torch.Generator()))
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        alone = [model(input_ids=torch.tensor([d]), labels=torch.tensor([d])).loss * (len(d) - 1) for d in docs]
    torch.testing.assert_close(batched, sum(alone) / sum(len(d) - 1 for d in docs), atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "lm/config.json").read_text())["model_type"] == "llama"


def test_documents_packing_pads_with_eos_when_the_tokenizer_has_no_pad_token(world, tmp_path, monkeypatch):
    """Llama-3-style tokenizers have no pad token: padding falls back to EOS, masked out of the loss."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    assert AutoTokenizer.from_pretrained(tmp_path / "tokenizer").pad_token_id is None
    cfg = PretrainLMConfig(enabled=True, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           seq_len=96, batch_size=4, steps=30, warmup_steps=0, packing="documents",
                           corpus=str(world / "corpus.txt"), tokenizer=str(tmp_path / "tokenizer"),
                           out=str(tmp_path / "lm"), precision="fp32")
    pad_ids: list[int] = []
    original = document_batches

    def recording(docs, tokens_per_batch, pad_id, generator):
        pad_ids.append(pad_id)
        return original(docs, tokens_per_batch, pad_id, generator)

    monkeypatch.setattr("llm2clip.stage1.pretrain_lm.document_batches", recording)
    stats = pretrain_lm(cfg, progress=False)
    assert pad_ids == [tokenizer.eos_token_id]
    assert stats["loss_last"] < stats["loss_first"]
    config = json.loads((tmp_path / "lm/config.json").read_text())
    assert config["pad_token_id"] is None and config["eos_token_id"] == tokenizer.eos_token_id


def test_unknown_packing_is_an_error_that_names_the_choices():
    with pytest.raises(ConfigError, match=r"stage1\.pretrain\.packing.*blocks or documents"):
        PretrainLMConfig(packing="rows").validate()


def test_long_context_steps_end_pretraining_on_longer_blocks_with_the_same_tokens(world, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    shapes: list[tuple[int, int]] = []
    from_config = AutoModelForCausalLM.from_config

    def build_and_watch(*args, **kwargs):
        model = from_config(*args, **kwargs)
        model.register_forward_pre_hook(lambda _, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                        with_kwargs=True)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", build_and_watch)
    cfg = PretrainLMConfig(enabled=True, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           seq_len=16, batch_size=8, steps=5, long_context_steps=2, long_context_len=64,
                           warmup_steps=0, precision="fp32", corpus=str(world / "corpus.txt"),
                           tokenizer=str(world / "tokenizer"), out=str(tmp_path / "lm"))
    stats = pretrain_lm(cfg, progress=False)
    assert shapes == [(8, 16)] * 3 + [(2, 64)] * 2
    assert stats["tokens_seen"] == 5 * 8 * 16


@pytest.mark.parametrize(("changes", "message"), [
    ({"long_context_steps": 6}, r"long_context_steps must be in \[0, stage1\.pretrain\.steps\]"),
    ({"long_context_steps": 2, "packing": "documents"}, r"needs packing: blocks"),
    ({"long_context_steps": 2, "long_context_len": 128}, r"long_context_len must be longer"),
])
def test_bad_long_context_settings_are_errors_that_name_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        PretrainLMConfig(steps=5, seq_len=128, **changes).validate()
