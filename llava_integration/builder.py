"""`build_vision_tower(cfg)` with LLaVA's routing, plus the names of the main job's towers.

    'llm2clip'  -> <run dir>/vision_tower         the LLM2CLIP vision encoder (bash scripts/train_llm2clip.sh)
    'clip'      -> <run dir>/clip_vision_tower    the CLIP baseline of the same run, same data and steps
    a local folder (exported tower, whole LLM2CLIP folder, HF CLIP folder)
    'openai/...' or 'laion/...' hub names       -> plain HF CLIP, as LLaVA loads them
    hub names containing 'siglip'               -> plain HF SigLIP, as LLaVA-NeXT routes them

The run dir is `llm2clip_run_dir` on the config, else $LLM2CLIP_RUN_DIR, else runs/tiny. Any other
name is refused like LLaVA does ("Unknown vision tower"), but the message says how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm2clip.errors import ConfigError

from .tower import LLM2CLIPVisionTower

RUN_TOWERS = {"llm2clip": "vision_tower", "clip": "clip_vision_tower"}
HUB_PREFIXES = ("openai", "laion")  # LLaVA's rule: the name starts with either


def run_dir(cfg=None) -> Path:
    return Path(getattr(cfg, "llm2clip_run_dir", None) or os.environ.get("LLM2CLIP_RUN_DIR") or "runs/tiny")


def resolve_vision_tower(name: str, cfg=None) -> str:
    """The folder or hub name a tower name stands for; raises ConfigError with the fix when unusable."""
    if name in RUN_TOWERS:
        folder = run_dir(cfg) / RUN_TOWERS[name]
        if not (folder / "config.json").is_file():
            raise ConfigError(f"vision tower '{name}' is the export {folder}, which does not exist; write it with "
                              f"`llm2clip export --config <your run's config>` (or `bash scripts/train_llm2clip.sh` "
                              f"for the tiny run), or pass --llm2clip_run_dir / LLM2CLIP_RUN_DIR for another run")
        return str(folder)
    if os.path.exists(name):
        if not (Path(name) / "config.json").is_file():
            raise ConfigError(f"vision tower folder {name} has no config.json; export one with "
                              "llm2clip's export_vision_tower or point at an HF CLIP folder")
        return name
    if name.startswith(HUB_PREFIXES) or "ShareGPT4V" in name or "siglip" in name.lower():
        return name
    raise ConfigError(f"Unknown vision tower: '{name}'. Use 'llm2clip', 'clip', a local folder, or an "
                      "'openai/...'/'laion/...' CLIP or a '...siglip...' name; a checkpoint moved from another "
                      "machine needs its config.json 'mm_vision_tower' pointed at a local path")


def build_vision_tower(vision_tower_cfg, **kwargs) -> LLM2CLIPVisionTower:
    """LLaVA's builder: reads `mm_vision_tower` (a saved config) or `vision_tower` (ModelArguments)."""
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if not name:
        raise ConfigError("no vision tower configured: pass --vision_tower llm2clip (or a folder)")
    return LLM2CLIPVisionTower(resolve_vision_tower(str(name), vision_tower_cfg), args=vision_tower_cfg, **kwargs)
