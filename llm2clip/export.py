"""Exports of a trained LLM2CLIP model.

- `export_vision_tower`: a standard HF vision folder of the model's family (config.json with model_type
  'clip_vision_model', 'siglip_vision_model' or 'siglip2_vision_model', model.safetensors in the hub's
  layout, preprocessor_config.json). `CLIPVisionModel` / `Siglip(2)VisionModel.from_pretrained` and the matching
  image processor load it unchanged, which is what LLaVA-style repos do. transformers 4.x reads it
  too (llm2clip/portable.py).
- `export_model`: the whole model (vision, projection, adapter, logit scale) as an LLM2CLIP folder,
  loaded with `LLM2CLIP.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import atomic_dir
from .model import LLM2CLIP
from .portable import ExportError, save_portable
from .vision import image_size, load_vision_model, vision_family


def export_vision_tower(model: LLM2CLIP | str | Path, out: str | Path, image_processor=None) -> Path:
    """Write the vision encoder of `model` (an LLM2CLIP, its folder, or an HF CLIPModel folder such as the
    baseline's) as a plain CLIP/Siglip/Siglip2VisionModel folder. SigLIP 2 (NaFlex) gets the
    Siglip2ImageProcessor equivalent of the square processor it was trained with."""
    from .data.images import make_image_processor, naflex_processor

    if not isinstance(model, LLM2CLIP):
        folder = Path(model)
        if json.loads((folder / "config.json").read_text()).get("model_type") == "clip":
            vision = load_vision_model(folder)  # a plain CLIPModel folder: the baseline
        else:
            vision = LLM2CLIP.from_pretrained(folder).vision
        image_processor = image_processor or make_image_processor(image_size(vision.config), pretrained=folder,
                                                                  family=vision_family(vision.config.to_dict()))
    else:
        vision = model.vision
    family = vision_family(vision.config.to_dict())
    if image_processor is None:
        image_processor = make_image_processor(image_size(vision.config), family=family)
    if family == "siglip2" and not type(image_processor).__name__.startswith("Siglip2"):
        image_processor = naflex_processor(image_processor, vision.config.patch_size)
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
