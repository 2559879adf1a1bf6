"""Image decoding that never crashes on bad bytes, and the CLIP/SigLIP image processors (no torchvision)."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

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


def _square(image_size: int, saved: dict):
    """SigLIP's processor: resize to image_size x image_size (no crop), then normalise."""
    return _processor_class("SiglipImageProcessor")(
        size={"height": image_size, "width": image_size}, image_mean=list(saved.get("image_mean", [0.5] * 3)),
        image_std=list(saved.get("image_std", [0.5] * 3)), resample=saved.get("resample", 3), do_convert_rgb=True)


def make_image_processor(image_size: int = 224, pretrained: str | Path | None = None, family: str | None = None):
    """The image processor of a vision family (llm2clip.vision), one [3, H, W] tensor per image:

        clip     CLIPImageProcessor: resize shortest edge, center crop, OpenAI normalisation
        siglip   SiglipImageProcessor: resize to a square (no crop), mean = std = 0.5
        siglip2  the same square, bilinear as Siglip2ImageProcessor (the model patchifies it)

    `pretrained`: a checkpoint folder with preprocessor_config.json, whose settings win (a SigLIP 2
    NaFlex one lends its normalisation and resampling to the square at image_size); its processor type
    decides the family when `family` is None (default: clip).
    """
    config = Path(pretrained) / "preprocessor_config.json" if pretrained is not None else None
    if config is not None and config.is_file():
        saved = json.loads(config.read_text())
        kind = str(saved.get("image_processor_type", ""))
        if kind.startswith("Siglip2"):
            return _square(image_size, saved)
        family = family or ("siglip" if kind.startswith("Siglip") else "clip")
        return _processor_class(PROCESSORS[family]).from_pretrained(str(pretrained))
    if family in ("siglip", "siglip2"):
        return _square(image_size, {"resample": 2} if family == "siglip2" else {})  # PIL bilinear / bicubic
    return _processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def naflex_processor(square, patch_size: int):
    """The Siglip2ImageProcessor that gives a SigLIP 2 model what `square` + llm2clip.vision.vision_inputs
    give it for square images: the (size / patch)^2 grid, same normalisation and resampling."""
    side = square.size["height"] // patch_size
    return _processor_class("Siglip2ImageProcessor")(
        patch_size=patch_size, max_num_patches=side * side, image_mean=list(square.image_mean),
        image_std=list(square.image_std), resample=square.resample)

