"""The multimodal projector, in LLaVA's layout so `mm_projector.bin` files move both ways.

    'linear'        nn.Linear(mm_hidden_size, hidden_size)
    'mlp{N}x_gelu'  Linear, then (GELU, Linear) x (N - 1): mlp2x_gelu has keys 0.* and 2.*
    'identity'      features pass through (mm_hidden_size must equal hidden_size)

A saved projector holds LLaVA's full names (`model.mm_projector.0.weight`, ...), as LLaVA's
`get_mm_adapter_state_maybe_zero_3` writes them, in `mm_projector.bin` (torch) and
`mm_projector.safetensors`. Loading reads either, keeps the keys containing 'mm_projector' and strips
the prefix, as `initialize_vision_modules` does, and under DeepSpeed ZeRO-3 gathers the partitioned
parameters first (LLaVA #1619 "size mismatch ... torch.Size([0])").
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from llm2clip.errors import ConfigError

PROJECTOR_PREFIX = "model.mm_projector."
_MLP = re.compile(r"^mlp(\d+)x_gelu$")


class IdentityMap(nn.Module):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    @property
    def config(self) -> dict:
        return {"mm_projector_type": "identity"}


def build_vision_projector(config, **kwargs) -> nn.Module:
    """`config` has mm_projector_type, mm_hidden_size (the tower's width) and hidden_size (the LLM's)."""
    kind = getattr(config, "mm_projector_type", "linear")
    vision_width, llm_width = config.mm_hidden_size, config.hidden_size
    if kind == "linear":
        return nn.Linear(vision_width, llm_width)
    if match := _MLP.match(kind):
        layers: list[nn.Module] = [nn.Linear(vision_width, llm_width)]
        for _ in range(1, int(match.group(1))):
            layers += [nn.GELU(), nn.Linear(llm_width, llm_width)]
        return nn.Sequential(*layers)
    if kind == "identity":
        if vision_width != llm_width:
            raise ConfigError(f"mm_projector_type='identity' needs the tower width ({vision_width}) to equal the "
                              f"LLM width ({llm_width}); use 'linear' or 'mlp2x_gelu'")
        return IdentityMap()
    raise ConfigError(f"unknown mm_projector_type '{kind}'; use 'linear', 'mlp<N>x_gelu' or 'identity'")


def projector_state_dict(projector: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LLaVA's key layout: model.mm_projector.<index>.<weight|bias>, on CPU. Takes the projector or its
    own state dict (e.g. gathered from ZeRO-3 partitions)."""
    state = projector if isinstance(projector, dict) else projector.state_dict()
    return {PROJECTOR_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_projector(projector: nn.Module | dict[str, torch.Tensor], folder: str | Path,
                   extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write mm_projector.bin (LLaVA reads it with torch.load) and mm_projector.safetensors, atomically.
    `extra`: full-named weights stored beside the projector (LLaVA-NeXT's `model.image_newline`)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = projector_state_dict(projector) | {k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
    for name, write in (("mm_projector.bin", torch.save),
                        ("mm_projector.safetensors", lambda s, p: save_file(s, p, metadata={"format": "pt"}))):
        tmp = folder / f".{name}.tmp"
        write(state, str(tmp))
        tmp.replace(folder / name)
    return folder / "mm_projector.bin"


def read_projector_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Projector weights from a .safetensors or a LLaVA .bin, prefix stripped. Pickles are never run:
    .bin files are read with torch.load(weights_only=True), which only rebuilds tensors."""
    path, weights = _read_weights(path)
    stripped = {k.split("mm_projector.", 1)[1]: v for k, v in weights.items() if "mm_projector" in k}
    if not stripped:
        raise ConfigError(f"{path} holds no 'mm_projector' weights (keys: {sorted(weights)[:4]}...)")
    return stripped


def read_image_newline(path: str | Path) -> torch.Tensor | None:
    """LLaVA-NeXT's `image_newline` [D] from a projector or non-LoRA-trainables file, if it holds one."""
    _, weights = _read_weights(path)
    return next((v for k, v in weights.items() if k.endswith("image_newline")), None)


def _read_weights(path: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = Path(path)
    if path.is_dir():
        safe = path / "mm_projector.safetensors"
        path = safe if safe.is_file() else path / "mm_projector.bin"
    if not path.is_file():
        raise ConfigError(f"pretrain_mm_mlp_adapter: {path} does not exist; point it at the mm_projector.bin "
                          "(or .safetensors) written by pretraining")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        weights = load_file(str(path))
    else:
        weights = torch.load(str(path), map_location="cpu", weights_only=True)
    return path, weights


def _zero3_gather(params: list[nn.Parameter]):
    """Gather ZeRO-3-partitioned parameters (their local .data is empty) so rank 0 can write them."""
    if not any(hasattr(p, "ds_id") for p in params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def load_projector(projector: nn.Module, path: str | Path | dict[str, torch.Tensor]) -> None:
    """Load pretrained projector weights (a file, or the projector's own state dict read from a full
    checkpoint), checking widths first so a mismatch names both sides."""
    weights = dict(path) if isinstance(path, dict) else read_projector_file(path)
    path = "the checkpoint" if isinstance(path, dict) else path
    params = list(projector.parameters())
    with _zero3_gather(params):
        own = projector.state_dict()
        missing = sorted(set(own) - set(weights))
        unexpected = sorted(set(weights) - set(own))
        if missing or unexpected:
            raise ConfigError(f"projector file {path} does not match mm_projector_type "
                              f"(missing {missing}, unexpected {unexpected}); pretrain with the same "
                              "--mm_projector_type")
        first = min(k for k in weights if k.endswith("weight"))
        for key, tensor in weights.items():
            if own[key].shape != tensor.shape:
                hint = ""
                if key == first and tensor.ndim == 2 and own[key].ndim == 2:
                    hint = (f": the file maps {tensor.shape[1]}-wide vision features but this tower's hidden_size "
                            f"is {own[key].shape[1]}; pretrain a projector for this tower (LLaVA #559)")
                raise ConfigError(f"projector weight '{key}' has shape {tuple(tensor.shape)} in {path} but "
                                  f"{tuple(own[key].shape)} in the model{hint}")
        if not params or not hasattr(params[0], "ds_id") or _rank() == 0:
            projector.load_state_dict(weights)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
