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
