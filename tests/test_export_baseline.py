"""`llm2clip export` writes the CLIP baseline's tower as `llm2clip run` does (issue #18, point 7)."""

import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from llm2clip.cli import main
from llm2clip.model import LLM2CLIP, ModelConfig

VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 16}


def _trained(run):
    torch.manual_seed(0)
    LLM2CLIP(CLIPVisionModel(CLIPVisionConfig(**VISION)), 8, ModelConfig(embed_dim=8, adapter_depth=0)
             ).save_pretrained(run / "stage2/llm2clip/model")


def test_export_writes_clip_vision_tower_when_the_baseline_exists(tmp_path, capsys):
    _trained(tmp_path)
    argv = ["export", "--config", "configs/tiny.yaml", "--set", f"run.out_dir={tmp_path}", "--no-progress"]
    assert main(argv) == 0
    assert "not written" in capsys.readouterr().out and not (tmp_path / "clip_vision_tower").exists()
    text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 50}
    CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=8)).save_pretrained(
        tmp_path / "stage2/clip_finetune/model")
    assert main(argv) == 0
    tower = CLIPVisionModel.from_pretrained(tmp_path / "clip_vision_tower")
    assert tower.config.hidden_size == 16 and (tmp_path / "clip_vision_tower/preprocessor_config.json").is_file()
