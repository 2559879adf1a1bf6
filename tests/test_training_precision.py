"""stage1.pretrain.precision and stage1.cc.precision: fp32 turns bf16 autocast off for training, even
where bf16 pays, and the saved embedder keeps embedder.autocast for encoding."""

import json

import pytest
import torch

from llm2clip.embedder import EmbedderConfig
from llm2clip.errors import ConfigError
from llm2clip.stage1 import cc as cc_module
from llm2clip.stage1.cc import CCConfig, train_cc
from llm2clip.stage1.pretrain_lm import PretrainLMConfig, pretrain_lm
from tests.helpers import save_tiny_llm


@pytest.fixture
def bf16_pays(monkeypatch):
    """Act as a CPU with native bf16, so `precision: bf16` does autocast here whatever this host has."""
    monkeypatch.setattr("llm2clip.precision.cpu_bf16_is_fast", lambda: True)


def _record_linear_dtypes(model: torch.nn.Module, seen: set) -> None:
    for name, module in model.named_modules():
        if name.endswith("q_proj") or name.endswith("q_proj.base_layer"):
            module.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_cc_precision_sets_the_training_forward_and_keeps_the_embedders_autocast(
        world, tmp_path, monkeypatch, bf16_pays, precision, expected):
    lm = save_tiny_llm(tmp_path / "lm", world / "tokenizer", causal_lm=True)
    seen: set = set()
    load = cc_module.load_backbone

    def load_and_watch(*args, **kwargs):
        backbone, tokenizer = load(*args, **kwargs)
        _record_linear_dtypes(backbone, seen)
        return backbone, tokenizer

    monkeypatch.setattr(cc_module, "load_backbone", load_and_watch)
    cfg = CCConfig(data=str(world / "train.jsonl"), text_pairs=None, steps=2, batch_size=4, hard_negatives=False,
                   gradient_checkpointing=False, checkpoint_every=0, precision=precision,
                   out=str(tmp_path / "cc"), checkpoint_dir=str(tmp_path / "ckpt"))
    train_cc(cfg, EmbedderConfig(model=str(lm), device="cpu", max_length=64), progress=False)
    assert seen == {expected}
    saved = json.loads((tmp_path / "cc" / "embedder_config.json").read_text())
    assert saved["autocast"] is True  # encoding precision is embedder.autocast's, not the training run's


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_pretrain_precision_sets_the_training_forward(world, tmp_path, monkeypatch, bf16_pays, precision, expected):
    from transformers import AutoModelForCausalLM

    seen: set = set()
    from_config = AutoModelForCausalLM.from_config

    def build_and_watch(*args, **kwargs):
        model = from_config(*args, **kwargs)
        _record_linear_dtypes(model, seen)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", build_and_watch)
    (tmp_path / "corpus.txt").write_text("a large red circle on a black background\n" * 200)
    cfg = PretrainLMConfig(enabled=True, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           seq_len=16, batch_size=2, steps=2, warmup_steps=0, precision=precision,
                           corpus=str(tmp_path / "corpus.txt"), tokenizer=str(world / "tokenizer"),
                           out=str(tmp_path / "lm"))
    pretrain_lm(cfg, progress=False)
    assert seen == {expected}


def test_unknown_precision_is_an_error_that_names_the_choices():
    with pytest.raises(ConfigError, match=r"stage1\.cc\.precision.*bf16 or fp32"):
        CCConfig(precision="fp16").validate()
    with pytest.raises(ConfigError, match=r"stage1\.pretrain\.precision.*bf16 or fp32"):
        PretrainLMConfig(precision="half").validate()
