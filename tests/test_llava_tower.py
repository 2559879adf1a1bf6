"""The vision tower contract (LLaVA, LLaVA-NeXT, ShareGPT4V, Bunny, MGM, Cambrian) and the projector."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModel

from llava_integration.builder import build_vision_tower, resolve_vision_tower
from llava_integration.model import LlavaForCausalLM
from llava_integration.projector import build_vision_projector, load_projector, read_projector_file, save_projector
from llava_integration.tower import LLM2CLIPVisionTower
from llm2clip.errors import ConfigError


def _args(**kw):
    return SimpleNamespace(mm_vision_select_layer=kw.pop("layer", -2), mm_vision_select_feature=kw.pop("feature",
                           "patch"), **kw)


def test_tower_contract_matches_hf_hidden_states(llava_parts):
    tower = LLM2CLIPVisionTower(str(llava_parts["tower"]), _args())
    reference = CLIPVisionModel.from_pretrained(llava_parts["tower"]).eval()
    images = torch.randn(3, 3, 32, 32)
    features = tower(images)
    expected = reference(images, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert features.shape == (3, 16, 32)
    torch.testing.assert_close(features, expected)
    # properties of the shared contract
    assert tower.is_loaded and tower.hidden_size == 32 and tower.image_size == 32 and tower.patch_size == 8
    assert tower.num_patches_per_side == 4 and tower.num_patches == 16
    assert tower.dtype == torch.float32 and tower.device.type == "cpu" and tower.config.hidden_size == 32
    assert tower.dummy_feature.shape == (1, 32)
    assert isinstance(tower.image_processor, CLIPImageProcessor)
    assert tower.image_processor.crop_size == {"height": 32, "width": 32}
    # a list of [3, H, W] images gives the same features as the batch
    torch.testing.assert_close(tower([im for im in images]), features)
    # cls_patch keeps the CLS token; another select layer reads another hidden state
    cls = LLM2CLIPVisionTower(str(llava_parts["tower"]), _args(feature="cls_patch", layer=-1))
    torch.testing.assert_close(cls(images), reference(images, output_hidden_states=True).hidden_states[-1])
    with pytest.raises(ConfigError, match="mm_vision_select_feature"):
        LLM2CLIPVisionTower(str(llava_parts["tower"]), _args(feature="cls"))


def test_delay_load_and_idempotent_load(llava_parts):
    tower = LLM2CLIPVisionTower(str(llava_parts["tower"]), delay_load=True, vision_tower_cfg=_args(layer=-1))
    assert not tower.is_loaded and tower.select_layer == -1
    assert tower.config.hidden_size == 32 and tower.num_patches == 16  # from cfg_only, nothing loaded
    tower.load_model()
    inner = tower.vision_tower
    tower.load_model(device_map=None)
    assert tower.is_loaded and tower.vision_tower is inner


def test_output_dtype_follows_input_and_gradients_follow_unfreeze(llava_parts):
    frozen = LLM2CLIPVisionTower(str(llava_parts["tower"]), _args())
    frozen.to(torch.bfloat16)
    out = frozen(torch.randn(2, 3, 32, 32))  # fp32 in, bf16 tower
    assert out.dtype == torch.float32 and not out.requires_grad
    assert frozen(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
    trainable = LLM2CLIPVisionTower(str(llava_parts["tower"]), _args(unfreeze_mm_vision_tower=True))
    trainable(torch.randn(2, 3, 32, 32)).sum().backward()
    grad = trainable.vision_tower.get_input_embeddings().weight.grad  # layers below select_layer train
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():
        assert not trainable(torch.randn(1, 3, 32, 32)).requires_grad


def test_tower_survives_qlora_norm_casts(llava_parts):
    """LLaVA's k-bit block casts every '*norm*' module to fp32 while the rest is bf16 (#1712, #785)."""
    reference = LLM2CLIPVisionTower(str(llava_parts["tower"]), _args())
    tower = LLM2CLIPVisionTower(str(llava_parts["tower"]), _args())
    tower.to(torch.bfloat16)
    for name, module in tower.named_modules():
        if "norm" in name:
            module.to(torch.float32)
    assert tower.dtype == torch.bfloat16  # the compute dtype, although some parameters are fp32
    images = torch.randn(2, 3, 32, 32)
    for dtype in (torch.bfloat16, torch.float32):
        out = tower(images.to(dtype))
        assert out.dtype == dtype and out.shape == (2, 16, 32)
        torch.testing.assert_close(out.float(), reference(images), atol=0.1, rtol=0.05)


def test_tower_loads_llm2clip_folder_and_full_clip_folder(llava_parts, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from llm2clip.export import export_vision_tower
    from llm2clip.model import LLM2CLIP, ModelConfig

    vision = CLIPVisionModel.from_pretrained(llava_parts["tower"])
    LLM2CLIP(vision, llm_dim=48, cfg=ModelConfig(embed_dim=16)).save_pretrained(tmp_path / "whole")
    clip_config = CLIPConfig(vision_config=vision.config.to_dict(),
                             text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "vocab_size": 50})
    full = CLIPModel(clip_config)
    full.vision_model.load_state_dict(vision.state_dict())
    full.save_pretrained(tmp_path / "clip")
    export_vision_tower(tmp_path / "clip", tmp_path / "exported")
    images = torch.randn(2, 3, 32, 32)
    expected = LLM2CLIPVisionTower(str(llava_parts["tower"]), _args())(images)
    for folder in ("whole", "clip", "exported"):
        torch.testing.assert_close(LLM2CLIPVisionTower(str(tmp_path / folder), _args())(images), expected)


