"""Exports of a trained LLM2CLIP model.

- `export_vision_tower`: a standard HF CLIP vision folder (config.json with model_type
  'clip_vision_model', model.safetensors, preprocessor_config.json). `CLIPVisionModel.from_pretrained`
  and `CLIPImageProcessor.from_pretrained` load it unchanged, which is what LLaVA-style repos do. It is
  written in the hub's layout (`vision_model.*`) so transformers 4.x reads it too (llm2clip/portable.py).
- `export_model`: the whole model (vision, projection, adapter, logit scale) as an LLM2CLIP folder,
  loaded with `LLM2CLIP.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError
from .files import atomic_dir
from .model import LLM2CLIP
from .portable import ExportError, save_portable


def load_clip_vision(name: str | Path, **kwargs):
    """`CLIPVisionModel.from_pretrained` on a CLIP-vision or full CLIPModel folder (or hub name).

    A full CLIP folder holds the text tower too: those keys are expected to go unused, so the load report
    is silenced and missing vision keys are checked here instead."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        vision, info = CLIPVisionModel.from_pretrained(str(name), output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ConfigError(f"{name} lacks vision weights {sorted(info['missing_keys'])[:5]}: point it at a CLIP "
                          "or CLIP-vision folder")
    return vision


def export_vision_tower(model: LLM2CLIP | str | Path, out: str | Path, image_processor=None) -> Path:
    """Write the vision encoder of `model` (an LLM2CLIP, its folder, or an HF CLIPModel folder such as the
    baseline's) as a plain CLIPVisionModel folder."""
    from .data.images import make_image_processor

    if not isinstance(model, LLM2CLIP):
        folder = Path(model)
        if json.loads((folder / "config.json").read_text()).get("model_type") == "clip":
            vision = load_clip_vision(folder)  # a plain CLIPModel folder: the baseline
        else:
            vision = LLM2CLIP.from_pretrained(folder).vision
        image_processor = image_processor or make_image_processor(vision.config.image_size, pretrained=folder)
    else:
        vision = model.vision
    if image_processor is None:
        image_processor = make_image_processor(vision.config.image_size)
    with atomic_dir(out) as tmp:
        save_portable(vision, tmp, image_processor)  # hub layout, reloaded and checked before the rename
    return Path(out)


def export_model(model: LLM2CLIP | str | Path, out: str | Path, image_processor=None) -> Path:
    """Write the whole model as an LLM2CLIP folder (atomically)."""
    if not isinstance(model, LLM2CLIP):
        from .data.images import make_image_processor

        image_processor = image_processor or make_image_processor(pretrained=Path(model))
        model = LLM2CLIP.from_pretrained(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, image_processor)
        verify_model_folder(tmp, model)
    return Path(out)


def verify_model_folder(folder: str | Path, model: LLM2CLIP) -> None:
    """Reload an LLM2CLIP folder and require the same tensors as `model`: refuse to finish otherwise."""
    reloaded = LLM2CLIP.from_pretrained(folder).state_dict()
    for name, tensor in model.state_dict().items():
        if name not in reloaded or not torch.equal(reloaded[name], tensor.detach().cpu().to(reloaded[name].dtype)):
            raise ExportError(f"{folder}: {name} does not reload as saved; the folder is not usable")
