"""Image decoding that never crashes on bad bytes, and the CLIP/SigLIP image processors (no torchvision)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import ConfigError
from ..vision import PROCESSORS

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageSkip(Exception):
    """An image that must be skipped; `reason` is one of the stable skip-reason names."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_image(source: bytes | str | Path, max_pixels: int) -> Image.Image:
    """Decode to RGB. Raises ImageSkip('missing image file' | 'image too large' | 'unreadable image')."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
            with Image.open(fp) as im:
                width, height = im.size  # read from the header: nothing is decoded yet
                if width * height > max_pixels:
                    raise ImageSkip("image too large",
                                    f"{width}x{height} exceeds data.max_image_pixels={max_pixels}")
                return im.convert("RGB")  # decodes fully, so truncated files fail here, not later
    except FileNotFoundError:
        raise ImageSkip("missing image file", f"{source} does not exist") from None
    except Image.DecompressionBombError as e:
        raise ImageSkip("image too large", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageSkip("unreadable image", f"{type(e).__name__}: {e}") from None


def _processor_class(name: str):
    """transformers' `name` processor; without torchvision, its PIL-backed class (asked for directly to
    skip transformers' fallback warning)."""
    import transformers

    try:
        import torchvision  # noqa: F401

        return getattr(transformers, name)
    except ImportError:
        return getattr(transformers, name + "Pil")


def _pretrained_family(folder: Path) -> str:
    """'siglip' when the folder's preprocessor_config.json names a SigLIP processor, else 'clip'."""
    kind = str(json.loads((folder / "preprocessor_config.json").read_text()).get("image_processor_type", ""))
    if kind.startswith("Siglip2"):
        raise ConfigError(f"{folder}: a SigLIP 2 NaFlex image processor ({kind}) is not supported; use a "
                          "fixed-resolution SigLIP 2 checkpoint (SiglipImageProcessor)")
    return "siglip" if kind.startswith("Siglip") else "clip"


def make_image_processor(image_size: int = 224, pretrained: str | Path | None = None, family: str | None = None):
    """The image processor of a vision family (llm2clip.vision):

        clip    CLIPImageProcessor: resize shortest edge, center crop, OpenAI normalisation
        siglip  SiglipImageProcessor: resize to a square (no crop), mean = std = 0.5

    `pretrained`: a checkpoint folder with preprocessor_config.json, whose settings win; its processor
    type decides the family when `family` is None (default: clip).
    """
    config = Path(pretrained) / "preprocessor_config.json" if pretrained is not None else None
    if config is not None and config.is_file():
        return _processor_class(PROCESSORS[family or _pretrained_family(config.parent)]).from_pretrained(
            str(pretrained))
    if (family or "clip") == "siglip":
        return _processor_class("SiglipImageProcessor")(
            size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            do_convert_rgb=True)
    return _processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
