"""Exports of a trained LLM2CLIP model.

- `export_vision_tower`: a standard HF CLIP vision folder (config.json with model_type
  'clip_vision_model', model.safetensors, preprocessor_config.json). `CLIPVisionModel.from_pretrained`
  and `CLIPImageProcessor.from_pretrained` load it unchanged, which is what LLaVA-style repos do.
- `export_model`: the whole model (vision, projection, adapter, logit scale) as an LLM2CLIP folder,
  loaded with `LLM2CLIP.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from .model import LLM2CLIP
from .stage1.common import atomic_dir


def export_vision_tower(model: LLM2CLIP | str | Path, out: str | Path, image_processor=None) -> Path:
    """Write the vision encoder of `model` (an LLM2CLIP or its folder) as a plain CLIPVisionModel folder."""
    from .data.images import make_image_processor

    if not isinstance(model, LLM2CLIP):
        folder = Path(model)
        model = LLM2CLIP.from_pretrained(folder)
        image_processor = image_processor or make_image_processor(pretrained=folder)
    if image_processor is None:
        size = model.vision.config.image_size
        image_processor = make_image_processor(size)
    with atomic_dir(out) as tmp:
        model.vision.save_pretrained(str(tmp))
        image_processor.save_pretrained(str(tmp))
    return Path(out)


def export_model(model: LLM2CLIP | str | Path, out: str | Path, image_processor=None) -> Path:
    """Write the whole model as an LLM2CLIP folder (atomically)."""
    if not isinstance(model, LLM2CLIP):
        from .data.images import make_image_processor

        image_processor = image_processor or make_image_processor(pretrained=Path(model))
        model = LLM2CLIP.from_pretrained(model)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, image_processor)
    return Path(out)
