"""Our LLaVA outputs in stock LLaVA's layout (haotian-liu/LLaVA c121f04), and our loader on them.

Upstream line numbers are of that commit: llava/model/builder.py (load_pretrained_model), llava/train/
train.py (what LLaVA itself writes), llava/model/llava_arch.py and multimodal_encoder/builder.py.
The outputs are written from untrained models (random projector, perturbed LoRA): layout, not learning.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from llava_integration.arguments import parse
from llava_integration.checkpoint import PEFT_010_FIELDS, load_pretrained_model, restore_trainables, save_llava
from llava_integration.layout import llava_folder_name
from llava_integration.train import build_model

PROJECTOR_SHAPES = {"0.weight": (64, 32), "0.bias": (64,), "2.weight": (64, 64), "2.bias": (64,)}
# every key LLaVA's config reads (llava_arch.py:35-38, 160-161, 205, 274, 290; builder.py:147-148;
# mm_utils.py:167; train.py:917-943 writes them)
LLAVA_CONFIG_KEYS = {"mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
                     "mm_vision_select_feature", "mm_patch_merge_type", "image_aspect_ratio",
                     "tokenizer_model_max_length", "tokenizer_padding_side", "use_mm_proj", "mm_use_im_start_end",
                     "mm_use_im_patch_token", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "mm_projector_lr"}


def _argv(parts, *extra):
    return ["--model_name_or_path", str(parts["lm"]), "--vision_tower", "llm2clip", "--llm2clip_run_dir",
            str(parts["run"]), "--output_dir", "/unused", "--use_cpu", "True", "--bf16", "False", "--seed", "0",
            "--model_max_length", "160", "--mm_projector_type", "mlp2x_gelu", *extra]


@pytest.fixture(scope="module")
def outputs(llava_parts, tmp_path_factory):
    """{kind: (folder, the model that wrote it, tokenizer)} for 'pretrain', 'lora' and 'full'."""
    root = tmp_path_factory.mktemp("layout")
    made = {}
    model_args, _, training_args = parse(_argv(llava_parts, "--version", "plain", "--tune_mm_mlp_adapter", "True"))
    model, tokenizer = build_model(model_args, training_args)
    save_llava(model, tokenizer, root / "llava-tiny-pretrain", projector_only=True)
    made["pretrain"] = (root / "llava-tiny-pretrain", model, tokenizer)
    adapter = ["--pretrain_mm_mlp_adapter", str(root / "llava-tiny-pretrain/mm_projector.bin")]
    model_args, _, training_args = parse(_argv(llava_parts, *adapter, "--lora_enable", "True", "--lora_r", "4",
                                               "--lora_alpha", "8"))
    model, tokenizer = build_model(model_args, training_args)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: give the adapter an effect to round-trip
            p.data.normal_(0, 0.2)
    save_llava(model, tokenizer, root / "llava-tiny-lora", projector_only=False)
    made["lora"] = (root / "llava-tiny-lora", model, tokenizer)
    model_args, _, training_args = parse(_argv(llava_parts, *adapter))
    model, tokenizer = build_model(model_args, training_args)
    save_llava(model, tokenizer, root / "llava-tiny-finetune", projector_only=False)
    made["full"] = (root / "llava-tiny-finetune", model, tokenizer)
    return made


def _logits(model, tokenizer):
    from llava_integration.constants import IMAGE_TOKEN_INDEX

    torch.manual_seed(0)
    ids = torch.tensor([[tokenizer.bos_token_id, IMAGE_TOKEN_INDEX, *tokenizer("What colour is it?")["input_ids"]]])
    with torch.no_grad():
        return model.eval()(input_ids=ids, images=torch.randn(1, 3, 32, 32)).logits  # [1, T + 15, V]


def _check_config(folder, llava_parts, tune_mm_mlp_adapter):
    config = json.loads((folder / "config.json").read_text())
    # llava_llama.py:30-31,157-158: AutoConfig/AutoModelForCausalLM route 'llava_llama' to LlavaLlamaForCausalLM
    assert config["model_type"] == "llava_llama" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert set(config) >= LLAVA_CONFIG_KEYS
    # multimodal_encoder/builder.py:7-9 builds a tower only for a path that exists (or openai/laion names)
    tower = config["mm_vision_tower"]
    assert os.path.isabs(tower) and os.path.samefile(tower, llava_parts["tower"])
    assert config["mm_hidden_size"] == 32 and config["mm_vision_select_layer"] == -2
    assert config["mm_patch_merge_type"] == "flat" and config["image_aspect_ratio"] == "square"
    # builder.py:147-153: a missing mm_use_im_patch_token counts as True and grows the vocabulary
    assert config["mm_use_im_patch_token"] is False and config["mm_use_im_start_end"] is False
    assert config["tune_mm_mlp_adapter"] is tune_mm_mlp_adapter and config["tokenizer_model_max_length"] == 160
    assert config["rope_theta"] == 10000.0 and config["torch_dtype"] == "float32"  # what 4.x reads
    return config


def test_pretraining_output_is_what_llava_loads_with_model_base(outputs, llava_parts):
    folder, model, tokenizer = outputs["pretrain"]
    _check_config(folder, llava_parts, tune_mm_mlp_adapter=True)
    # builder.py:101-103 torch.loads mm_projector.bin into LlavaLlamaForCausalLM with these full names
    weights = torch.load(folder / "mm_projector.bin", weights_only=True)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        f"model.mm_projector.{k}": s for k, s in PROJECTOR_SHAPES.items()}
    assert not list(folder.glob("model*.safetensors"))
    _, reloaded, _, _ = load_pretrained_model(folder, dtype=torch.float32)  # the base comes from config.json
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)


def test_lora_output_has_llava_and_peft_names(outputs, llava_parts):
    folder, model, tokenizer = outputs["lora"]
    _check_config(folder, llava_parts, tune_mm_mlp_adapter=False)
    adapter = json.loads((folder / "adapter_config.json").read_text())
    # builder.py:55-57 loads model_base; the adapter names that same folder (what --model-base must be)
    assert adapter["base_model_name_or_path"] == os.path.abspath(llava_parts["lm"])
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["r"] == 4
    # transformers 4.37.2 cannot import recent peft; peft 0.10's LoraConfig(**json) fails on newer keys
    assert set(adapter) <= PEFT_010_FIELDS
    # builder.py:83 PeftModel.from_pretrained(LlavaLlamaForCausalLM): LlamaForCausalLM's module paths
    lora = load_file(str(folder / "adapter_model.safetensors"))
    assert lora and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in lora)
    assert lora["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    # builder.py:64-79: non_lora_trainables.bin, 'base_model.' then 'model.' stripped, loaded non-strictly
    non_lora = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
    assert set(non_lora) == {f"base_model.model.model.mm_projector.{k}" for k in PROJECTOR_SHAPES}
    stripped = {(k[11:] if k.startswith("base_model.") else k): v for k, v in non_lora.items()}
    if any(k.startswith("model.model.") for k in stripped):
        stripped = {(k[6:] if k.startswith("model.") else k): v for k, v in stripped.items()}
    assert {k: tuple(v.shape) for k, v in stripped.items()} == {
        f"model.mm_projector.{k}": s for k, s in PROJECTOR_SHAPES.items()}
    assert llava_folder_name(folder, lora=True) is None
    _, reloaded, _, _ = load_pretrained_model(folder, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), rtol=1e-5, atol=1e-5)


def test_full_output_is_a_llava_llama_checkpoint(outputs, llava_parts):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model, tokenizer = outputs["full"]
    _check_config(folder, llava_parts, tune_mm_mlp_adapter=False)
    # builder.py:116-121 LlavaLlamaForCausalLM.from_pretrained: the LLM's keys plus model.mm_projector.*
    weights = load_file(str(folder / "model.safetensors"))
    lm_keys = set(AutoModelForCausalLM.from_pretrained(llava_parts["lm"]).state_dict()) - {"lm_head.weight"}
    assert set(weights) == lm_keys | {f"model.mm_projector.{k}" for k in PROJECTOR_SHAPES}
    assert weights["model.mm_projector.0.weight"].shape == PROJECTOR_SHAPES["0.weight"]
    assert not (folder / "mm_projector.bin").exists()
    # builder.py:116 AutoTokenizer (4.x) must know the class: 5.x writes 'TokenizersBackend'
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    assert all(isinstance(m, str) for m in merges)  # tokenizers 0.15 (LLaVA's pin) cannot parse pairs
    text = "What colour is the star? It is red."
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == tokenizer(text)["input_ids"]
    _, reloaded, _, _ = load_pretrained_model(folder, dtype=torch.float32)  # raises on any leftover key
    assert type(reloaded.language_model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)


def test_resuming_reads_the_full_layout(outputs, llava_parts):
    folder, model, _ = outputs["full"]
    model_args, _, training_args = parse(_argv(llava_parts))
    fresh, _ = build_model(model_args, training_args)
    for module in (fresh.language_model, fresh.mm_projector):  # all that the checkpoint must put back
        for p in module.parameters():
            p.data.zero_()
    restore_trainables(fresh, folder)
    for (name, a), b in zip(fresh.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_older_layout_still_loads(outputs, llava_parts, tmp_path):
    """Before stock LLaVA's layout: the projector beside the LLM, a 'llama' config, an alias tower name."""
    from llava_integration.projector import save_projector

    _, model, tokenizer = outputs["full"]
    lm = model.language_model
    lm.save_pretrained(tmp_path)
    save_projector(model.mm_projector, tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(mm_vision_tower="llm2clip", llm2clip_run_dir=str(llava_parts["run"]))
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, reloaded, _, _ = load_pretrained_model(tmp_path, dtype=torch.float32)
    torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), rtol=0, atol=0)


