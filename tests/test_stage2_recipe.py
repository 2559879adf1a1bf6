"""The stage-2 recipe options of issue #20: AdamW betas/eps, layer-wise lr decay on the vision tower
(EVA-CLIP's numbering, as the official LLM2CLIP assigns it), and the caption instruction of the cache."""

import math

import pytest
import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from llm2clip.config import load_config
from llm2clip.errors import ConfigError
from llm2clip.model import LLM2CLIP, ModelConfig
from llm2clip.stage2.optim import _side, make_optimizer, vision_layer_id, vision_tower
from llm2clip.stage2.runs import VisionConfig, prepare_vision
from llm2clip.stage2.train import TrainConfig

LAYERS, LLM_DIM, DECAY, LR, TEXT_LR = 3, 12, 0.5, 1e-3, 2e-3
PRESET = "configs/llama3-8b_clip-vit-l14-336.yaml"


def _clip_vision() -> CLIPVisionModel:
    torch.manual_seed(0)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                                            num_attention_heads=2, image_size=16, patch_size=8))


def _llm2clip(vision=None) -> LLM2CLIP:
    return LLM2CLIP(vision or _clip_vision(), LLM_DIM, ModelConfig(embed_dim=8, adapter_depth=1))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 10, "lr": LR, "text_lr": TEXT_LR, "warmup_steps": 0, **kw})


def _lr_by_name(model: nn.Module, optimizer) -> dict[str, float]:
    """name -> its group's lr; every trainable parameter in exactly one group, no frozen one."""
    group_of = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            assert id(p) not in group_of
            group_of[id(p)] = g["lr"]
    out = {n: group_of.pop(id(p)) for n, p in model.named_parameters() if p.requires_grad}
    assert not group_of
    return out


def _plain(name: str) -> str:
    """transformers 4.x nests CLIPVisionModel's weights under `vision_model.`, 5.x does not."""
    return name.replace("vision_model.", "")


def _expected_clip_lr(name: str) -> float:
    """By hand: embeddings and pre-LayerNorm id 0, encoder layer i id i + 1, the rest id LAYERS + 1;
    lr x DECAY^(LAYERS + 1 - id)."""
    name = _plain(name)
    if name.startswith("text_adapter."):
        return TEXT_LR
    if ".embeddings." in name or ".pre_layrnorm." in name:
        return LR * DECAY ** 4
    for i in range(LAYERS):
        if f".encoder.layers.{i}." in name:
            return LR * DECAY ** (LAYERS - i)
    assert name.startswith(("vision.post_layernorm.", "visual_projection.", "logit_scale")), name
    return LR


def test_layer_decay_gives_each_clip_vision_parameter_its_layers_lr_through_the_first_steps():
    model = _llm2clip()
    optimizer, scheduler = make_optimizer(model, _cfg(layer_decay=DECAY))
    got = _lr_by_name(model, optimizer)
    names = {_plain(n) for n in got}
    assert {"vision.embeddings.class_embedding", "vision.embeddings.patch_embedding.weight",
            "vision.embeddings.position_embedding.weight", "vision.pre_layrnorm.weight",
            "vision.encoder.layers.2.mlp.fc2.bias", "vision.post_layernorm.bias", "visual_projection.weight",
            "logit_scale"} <= names
    for name, lr in got.items():
        assert lr == pytest.approx(_expected_clip_lr(name), rel=1e-12), name
    # the cosine schedule (warmup 0) scales every group by one factor: 1 at step 0, then cos
    for step in (1, 2):
        optimizer.step()
        scheduler.step()
        factor = 0.5 * (1 + math.cos(math.pi * step / 10))
        for name, lr in _lr_by_name(model, optimizer).items():
            assert lr == pytest.approx(_expected_clip_lr(name) * factor, rel=1e-9), (step, name)
    # weight decay as before: none on 1-D tensors (norms, biases, class embedding) and the logit scale
    wd = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert wd[id(p)] == (0.05 if p.ndim >= 2 and "logit_" not in name else 0.0), name


def test_siglip_names_the_baseline_clip_and_knowledge_heads():
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                                                  num_attention_heads=2, image_size=16, patch_size=8))
    model = _llm2clip(siglip)
    tower, layers = vision_tower(model)
    assert layers == LAYERS
    ids = {_plain(n): vision_layer_id(n, tower, LAYERS) for n, _ in model.named_parameters() if _side(n) == "vision"}
    assert ids["vision.embeddings.patch_embedding.weight"] == 0
    assert ids["vision.embeddings.position_embedding.weight"] == 0
    assert ids["vision.encoder.layers.0.self_attn.q_proj.weight"] == 1
    assert ids["vision.encoder.layers.2.layer_norm2.weight"] == 3
    heads = [n for n in ids if ".head." in n]  # SigLIP's attention-pooling head: after the last layer
    assert heads and all(ids[n] == LAYERS + 1 for n in heads)
    assert ids["vision.post_layernorm.weight"] == ids["visual_projection.weight"] == ids["logit_scale"] == LAYERS + 1

    class Baseline(nn.Module):  # BaselineCLIP / KnowledgeCLIP's parameter names (clip.*, heads.*)
        def __init__(self):
            super().__init__()
            vision = _clip_vision().config.to_dict()
            text = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "vocab_size": 50}
            self.clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
            self.heads = nn.ModuleDict({"distill": nn.Linear(8, 4)})

    model = Baseline()
    optimizer, _ = make_optimizer(model, _cfg(layer_decay=DECAY, head_lr=3e-3), "knowledge_clip.train")
    for name, lr in _lr_by_name(model, optimizer).items():
        if name.startswith(("clip.text_model.", "clip.text_projection.")):  # the text tower: no layer decay
            assert lr == TEXT_LR, name
        elif name.startswith("heads."):
            assert lr == 3e-3, name
        else:
            ours = {"clip.visual_projection.weight": "visual_projection.weight", "clip.logit_scale": "logit_scale"}
            ours = ours.get(name, name.replace("clip.vision_model.", "vision."))  # the same tower in LLM2CLIP
            assert lr == pytest.approx(_expected_clip_lr(ours), rel=1e-12), name


