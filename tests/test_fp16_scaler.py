"""fp16 training with a dynamic loss scale (torch.amp.GradScaler): an overflowing step is skipped and
the scale falls; finite steps apply; the scale survives kill and resume."""

import json

import pytest
import torch

from llm2clip.checkpoint import checkpoint_extra, latest_checkpoint
from llm2clip.errors import ConfigError
from llm2clip.stage2.train import TrainConfig, _optimizer_step
from tests.test_stage2 import _train


def _linear_with_grads(value: float, scaler=None) -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
    """A Linear whose loss is multiplied by `value` (inf/NaN: an fp16 overflow), backpropagated through
    the scaler as the training loop does."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    loss = (model(torch.ones(2, 4)) * value).sum()
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return model, optimizer


def test_an_overflowing_step_is_skipped_and_the_scale_falls():
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, optimizer = _linear_with_grads(float("inf"), scaler)
    before = [p.detach().clone() for p in model.parameters()]
    assert _optimizer_step(model, optimizer, scaler, max_grad_norm=1.0) is False
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # nothing applied
    assert scaler.get_scale() == 512.0  # backoff factor 0.5
    optimizer.zero_grad()
    scaler.scale(model(torch.ones(2, 4)).sum()).backward()  # finite gradients: the step applies
    assert _optimizer_step(model, optimizer, scaler, max_grad_norm=1.0) is True
    assert not torch.equal(before[0], model.weight) and scaler.get_scale() == 512.0


def test_a_nan_gradient_is_an_overflow_too():
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    model, optimizer = _linear_with_grads(float("nan"), scaler)
    assert _optimizer_step(model, optimizer, scaler, max_grad_norm=1.0) is False and scaler.get_scale() == 4.0


def test_a_disabled_scaler_is_a_plain_clipped_step():
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model, optimizer = _linear_with_grads(3.0)
    reference, ref_opt = _linear_with_grads(3.0)
    torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
    ref_opt.step()
    assert _optimizer_step(model, optimizer, scaler, max_grad_norm=1.0) is True
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def _losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "loss.jsonl").read_text().splitlines()]


def test_fp16_training_tracks_fp32_and_learns(tmp_path):
    _train(tmp_path / "fp32", steps=12, precision="fp32")
    _train(tmp_path / "fp16", steps=12, precision="fp16")
    fp32, fp16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "fp16")
    assert sum(fp16[-4:]) < sum(fp16[:4])  # it learns (measured: 12.1 -> 8.1)
    assert max(abs(a - b) for a, b in zip(fp16, fp32, strict=True)) < 0.6  # measured 0.48 at most


def test_fp16_training_resumes_with_its_loss_scale(tmp_path):
    full = _train(tmp_path / "full", steps=6, precision="fp16")
    ckpt, _ = latest_checkpoint(tmp_path / "full" / "checkpoints")
    assert checkpoint_extra(ckpt)["scaler"]["scale"] > 0  # saved with the weights
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "killed", steps=6, fail_at_call=5, precision="fp16")
    resumed = _train(tmp_path / "killed", steps=6, precision="fp16")
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match="bf16, fp16 or fp32"):
        TrainConfig(precision="fp8").validate("llm2clip")