def test_folder_names_route_as_stock_llava_needs(tmp_path):
    # mm_utils.py:207-213 (name of the folder, or parent_checkpoint-N) and builder.py:48-52
    assert llava_folder_name(tmp_path / "llava-v1.5-7b-lora", lora=True) is None
    assert llava_folder_name(tmp_path / "llava-7b-lora/checkpoint-10", lora=True) is None
    assert "lacks 'llava'" in llava_folder_name(tmp_path / "finetune", lora=False)
    assert "lacks 'lora'" in llava_folder_name(tmp_path / "llava-7b", lora=True)


def test_stock_llava_outputs_load_too(outputs, llava_parts, tmp_path):
    """What stock LLaVA itself writes: .bin files only, and full checkpoints that hold the tower
    (train.py:196-206, 984; its state_dict includes model.vision_tower.vision_tower.vision_model.*)."""
    import shutil

    from safetensors.torch import save_file

    for kind, drop in (("pretrain", "mm_projector.safetensors"), ("lora", "non_lora_trainables.safetensors")):
        folder, model, tokenizer = outputs[kind]
        shutil.copytree(folder, tmp_path / kind)
        (tmp_path / kind / drop).unlink()
        _, reloaded, _, _ = load_pretrained_model(tmp_path / kind, dtype=torch.float32)
        torch.testing.assert_close(_logits(reloaded, tokenizer), _logits(model, tokenizer), rtol=1e-5, atol=1e-5)
    folder, model, tokenizer = outputs["full"]
    shutil.copytree(folder, tmp_path / "full")
    weights = load_file(str(folder / "model.safetensors"))
    tower = {f"model.vision_tower.vision_tower.vision_model.{k}": v + 0.01
             for k, v in model.get_vision_tower().vision_tower.state_dict().items()}  # 5.x: no vision_model.
    save_file(weights | tower, str(tmp_path / "full/model.safetensors"), metadata={"format": "pt"})
    _, reloaded, _, _ = load_pretrained_model(tmp_path / "full", dtype=torch.float32)
    first = next(iter(model.get_vision_tower().vision_tower.state_dict()))
    got = reloaded.get_vision_tower().vision_tower.state_dict()[first]
    torch.testing.assert_close(got, model.get_vision_tower().vision_tower.state_dict()[first] + 0.01)


