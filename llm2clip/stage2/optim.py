"""The stage-2 optimizer: AdamW with open_clip's parameter groups (no decay on norms, biases and the
logit scale/bias), a learning rate per side (vision, text, fresh heads), and optional layer-wise lr
decay on the vision tower as EVA-CLIP / the official LLM2CLIP assign it; transformers' cosine schedule.
"""

from __future__ import annotations

import re

import torch

from ..errors import ConfigError


def _side(name: str) -> str:
    """Which learning rate a parameter trains with: 'vision', 'text' or 'head' (freshly initialised)."""
    if name.startswith("heads."):
        return "head"
    return "text" if name.startswith(("text_adapter.", "clip.text_model.", "clip.text_projection.")) else "vision"


_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def vision_tower(model: torch.nn.Module, section: str = "stage2.llm2clip") -> tuple[str, int]:
    """(name prefix, encoder layers) of the model's one vision transformer: the vision-side module whose
    direct children include `embeddings` and `encoder` (transformers' CLIP/SigLIP vision models in 4.x
    and 5.x layouts, inside LLM2CLIP, CLIPModel or peft). Frozen layers count."""
    towers = [(f"{prefix}." if prefix else "", len(mod.encoder.layers)) for prefix, mod in model.named_modules()
              if {"embeddings", "encoder"} <= mod._modules.keys() and hasattr(mod.encoder, "layers")
              and _side(f"{prefix}.") == "vision"]
    if len(towers) != 1:
        raise ConfigError(f"{section}.layer_decay needs one vision encoder (a module with embeddings and "
                          f"encoder.layers), found {len(towers)}. Fix: set {section}.layer_decay=1.0")
    return towers[0]


def vision_layer_id(name: str, tower: str, num_layers: int) -> int:
    """The layer id of a vision-side parameter for layer-wise lr decay, as EVA-CLIP / the official
    LLM2CLIP number them: 0 for the embeddings (patch, position, class) and CLIP's pre-LayerNorm, i + 1
    for encoder layer i, num_layers + 1 for everything after the last layer (post-LayerNorm, SigLIP's
    pooling head, the visual projection, the logit scale/bias). `tower`: the vision encoder's name
    prefix (`vision_tower`)."""
    rest = name[len(tower):] if name.startswith(tower) else ""
    if rest.startswith(("embeddings.", "pre_layrnorm.")):
        return 0
    match = _LAYER.match(rest)
    return int(match.group(1)) + 1 if match else num_layers + 1


def make_optimizer(model: torch.nn.Module, cfg, section: str = "stage2.llm2clip"):
    """AdamW with open_clip's groups: no decay on norms, biases and the logit scale/bias; the text side
    and fresh heads may have their own learning rates. With `layer_decay` < 1 the vision side is split
    further by layer id (`vision_layer_id`), each group's lr scaled by decay^(num_layers + 1 - id) as
    in EVA-CLIP's optim.py; the schedule then multiplies every group's lr by the same factor."""
    from transformers import get_cosine_schedule_with_warmup

    by_layer = cfg.layer_decay < 1.0
    tower, num_layers = vision_tower(model, section) if by_layer else ("", 0)
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            side = _side(name)
            key: tuple = (side, p.ndim >= 2 and "logit_" not in name)
            if by_layer and side == "vision":
                key += (vision_layer_id(name, tower, num_layers),)
            groups.setdefault(key, []).append(p)
    text_lr = cfg.lr if cfg.text_lr is None else cfg.text_lr
    lrs = {"vision": cfg.lr, "text": text_lr, "head": text_lr if cfg.head_lr is None else cfg.head_lr}

    def lr(key: tuple) -> float:
        scale = cfg.layer_decay ** (num_layers + 1 - key[2]) if len(key) == 3 else 1.0
        return lrs[key[0]] * scale

    param_groups = [{"params": params, "lr": lr(key), "weight_decay": cfg.weight_decay if key[1] else 0.0}
                    for key, params in sorted(groups.items())]
    # fused: one kernel for all tensors (4x faster than the per-tensor default on CPU, where torch
    # does not pick it by itself)
    fused = all(p.device.type in ("cpu", "cuda") for g in param_groups for p in g["params"])
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                  fused=fused)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps)
