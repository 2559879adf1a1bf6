"""Training checkpoints that survive a kill: safetensors and JSON only, written atomically, verified on load.

    <dir>/step-0000300/  model.safetensors      every tensor of the model's state_dict (or, with
                                                trainable_only, of its trainable parameters: LoRA)
                         optimizer.safetensors  the optimizer's per-parameter state
                         state.json             step, optimizer param groups, scheduler state, and
                                                the trainer's JSON extras (sampler RNG states, losses)
                         rng.safetensors        torch's CPU RNG state
                         manifest.json          sha256 of each file above; written last

A checkpoint folder is built under a temporary name, every file fsynced, and renamed into place. On
resume the newest folder whose files match its manifest wins; a damaged one (a kill mid-copy, a
truncated file) is reported and the previous one is used. Nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .files import sha256_file

log = logging.getLogger(__name__)
_FILES = ("model.safetensors", "optimizer.safetensors", "state.json", "rng.safetensors")


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _weights(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    if trainable_only:  # a frozen (possibly 4-bit) base is not part of the training state
        return {k: p.detach().contiguous() for k, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(folder: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None, scheduler, keep: int = 2, *,
                    trainable_only: bool = False, extra: dict | None = None) -> Path:
    """optimizer=None saves no optimizer state (DeepSpeed ZeRO partitions it across ranks). `extra`:
    JSON-serialisable trainer state, returned by `checkpoint_extra`."""
    from safetensors.torch import save

    folder = Path(folder)
    final = folder / f"step-{step:07d}"
    tmp = folder / f".step-{step:07d}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_state = _weights(model, trainable_only)
    opt_tensors, opt_meta = _optimizer_tensors(optimizer) if optimizer is not None else ({}, None)
    state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict() if scheduler else None,
             "trainable_only": trainable_only, "extra": extra or {}}
    _write(tmp / "model.safetensors", save(model_state))
    _write(tmp / "optimizer.safetensors", save(opt_tensors))
    _write(tmp / "state.json", json.dumps(state).encode())
    _write(tmp / "rng.safetensors", save({"torch_cpu": torch.get_rng_state()}))
    manifest = {name: sha256_file(tmp / name) for name in _FILES}
    _write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(ckpt: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json (written last, so the save never finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest.json is not valid JSON"
    for name in _FILES:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
        if sha256_file(ckpt / name) != manifest.get(name):
            return f"{name} does not match its sha256 (truncated or corrupted)"
    return None


def latest_checkpoint(folder: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """(newest valid checkpoint or None, one line per damaged checkpoint that was passed over)."""
    rejected = []
    for ckpt in sorted(Path(folder).glob("step-*"), reverse=True):
        problem = verify(ckpt)
        if problem is None:
            return ckpt, rejected
        rejected.append(f"{ckpt}: {problem}")
        log.warning("skipping damaged checkpoint %s: %s", ckpt, problem)
    return None, rejected


def load_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, scheduler) -> int:
    """Restore everything saved by `save_checkpoint`; returns the step to continue from. With no saved
    optimizer state (or optimizer=None) the optimizer starts fresh and a warning says so."""
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    weights = load_file(str(ckpt / "model.safetensors"))
    if state.get("trainable_only"):
        expected = set(_weights(model, True))
        if set(weights) != expected:
            raise ValueError(f"{ckpt} holds other trainable parameters than this model ({len(weights)} vs "
                             f"{len(expected)}); was it written by another configuration?")
        model.load_state_dict(weights, strict=False)
    else:
        model.load_state_dict(weights)
    if optimizer is not None and state["optimizer"] is not None:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        per_param: dict[int, dict] = {}
        for key, value in [*tensors.items(), *state["optimizer"]["scalars"].items()]:
            idx, name = key.split(".", 1)
            per_param.setdefault(int(idx), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    else:
        log.warning("%s: optimizer state not restored (not saved, or DeepSpeed); AdamW moments restart", ckpt)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_file(str(ckpt / "rng.safetensors"))["torch_cpu"])
    return int(state["step"])


def checkpoint_extra(ckpt: Path) -> dict:
    """The trainer's JSON extras saved with `save_checkpoint(extra=...)`."""
    return json.loads((ckpt / "state.json").read_text()).get("extra", {})
