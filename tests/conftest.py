import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from llm2clip.data.synth import SynthConfig, synthesize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    """A small shapes-world dataset shared by the read-only tests (60 images, 32 px)."""
    out = tmp_path_factory.mktemp("world") / "data"
    synthesize(SynthConfig(num_images=60, image_size=32, shard_size=16), out, progress=False)
    return out


@pytest.fixture(scope="session")
def llava_parts(world, tmp_path_factory) -> dict:
    """Folders for LLaVA tests: a tiny causal LM, an exported-style CLIP vision tower, the world's data."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llm2clip.data.images import make_image_processor
    from tests.helpers import save_tiny_llm

    root = tmp_path_factory.mktemp("llava")
    lm = save_tiny_llm(root / "lm", world / "tokenizer", hidden_size=64, num_layers=2, causal_lm=True)
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(root / "run" / "vision_tower")
    make_image_processor(32).save_pretrained(root / "run" / "vision_tower")
    return {"lm": lm, "tower": root / "run" / "vision_tower", "run": root / "run", "data": world,
            "root": root}
