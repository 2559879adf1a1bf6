"""Which vision encoders stage 2, the exports and the LLaVA tower accept, and how each is loaded.

    family   model_type (vision-only / whole model)   HF class            pooled output      CLS token
    clip     clip_vision_model / clip                 CLIPVisionModel     post-LN CLS        yes
    siglip   siglip_vision_model / siglip             SiglipVisionModel   attention-pool head no

SigLIP 2 comes in two forms: the fixed-resolution checkpoints (google/siglip2-*-patch16-224 ... -512)
are `siglip` folders and load here unchanged; the NaFlex ones (Siglip2VisionModel, model_type
siglip2*) take patchified pixels plus pixel_attention_mask and spatial_shapes, which stage 2 and the
LLaVA tower do not produce, so they are refused by name.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

# model_type -> family; the whole-model types (clip, siglip) hold the vision tower's weights too
FAMILIES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
MODEL_CLASSES = {"clip": ("CLIPVisionConfig", "CLIPVisionModel"), "siglip": ("SiglipVisionConfig", "SiglipVisionModel")}
PROCESSORS = {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}


def vision_family(config: dict, where: str = "this checkpoint") -> str:
    """'clip' or 'siglip' from a config dict (a vision-only or a whole-model config.json)."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if str(model_type).startswith("siglip2"):
        raise ConfigError(f"{where} is a SigLIP 2 NaFlex model ({model_type}), which needs variable-resolution "
                          "inputs this package does not produce; use a fixed-resolution SigLIP 2 checkpoint "
                          "(e.g. google/siglip2-so400m-patch14-384, model_type siglip) or a SigLIP/CLIP one")
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


def check_pooled(vision) -> None:
    """LLM2CLIP's image embedding is pooler_output, which SigLIP gives only with its attention-pool head."""
    config = vision.config
    if getattr(config, "model_type", None) == "siglip_vision_model" and not getattr(config, "vision_use_head", True):
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
