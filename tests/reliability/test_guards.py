"""Numerical guards: a NaN/inf loss stops the step (nothing applied, checkpoints intact) or is skipped
and counted."""

import json

import pytest
import torch

from llm2clip.checkpoint import latest_checkpoint
from llm2clip.errors import ConfigError
from llm2clip.guards import NonFiniteLoss, apply_step, check_policy
from llm2clip.stage2.data import CaptionSampler
from llm2clip.stage2.train import TrainConfig, train_contrastive
from tests.test_stage2 import Vectors, _images, _model


class PoisonedVectors(Vectors):
    """The stand-in cache, with NaN vectors on one call (a corrupt cache row, an overflow upstream)."""

    def __init__(self, nan_at_call: int):
        super().__init__()
        self.nan_at_call = nan_at_call

    def __call__(self, keys, captions):
        out = super().__call__(keys, captions)
        return torch.full_like(out, float("nan")) if self.calls == self.nan_at_call else out


def _train(tmp_path, policy):
    model = _model()
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=1, out=str(tmp_path),
                      nonfinite=policy)
    sampler = CaptionSampler("short_caption", ["long_caption"], 0.5, seed=0)
    summary = train_contrastive(model, PoisonedVectors(nan_at_call=4), _images(), sampler, cfg, name="t",
                                progress=False, device=torch.device("cpu"))
    return model, summary


def test_a_nan_loss_stops_the_run_before_the_step_and_keeps_the_checkpoints_good(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"at step 4; that step was not applied.*stage2.t.nonfinite=skip"):
        _train(tmp_path, "stop")
    ckpt, damaged = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "step-0000003" and not damaged  # the three good steps, nothing after
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / "model.safetensors")).values())


def test_a_nan_batch_can_be_skipped_and_counted(tmp_path):
    model, summary = _train(tmp_path, "skip")
    assert summary["skipped_nonfinite"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "loss.jsonl").read_text().splitlines()]
    assert losses[3] is None and all(v is not None for i, v in enumerate(losses) if i != 3)


def test_the_guard_itself():
    assert apply_step(torch.tensor(1.5), 0, "k", "stop")
    assert not apply_step(torch.tensor(float("inf")), 0, "k", "skip")
    with pytest.raises(NonFiniteLoss, match=r"set stage1\.cc\.nonfinite=skip"):
        apply_step(torch.tensor(float("nan")), 7, "stage1.cc.nonfinite", "stop")
    with pytest.raises(ConfigError, match="not supported under DeepSpeed"):
        check_policy("stage1.cc.nonfinite", "skip", "configs/deepspeed/zero2.json")
    with pytest.raises(ConfigError, match="'stop' or 'skip'"):
        check_policy("x.nonfinite", "ignore", None)
