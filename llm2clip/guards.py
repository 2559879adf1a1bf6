"""Numerical guards for the training loops: a NaN or inf loss never reaches the weights.

After the backward pass and before the optimizer step, every rank agrees whether the step's loss is
finite (one all-reduce, so ranks never disagree about skipping). A non-finite loss either stops the
run with a one-line error (`nonfinite: stop`, the default; the step is not applied and no checkpoint
is written, so the newest checkpoint stays good) or skips the batch and counts it (`nonfinite: skip`).
"""

from __future__ import annotations

import torch

from .errors import ConfigError, DataError, Llm2ClipError

POLICIES = ("stop", "skip")


class NonFiniteLoss(Llm2ClipError):
    """A NaN or inf loss under `nonfinite: stop`."""


def check_policy(key: str, policy: str, deepspeed: str | None) -> None:
    if policy not in POLICIES:
        raise ConfigError(f"{key} must be 'stop' or 'skip'")
    if policy == "skip" and deepspeed:
        raise ConfigError(f"{key}=skip is not supported under DeepSpeed (its engine owns the gradients); use "
                          "'stop', or run without deepspeed")


def require_finite_vectors(vectors: torch.Tensor) -> None:
    """LLM vectors [B, D] handed in from outside a training loop must be finite: a NaN row would come
    back as NaN features, or as NaN labels in concept 0, without a word."""
    bad = ~torch.isfinite(vectors).all(-1)  # [B]
    if bad.any():
        raise DataError(f"{int(bad.sum())} of {len(vectors)} LLM vectors hold NaN or inf. Fix: rebuild the "
                        "embedding cache (it leaves such vectors out)")


def all_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank."""
    flag = torch.isfinite(loss.detach()).all().float().reshape(1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def apply_step(loss: torch.Tensor, step: int, key: str, policy: str) -> bool:
    """True: apply the optimizer step. False: skip this batch (policy 'skip'). Raises under 'stop'."""
    if all_finite(loss):
        return True
    if policy == "skip":
        return False
    raise NonFiniteLoss(f"the loss is {loss.detach().float().item()} (on some rank) at step {step + 1}; that step was "
                        f"not applied and no checkpoint was written. Fix: lower the learning rate, use fp32 "
                        f"precision, or set {key}=skip to skip such batches and count them")


def load_tensor_pickle(path) -> dict[str, torch.Tensor]:
    """A pickled name -> tensor state dict, read with torch.load(weights_only=True) only (a crafted pickle
    is refused, never run). Callers decide first whether pickles are allowed at all."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError and friends: a crafted or damaged file
        raise ConfigError(f"{path}: refused by torch.load(weights_only=True) ({str(e).splitlines()[0][:200]}). "
                          "Fix: get the weights as safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: not a flat name -> tensor state dict. Fix: get the weights as safetensors")
    return state
