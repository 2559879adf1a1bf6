"""LLaVA-style MLLM integration for the LLM2CLIP vision tower (docs/LLAVA.md).

    from llava_integration import build_vision_tower, build_vision_projector
    tower = build_vision_tower(args)            # args.vision_tower = 'llm2clip' | 'clip' | folder | openai/...
    features = tower(images)                    # [B, N, C]

Uses only `llm2clip`'s public API and the folders its main job exports.
"""

from .builder import build_vision_tower, resolve_vision_tower
from .checkpoint import load_pretrained_model
from .constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .model import LlavaForCausalLM
from .projector import build_vision_projector, load_projector, save_projector
from .tower import LLM2CLIPVisionTower

__all__ = [
    "DEFAULT_IMAGE_TOKEN",
    "IGNORE_INDEX",
    "IMAGE_TOKEN_INDEX",
    "LLM2CLIPVisionTower",
    "LlavaForCausalLM",
    "build_vision_projector",
    "build_vision_tower",
    "load_pretrained_model",
    "load_projector",
    "resolve_vision_tower",
    "save_projector",
]
