"""data.image_size is checked against the vision checkpoint before work; stage 2 has a device key
(issue #18, point 10)."""

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from llm2clip.config import load_config
from llm2clip.data.images import make_image_processor
from llm2clip.errors import ConfigError


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=64, patch_size=16))
    vision.save_pretrained(root / "bare")
    vision.save_pretrained(root / "with_processor")
    make_image_processor(64).save_pretrained(root / "with_processor")
    return root


@pytest.mark.parametrize("tower", ["bare", "with_processor"])
def test_data_image_size_must_match_the_vision_checkpoint(towers, tower):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [f"vision.model={towers / tower}", "data.image_size=336"])
    assert "data.image_size is 336 but vision.model" in str(e.value) and "image_size 64" in str(e.value)
    assert "data.image_size=64" in str(e.value) and "\n" not in str(e.value)
    assert load_config("configs/tiny.yaml", [f"vision.model={towers / tower}", "data.image_size=64"])


def test_stage2_device_is_a_key_and_reaches_training(monkeypatch):
    from llm2clip.stage2 import runs

    with pytest.raises(ConfigError, match=r"stage2\.device"):
        load_config("configs/tiny.yaml", ["stage2.device=gpu"])
    cfg = load_config("configs/tiny.yaml", ["stage2.device=cpu", "run.out_dir=/nonexistent/never-written"])
    seen = {}

    def fake_train(*args, device=None, **kwargs):
        seen["device"] = device
        raise RuntimeError("stop")

    monkeypatch.setattr(runs, "train_contrastive", fake_train)
    with pytest.raises(RuntimeError, match="stop"):
        runs._train(cfg, None, None, None, cfg.stage2.llm2clip, "llm2clip", "clip", False)
    assert seen["device"] == torch.device("cpu")
