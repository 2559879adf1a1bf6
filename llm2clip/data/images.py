"""Image decoding that never crashes on bad bytes, and the CLIP image processor (no torchvision)."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

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


def make_image_processor(image_size: int = 224, pretrained: str | Path | None = None):
    """transformers' CLIP image processor: resize shortest edge, center crop, OpenAI normalisation.

    `pretrained`: a checkpoint folder with preprocessor_config.json, whose settings win. Without
    torchvision, transformers serves the PIL-backed class; we ask for it directly to skip its warning.
    """
    import transformers

    try:
        import torchvision  # noqa: F401

        cls = transformers.CLIPImageProcessor
    except ImportError:
        cls = transformers.CLIPImageProcessorPil
    if pretrained is not None and (Path(pretrained) / "preprocessor_config.json").is_file():
        return cls.from_pretrained(str(pretrained))
    return cls(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
