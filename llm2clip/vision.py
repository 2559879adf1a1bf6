"""Which vision encoders stage 2, the exports and the LLaVA tower accept, and how each is loaded.

    family   model_type (vision-only / whole model)   HF class            pooled output       CLS token
    clip     clip_vision_model / clip                 CLIPVisionModel     post-LN CLS         yes
    siglip   siglip_vision_model / siglip             SiglipVisionModel   attention-pool head no
    siglip2  siglip2_vision_model / siglip2           Siglip2VisionModel  attention-pool head no

SigLIP 2 comes in two forms: the fixed-resolution checkpoints (e.g. google/siglip2-so400m-patch14-384)
are `siglip` folders and load as SigLIP; the NaFlex ones (Siglip2VisionModel) take patchified pixels
[B, N, p*p*3] with pixel_attention_mask and spatial_shapes. Stage 2 feeds them square images at
data.image_size, patchified in `vision_inputs` exactly as Siglip2ImageProcessor does (a full grid, no
padding), and their export carries a Siglip2ImageProcessor for that grid. The LLaVA tower refuses
them: LLaVA feeds fixed [B, 3, H, W] images and HF Llava cannot pass the NaFlex inputs.
"""

from __future__ import annotations

import math
from pathlib import Path

from .errors import ConfigError

# model_type -> family; the whole-model types (clip, siglip, siglip2) hold the vision tower's weights too
FAMILIES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip",
            "siglip2_vision_model": "siglip2", "siglip2": "siglip2"}
MODEL_CLASSES = {"clip": ("CLIPVisionConfig", "CLIPVisionModel"), "siglip": ("SiglipVisionConfig", "SiglipVisionModel"),
                 "siglip2": ("Siglip2VisionConfig", "Siglip2VisionModel")}
# the processor stage 2 reads images with ([3, H, W] each); SigLIP 2's patchifying one is only exported
PROCESSORS = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor", "siglip2": "SiglipImageProcessor"}
POOLED_BY_HEAD = ("siglip_vision_model", "siglip2_vision_model")


def vision_family(config: dict, where: str = "this checkpoint") -> str:
    """'clip', 'siglip' or 'siglip2' from a config dict (a vision-only or a whole-model config.json)."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    raise ConfigError(f"{where} has model_type {model_type!r}; the vision encoder must be a CLIP or SigLIP "
                      f"checkpoint (model_type one of {sorted(FAMILIES)})")


def read_config(name: str | Path) -> dict:
    """config.json of a local folder or hub name, as a dict (no weights read)."""
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(str(name))[0]
    except OSError as e:
        raise ConfigError(f"cannot read the vision checkpoint's config.json at {name}: "
                          f"{str(e).splitlines()[0]}") from None


def checkpoint_family(name: str | Path) -> str:
    return vision_family(read_config(name), str(name))


def vision_classes(family: str):
    """(config class, model class) of a family."""
    import transformers

    config_class, model_class = MODEL_CLASSES[family]
    return getattr(transformers, config_class), getattr(transformers, model_class)


def vision_config_from_dict(config: dict):
    """The vision-only config of a vision_config dict (LLM2CLIP folders store one)."""
    config_class, _ = vision_classes(vision_family(config, "vision_config"))
    return config_class.from_dict(config)


def build_vision(config: dict):
    """A randomly initialised vision model of a vision_config dict (weights are loaded after)."""
    _, model_class = vision_classes(vision_family(config, "vision_config"))
    return model_class(vision_config_from_dict(config))


def has_cls_token(config) -> bool:
    """CLIP prepends a CLS token to the patch tokens; SigLIP has patch tokens only."""
    return vision_family(config.to_dict() if hasattr(config, "to_dict") else config) == "clip"


def image_size(config) -> int:
    """The square input side of a vision config; SigLIP 2 has none, so its native grid's (num_patches)."""
    if hasattr(config, "image_size"):
        return config.image_size
    side = math.isqrt(config.num_patches)
    return side * config.patch_size


def vision_inputs(config, pixels) -> dict:
    """Keyword inputs of the vision model for square images pixels [B, 3, H, W].

    SigLIP 2 (NaFlex) gets Siglip2ImageProcessor's layout: patches [B, N, p*p*3] in row-major grid
    order, each patch's pixels row by row with the channels last, every patch valid."""
    if getattr(config, "model_type", None) != "siglip2_vision_model":
        return {"pixel_values": pixels}
    import torch  # here: data readers import this module and need no torch

    p = config.patch_size
    b, c, h, w = pixels.shape
    if h % p or w % p:
        raise ConfigError(f"SigLIP 2 takes images whose sides are multiples of its patch size {p}, got {h}x{w}; "
                          f"set data.image_size to a multiple of {p}")
    patches = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # [B, H/p, W/p, p, p, 3]
    patches = patches.reshape(b, (h // p) * (w // p), p * p * c)  # [B, N, p*p*3]
    mask = torch.ones(patches.shape[:2], dtype=torch.long, device=pixels.device)  # [B, N]
    shapes = torch.tensor([[h // p, w // p]], device=pixels.device).expand(b, 2)  # [B, 2]
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def check_pooled(vision) -> None:
    """LLM2CLIP's image embedding is pooler_output, which SigLIP gives only with its attention-pool head."""
    config = vision.config
    if getattr(config, "model_type", None) in POOLED_BY_HEAD and not getattr(config, "vision_use_head", True):
        raise ConfigError("this SigLIP vision model has vision_use_head=false, so no pooled image embedding; "
                          "use a checkpoint with its attention-pooling head (the SigLIP default)")


def load_vision_model(name: str | Path, **kwargs):
    """The vision encoder of a CLIP/SigLIP folder or hub name, vision-only or a whole CLIP/SiglipModel.

    A whole-model folder holds the text tower too: those keys are expected to go unused, so the load
    report is silenced and missing vision keys are checked here instead."""
    from transformers.utils import logging as hf_logging

    _, model_class = vision_classes(checkpoint_family(name))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        vision, info = model_class.from_pretrained(str(name), output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ConfigError(f"{name} lacks vision weights {sorted(info['missing_keys'])[:5]}: point it at a CLIP/SigLIP "
                          "or CLIP/SigLIP-vision folder")
    return vision