def test_builder_routes_names(llava_parts, monkeypatch, tmp_path):
    monkeypatch.setenv("LLM2CLIP_RUN_DIR", str(llava_parts["run"]))
    assert resolve_vision_tower("llm2clip") == str(llava_parts["tower"])
    tower = build_vision_tower(SimpleNamespace(mm_vision_tower="llm2clip", mm_vision_select_layer=-2))
    assert tower.is_loaded and tower.num_patches == 16
    with pytest.raises(ConfigError, match=r"train_llm2clip\.sh"):
        resolve_vision_tower("clip")  # this run has no clip_vision_tower/
    assert resolve_vision_tower("openai/clip-vit-large-patch14-336") == "openai/clip-vit-large-patch14-336"
    assert resolve_vision_tower("laion/CLIP-ViT-H-14-laion2B-s32B-b79K").startswith("laion/")
    with pytest.raises(ConfigError, match="Unknown vision tower"):
        resolve_vision_tower("microsoft/LLM2CLIP-Openai-L-14-336")
    with pytest.raises(ConfigError, match=r"no config\.json"):
        resolve_vision_tower(str(tmp_path))


# -- projector ---------------------------------------------------------------------------------------

def _projector(kind: str, vision: int = 32, llm: int = 64) -> nn.Module:
    return build_vision_projector(SimpleNamespace(mm_projector_type=kind, mm_hidden_size=vision, hidden_size=llm))


def test_projector_layouts_match_llava():
    assert set(_projector("linear").state_dict()) == {"weight", "bias"}
    mlp2 = _projector("mlp2x_gelu")
    assert set(mlp2.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert isinstance(mlp2[1], nn.GELU) and mlp2[0].weight.shape == (64, 32) and mlp2[2].weight.shape == (64, 64)
    assert set(_projector("mlp3x_gelu").state_dict()) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    x = torch.randn(5, 32)
    assert torch.equal(_projector("identity", 32, 32)(x), x)
    with pytest.raises(ConfigError, match=r"tower width \(32\) to equal the LLM width \(64\)"):
        _projector("identity")
    with pytest.raises(ConfigError, match="unknown mm_projector_type"):
        _projector("mlp2x_relu")


def test_projector_files_move_both_ways_with_llava(tmp_path):
    ours = _projector("mlp2x_gelu")
    save_projector(ours, tmp_path)
    raw = torch.load(tmp_path / "mm_projector.bin", weights_only=True)
    assert set(raw) == {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                        "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
    # LLaVA's initialize_vision_modules: get_w(weights, 'mm_projector') into its own Sequential
    llava_side = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    llava_side.load_state_dict({k.split("mm_projector.")[1]: v for k, v in raw.items() if "mm_projector" in k})
    x = torch.randn(3, 32)
    torch.testing.assert_close(llava_side(x), ours(x))
    # a file LLaVA wrote (same names, maybe with extra vision_resampler keys) loads into ours
    torch.save({**{f"model.mm_projector.{k}": v * 2 for k, v in llava_side.state_dict().items()},
                "model.vision_resampler.w": torch.zeros(1)}, tmp_path / "llava.bin")
    fresh = _projector("mlp2x_gelu")
    load_projector(fresh, tmp_path / "llava.bin")
    torch.testing.assert_close(fresh[0].weight, 2 * llava_side[0].weight)
    # the safetensors copy is the same weights
    assert all(torch.equal(v, read_projector_file(tmp_path)[k.split("mm_projector.")[1]]) for k, v in raw.items())


def test_projector_width_mismatch_names_both_widths(tmp_path, llava_parts):
    save_projector(_projector("mlp2x_gelu", vision=768), tmp_path)
    with pytest.raises(ConfigError, match="768-wide vision features but this tower's hidden_size is 32"):
        load_projector(_projector("mlp2x_gelu", vision=32), tmp_path / "mm_projector.bin")
    with pytest.raises(ConfigError, match="missing"):
        load_projector(_projector("linear"), tmp_path / "mm_projector.bin")
    tower = LLM2CLIPVisionTower(str(llava_parts["tower"]), _args())
    with pytest.raises(ConfigError, match="takes 1024-wide features but the vision tower's hidden_size is 32"):
        LlavaForCausalLM(nn.Linear(1, 1), tower, _projector("linear", vision=1024))


ZERO3_SCRIPT = """
import os, sys, torch, deepspeed
from types import SimpleNamespace
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
deepspeed.init_distributed(dist_backend="gloo")
from llava_integration.projector import build_vision_projector, load_projector, read_projector_file
cfg = SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=32, hidden_size=64)
with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                               "zero_optimization": {"stage": 3}}):
    projector = build_vision_projector(cfg)
assert projector[0].weight.shape == torch.Size([0]), projector[0].weight.shape  # partitioned
try:
    projector.load_state_dict(read_projector_file(sys.argv[1]))
    raise SystemExit("plain load_state_dict should fail on partitioned parameters")
except RuntimeError as e:
    assert "size mismatch" in str(e)
load_projector(projector, sys.argv[1])
with deepspeed.zero.GatheredParameters(list(projector.parameters())):
    want = read_projector_file(sys.argv[1])
    assert all(torch.equal(p, want[k]) for k, p in projector.state_dict().items())
print("ZERO3-OK")
"""


def test_pretrained_projector_loads_under_zero3(tmp_path):
    """LLaVA #1619: 'size mismatch ... torch.Size([0])' when pretrain_mm_mlp_adapter meets ZeRO-3."""
    import socket

    save_projector(_projector("mlp2x_gelu"), tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(tmp_path / "mm_projector.bin"), str(port)],
                          capture_output=True, text=True, timeout=300)
    assert "ZERO3-OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
