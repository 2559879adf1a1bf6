"""LLM2CLIP starts from the pretrained CLIP's logit scale, as the official one does (issue #18, point 11)."""

import math

import pytest
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from llm2clip.config import load_config
from llm2clip.stage2.runs import build_llm2clip

VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 16}


@pytest.fixture(scope="module")
def clip_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 50}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=8, logit_scale_init_value=4.0))
    clip.save_pretrained(root / "clip")
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "vision_only")
    return root


def _scale(folder, *sets):
    cfg = load_config("configs/tiny.yaml", [f"vision.model={folder}", "stage2.clip_pretrain.enabled=false",
                                            "data.image_size=32", "stage2.model.embed_dim=8", *sets])
    return build_llm2clip(cfg, 8, None).logit_scale.item()


def test_llm2clip_inherits_the_pretrained_clips_logit_scale(clip_folders):
    assert _scale(clip_folders / "clip") == pytest.approx(4.0)
    assert _scale(clip_folders / "clip", "stage2.model.inherit_logit_scale=false") == pytest.approx(math.log(1 / 0.07))


def test_a_vision_only_source_keeps_init_logit_scale(clip_folders):
    assert _scale(clip_folders / "vision_only", "stage2.model.init_logit_scale=3.0") == pytest.approx(3.0)


def test_siglip_loss_keeps_its_own_start(clip_folders):
    assert _scale(clip_folders / "clip", "stage2.model.loss=siglip") == pytest.approx(math.log(10))