def test_vision_lora_and_frozen_layers_keep_their_layer_ids():
    model = _llm2clip()
    model.vision = prepare_vision(model.vision, VisionConfig(lora=True, lora_r=2))
    got = _lr_by_name(model, make_optimizer(model, _cfg(layer_decay=DECAY))[0])
    lora = [n for n in got if "lora_" in n]
    assert lora and all(_plain(n).startswith("vision.base_model.model.encoder.layers.") for n in lora)
    for name in lora:  # the frozen base weights still count: 3 layers, not 0
        layer = int(name.split("encoder.layers.")[1].split(".")[0])
        assert got[name] == pytest.approx(LR * DECAY ** (LAYERS - layer), rel=1e-12), name

    model = _llm2clip()
    model.vision = prepare_vision(model.vision, VisionConfig(freeze_layers=1))
    got = _lr_by_name(model, make_optimizer(model, _cfg(layer_decay=DECAY))[0])
    assert not any(".embeddings." in n or ".layers.0." in n or "pre_layrnorm" in n for n in got)
    for name, lr in got.items():
        assert lr == pytest.approx(_expected_clip_lr(name), rel=1e-12), name


def _groups_before_issue_20(model: nn.Module, cfg: TrainConfig) -> list[tuple]:
    """The optimizer groups as _optimizer built them before layer decay existed."""
    groups: dict = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((_side(name), p.ndim >= 2 and "logit_" not in name), []).append(p)
    text_lr = cfg.lr if cfg.text_lr is None else cfg.text_lr
    lrs = {"vision": cfg.lr, "text": text_lr, "head": text_lr if cfg.head_lr is None else cfg.head_lr}
    return [([id(p) for p in params], lrs[side], cfg.weight_decay if decay else 0.0)
            for (side, decay), params in sorted(groups.items())]


def test_layer_decay_one_leaves_the_groups_as_they_were():
    model, cfg = _llm2clip(), _cfg()
    optimizer, _ = make_optimizer(model, cfg)
    got = [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert got == _groups_before_issue_20(model, cfg)


def test_betas_and_eps_reach_adamw():
    optimizer, _ = make_optimizer(_llm2clip(), _cfg())
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in optimizer.param_groups)  # the official's
    optimizer, _ = make_optimizer(_llm2clip(), _cfg(adam_betas=[0.9, 0.98], adam_eps=1e-6, layer_decay=0.8))
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) > 4
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in optimizer.param_groups)


@pytest.mark.parametrize(("override", "key"), [
    ("stage2.llm2clip.layer_decay=0", "stage2.llm2clip.layer_decay"),
    ("stage2.clip_finetune.layer_decay=1.5", "stage2.clip_finetune.layer_decay"),
    ("knowledge_clip.train.layer_decay=-0.1", "knowledge_clip.train.layer_decay"),
    ("stage2.llm2clip.adam_betas=[0.9]", "stage2.llm2clip.adam_betas"),
    ("stage2.llm2clip.adam_betas=[0.9,1.0]", "stage2.llm2clip.adam_betas"),
    ("stage2.llm2clip.adam_eps=0", "stage2.llm2clip.adam_eps"),
    ("cache.instruction='  '", "cache.instruction"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", [override])


def test_layer_decay_without_a_vision_tower_is_refused():
    with pytest.raises(ConfigError, match=r"stage2\.llm2clip\.layer_decay.*found 0.*Fix"):
        make_optimizer(nn.Linear(4, 4), _cfg(layer_decay=0.9))



def test_the_paper_preset_carries_the_official_stage2_values():
    cfg = load_config(PRESET)
    run = cfg.stage2.llm2clip
    assert (run.layer_decay, run.adam_betas, run.adam_eps) == (0.85, [0.9, 0.999], 1e-8)
    assert (run.lr, run.text_lr, run.weight_decay, run.warmup_steps, run.batch_size) == (1e-5, 1e-5, 0.05, 0, 4096)
    assert (run.max_grad_norm, run.long_caption_ratio, run.precision) == (5.0, 0.5, "fp16")
    assert (cfg.cache.dtype, cfg.cache.instruction, cfg.embedder.instruction) == ("float32", "", "")
    assert cfg.stage2.model.inherit_logit_scale and not cfg.stage2.model.center_vectors
    assert (cfg.stage2.model.embed_dim, cfg.stage2.model.adapter_depth, cfg.stage2.model.adapter_expansion) == (
        1280, 4, 2)