@pytest.mark.parametrize("lora", [True, False])
def test_an_unfrozen_tower_is_saved_under_llava_names_and_reloads(llava_parts, tmp_path, lora):
    extra = ["--lora_enable", "True", "--lora_r", "4"] if lora else []
    model_args, _, training_args = parse(_argv(llava_parts, "--unfreeze_mm_vision_tower", "True", *extra))
    model, tokenizer = build_model(model_args, training_args)
    inner = model.get_vision_tower().vision_tower
    assert all(p.requires_grad for p in inner.parameters())
    with torch.no_grad():
        for p in inner.parameters():
            p.add_(0.01)  # "trained": differs from the folder at mm_vision_tower
    folder = tmp_path / ("llava-tower-lora" if lora else "llava-tower")
    save_llava(model, tokenizer, folder, projector_only=False)
    file = folder / ("non_lora_trainables.safetensors" if lora else "vision_tower.safetensors")
    prefix = ("base_model.model." if lora else "") + "model.vision_tower.vision_tower.vision_model."
    tower_keys = [k for k in load_file(str(file)) if "vision_tower" in k]
    assert len(tower_keys) == len(inner.state_dict()) and all(k.startswith(prefix) for k in tower_keys)
    _, reloaded, _, _ = load_pretrained_model(folder, dtype=torch.float32)
    for a, b in zip(reloaded.get_vision_tower().vision_tower.parameters(), inner.parameters(), strict=True):
        assert torch.equal(a, b)
