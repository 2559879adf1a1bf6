"""The vision tower: LLaVA's `CLIPVisionTower` contract, loading LLM2CLIP towers and plain CLIP alike.

One class satisfies LLaVA, LLaVA-NeXT, ShareGPT4V, Bunny, MGM and Cambrian (docs/LLAVA.md):

    tower = LLM2CLIPVisionTower("runs/tiny/vision_tower", args)   # args.mm_vision_select_layer ...
    features = tower(images)     # [B, 3, H, W] or a list of [3, H, W]  ->  [B, N, C], input dtype

It loads (1) our exported vision folder, (2) a whole LLM2CLIP folder (its vision encoder),
(3) any standard HF CLIP or SigLIP folder, vision-only or a whole model, local or a hub name.
SigLIP has no CLS token: `patch` keeps every token (LLaVA-NeXT's SigLipVisionTower: 729 for
so400m-384 at the penultimate layer) and `cls_patch` is refused.
Gradients follow `unfreeze_mm_vision_tower` (LLaVA-NeXT, Cambrian) instead of a hard `no_grad`, and
the forward pass autocasts when the tower's parameters have mixed dtypes (QLoRA casts every '*norm*'
module to fp32 while the rest is bf16: LLaVA #1712, #785, #774).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from llm2clip.errors import ConfigError
from llm2clip.vision import FAMILIES, has_cls_token, read_config, vision_config_from_dict, vision_family

SELECT_FEATURES = ("patch", "cls_patch")


def folder_kind(path: str | Path) -> str | None:
    """'llm2clip' for a whole LLM2CLIP folder, 'clip' / 'siglip' for an HF CLIP / SigLIP folder (vision-only
    or whole model), None otherwise."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    model_type = json.loads(config.read_text()).get("model_type")
    return "llm2clip" if model_type == "llm2clip" else FAMILIES.get(model_type)


def _image_processor(name: str, config):
    """The folder's image processor of the tower's family (transformers' PIL-backed class when torchvision
    is absent). A SigLIP processor resizes to a square and has no crop_size, which LLaVA reads for
    text-only samples (`crop_size['height']`): it gets the square size, as LLaVA-NeXT's SigLIP one has."""
    from llm2clip.data.images import make_image_processor

    family = vision_family(config.to_dict())
    if Path(name).is_dir():
        processor = make_image_processor(config.image_size, pretrained=name, family=family)
    else:
        processor = type(make_image_processor(family=family)).from_pretrained(name)
    if getattr(processor, "crop_size", None) is None:
        processor.crop_size = {"height": processor.size["height"], "width": processor.size["width"]}
    return processor


def _arg(args, cfg, name: str, default):
    """LLaVA passes ModelArguments as `args`; LLaVA-NeXT's SigLIP path passes `vision_tower_cfg`."""
    for source in (args, cfg):
        if source is not None and getattr(source, name, None) is not None:
            return getattr(source, name)
    return default


class LLM2CLIPVisionTower(nn.Module):
    def __init__(self, vision_tower: str, args=None, delay_load: bool = False, vision_tower_cfg=None):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = str(vision_tower)
        self.select_layer = int(_arg(args, vision_tower_cfg, "mm_vision_select_layer", -2))
        self.select_feature = _arg(args, vision_tower_cfg, "mm_vision_select_feature", "patch")
        self.unfreeze_mm_vision_tower = bool(_arg(args, vision_tower_cfg, "unfreeze_mm_vision_tower", False))
        if self.select_feature not in SELECT_FEATURES:
            raise ConfigError(f"mm_vision_select_feature='{self.select_feature}' is not supported; "
                              f"use one of {SELECT_FEATURES}")
        if not delay_load or self.unfreeze_mm_vision_tower:
            self.load_model()
        else:
            self.cfg_only = self._load_config()
            self._set_family(self.cfg_only)

    # -- loading ------------------------------------------------------------------------------------
    def _load_config(self) -> PretrainedConfig:
        config = read_config(self.vision_tower_name)
        if config.get("model_type") == "llm2clip":
            return vision_config_from_dict(config["vision_config"])
        if "vision_config" in config and config.get("model_type") in ("clip", "siglip"):  # a whole CLIP/SigLIP
            config = {**config["vision_config"], "model_type": config["model_type"] + "_vision_model"}
        return vision_config_from_dict(config)

    def _set_family(self, config) -> None:
        if config.model_type == "siglip2_vision_model":
            raise ConfigError(f"{self.vision_tower_name} is a SigLIP 2 NaFlex tower, which takes patchified inputs "
                              "that LLaVA and HF Llava do not produce; use a SigLIP or CLIP tower (a fixed-resolution "
                              "SigLIP 2 checkpoint is a SigLIP one)")
        self.has_cls = has_cls_token(config)
        if self.select_feature == "cls_patch" and not self.has_cls:
            raise ConfigError(f"mm_vision_select_feature='cls_patch' needs a CLS token, which the SigLIP tower "
                              f"{self.vision_tower_name} has none of; use 'patch' (all of its tokens)")

    def load_model(self, device_map=None) -> None:
        if self.is_loaded:  # idempotent: LLaVA's builder and initialize_vision_modules both call it
            return
        name = self.vision_tower_name
        if folder_kind(name) == "llm2clip":
            from llm2clip.model import LLM2CLIP

            model = LLM2CLIP.from_pretrained(name).vision
        else:
            from llm2clip.vision import load_vision_model

            model = load_vision_model(name, device_map=device_map)
        self._set_family(model.config)
        self.image_processor = _image_processor(name, model.config)
        self.vision_tower = model
        self.vision_tower.requires_grad_(self.unfreeze_mm_vision_tower)
        self.is_loaded = True

    # -- forward ------------------------------------------------------------------------------------
    def feature_select(self, outputs) -> torch.Tensor:
        features = outputs.hidden_states[self.select_layer]  # [B, 1 + N, C] (CLIP) or [B, N, C] (SigLIP)
        return features[:, 1:] if self.select_feature == "patch" and self.has_cls else features

    def _mixed_dtypes(self) -> bool:
        return len({p.dtype for p in self.vision_tower.parameters()}) > 1

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if self._mixed_dtypes():  # fp32 norms among bf16 linears: let autocast pick per op
            low = min((p.dtype for p in self.vision_tower.parameters()), key=lambda d: torch.finfo(d).bits)
            with torch.autocast(self.device.type, dtype=low):
                return self.feature_select(self.vision_tower(pixels, output_hidden_states=True))
        return self.feature_select(self.vision_tower(pixels, output_hidden_states=True))

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        with torch.set_grad_enabled(self.unfreeze_mm_vision_tower and torch.is_grad_enabled()):
            if isinstance(images, list):  # LLaVA's list path: one [3, H, W] (or [1, 3, H, W]) per image
                return torch.cat([self._encode(im.reshape(1, *im.shape[-3:])).to(im.dtype) for im in images])
            return self._encode(images).to(images.dtype)  # [B, N, C]

    # -- properties ---------------------------------------------------------------------------------
    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        if not self.is_loaded:
            return torch.float32
        # The dtype of the patch embedding: the tower's compute dtype even when norms were upcast.
        return self.vision_tower.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device if self.is_loaded else torch.device("cpu")

    @property
    def config(self) -> PretrainedConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side ** 2
