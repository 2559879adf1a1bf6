"""LLaVA training end to end on the tiny world: pretraining, full / LoRA / QLoRA tuning, reload, HF export."""

from __future__ import annotations

import json

import pytest
import torch

from llava_integration.arguments import parse
from llava_integration.checkpoint import load_pretrained_model
from llava_integration.conversation import generation_prompt, get_template, tokenize_prompt
from llava_integration.train import LlavaTrainer, build_model, train
from llm2clip.errors import ConfigError


def _argv(parts, out, kind="finetune", *extra):
    common = ["--model_name_or_path", str(parts["lm"]), "--vision_tower", str(parts["tower"]),
              "--image_folder", str(parts["data"]), "--output_dir", str(out), "--use_cpu", "True",
              "--bf16", "True", "--per_device_train_batch_size", "8", "--logging_steps", "1",
              "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "0", "--model_max_length", "160",
              "--mm_projector_type", "mlp2x_gelu"]
    if kind == "pretrain":
        return [*common, "--version", "plain", "--tune_mm_mlp_adapter", "True", "--learning_rate", "1e-2",
                "--max_samples", "32", "--data_path", str(parts["data"] / "llava/train_pretrain.json"), *extra]
    return [*common, "--version", "v1", "--learning_rate", "3e-3", "--max_samples", "16",
            "--data_path", str(parts["data"] / "llava/train_instruct.json"), *extra]


@pytest.fixture(scope="module")
def pretrained(llava_parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    summary = train(*parse(_argv(llava_parts, out, "pretrain", "--max_steps", "60")), progress=False)
    return out, summary


def test_pretraining_trains_only_the_projector(pretrained, llava_parts):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, summary = pretrained
    assert summary["last_loss"] < summary["first_loss"] - 0.2
    assert sorted(p.name for p in out.iterdir()) >= ["config.json", "mm_projector.bin", "mm_projector.safetensors"]
    assert not (out / "model.safetensors").exists()  # only the projector is written
    config = json.loads((out / "config.json").read_text())
    assert config["mm_hidden_size"] == 32 and config["mm_projector_type"] == "mlp2x_gelu"
    assert config["llava_base_model"] == str(llava_parts["lm"])
    weights = load_file(out / "mm_projector.safetensors")
    assert set(weights) == {f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    # the LLM a projector-only output reloads with is the untouched base
    _, model, _, _ = load_pretrained_model(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(llava_parts["lm"])
    assert all(torch.equal(a, b) for a, b in zip(model.language_model.parameters(), base.parameters(), strict=True))
    torch.testing.assert_close(model.mm_projector[0].weight, weights["model.mm_projector.0.weight"])


@pytest.fixture(scope="module")
def finetuned(pretrained, llava_parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    argv = _argv(llava_parts, out, "finetune", "--max_steps", "20", "--pretrain_mm_mlp_adapter",
                 str(pretrained[0] / "mm_projector.bin"))
    return out, train(*parse(argv), progress=False)


def test_full_finetuning_loss_drops_and_reloads(finetuned):
    out, summary = finetuned
    assert summary["last_loss"] < 0.7 * summary["first_loss"]
    assert summary["mismatched"] == 0 and summary["skipped"] == {}
    _tokenizer, model, _processor, context = load_pretrained_model(out, dtype=torch.float32)
    assert context == 160 and model.config.version == "v1"


def test_lora_wraps_only_the_llm_and_reloads_identically(pretrained, llava_parts, tmp_path):
    argv = _argv(llava_parts, tmp_path, "finetune", "--max_steps", "3", "--lora_enable", "True", "--lora_r", "8",
                 "--lora_alpha", "16", "--mm_projector_lr", "1e-4", "--gradient_checkpointing", "True",
                 "--pretrain_mm_mlp_adapter", str(pretrained[0] / "mm_projector.bin"))
    model_args, data_args, training_args = parse(argv)
    model, tokenizer = build_model(model_args, training_args)
    names = [n for n, _ in model.named_parameters()]
    assert any("lora_" in n for n in names if n.startswith("language_model."))
    assert not any("lora_" in n for n in names if n.startswith(("vision_tower.", "mm_projector.")))
    trainer = LlavaTrainer(model=model, args=training_args, processing_class=tokenizer)
    # Trainer must not divide by its own count of (pre-splice, pre-truncation) label tokens
    assert trainer.model_accepts_loss_kwargs is False
    groups = {g["lr"]: g["params"] for g in trainer.create_optimizer().param_groups}
    projector_ids = {id(p) for p in model.mm_projector.parameters()}
    assert {id(p) for p in groups[1e-4]} == projector_ids and 3e-3 in groups
    train(model_args, data_args, training_args, progress=False)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.bin",
            "non_lora_trainables.safetensors", "config.json"} <= files
    # resuming (restore_trainables) puts the saved LoRA and projector weights back into a fresh model
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from llava_integration.checkpoint import restore_trainables

    fresh, _ = build_model(model_args, training_args)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(fresh.language_model).items()}
    restore_trainables(fresh, tmp_path)
    lora = get_peft_model_state_dict(fresh.language_model)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert lora.keys() == saved.keys() and all(torch.equal(lora[k], saved[k]) for k in saved)
    assert any(not torch.equal(before[k], saved[k]) for k in saved)  # it did change something
    extras = load_file(str(tmp_path / "non_lora_trainables.safetensors"))  # LLaVA's PeftModel names
    own = dict(fresh.named_parameters())
    assert extras and all(torch.equal(own[k.removeprefix("base_model.model.model.")], v) for k, v in extras.items())


def _logits(model, tokenizer, image):
    prompt = generation_prompt("What colour is the star?", get_template("v1"))
    ids = torch.tensor([tokenize_prompt(prompt, tokenizer)[0]])
    with torch.no_grad():
        return model(input_ids=ids, images=image).logits


def test_qlora_updates_only_lora_and_projector_and_reloads_in_4bit(pretrained, llava_parts, tmp_path):
    argv = _argv(llava_parts, tmp_path, "finetune", "--max_steps", "2", "--lora_enable", "True", "--bits", "4",
                 "--lora_r", "8", "--lora_alpha", "16", "--pretrain_mm_mlp_adapter",
                 str(pretrained[0] / "mm_projector.bin"))
    model_args, data_args, training_args = parse(argv)
    model, tokenizer = build_model(model_args, training_args)
    assert any(type(m).__name__ == "Linear4bit" for m in model.language_model.modules())
    assert model.mm_projector[0].weight.shape == (64, 32)  # never quantised
    norms = [m for n, m in model.vision_tower.named_modules() if n.endswith("layer_norm1")]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # LLaVA's k-bit casts reach the tower
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    from llava_integration.data import DataCollator, LlavaDataset

    dataset = LlavaDataset(data_args, tokenizer, model.get_vision_tower().image_processor, "v1", 160, 16,
                           progress=False)
    trainer = LlavaTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                           data_collator=DataCollator(tokenizer.pad_token_id))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n or n.startswith("mm_projector.") for n in changed)
    assert any(n.startswith("mm_projector.") for n in changed) and any("lora_" in n for n in changed)
    trainer.save_model()
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())  # the files are 16-bit
    image = torch.randn(1, 3, 32, 32)
    expected = _logits(model.eval(), tokenizer, image)
    # Reloading in 4-bit keeps the projector a plain Linear (LLaVA #744: [2097152, 1] blobs)
    _, reloaded, _, _ = load_pretrained_model(tmp_path, load_4bit=True)
    assert reloaded.mm_projector[0].weight.shape == (64, 32)
    assert reloaded.mm_projector[0].weight.dtype == torch.bfloat16  # the compute dtype, not a 4-bit blob
    torch.testing.assert_close(reloaded.mm_projector[0].weight, model.mm_projector[0].weight.bfloat16())
    torch.testing.assert_close(_logits(reloaded, tokenizer, image).float(), expected.float(), atol=0.1, rtol=0.05)


def test_bad_arguments_fail_before_loading(llava_parts, tmp_path):
    with pytest.raises(ConfigError, match="unknown arguments"):
        parse(_argv(llava_parts, tmp_path, "finetune", "--lora_rank", "8"))
    with pytest.raises(ConfigError, match="cannot be fully trained"):
        train(*parse(_argv(llava_parts, tmp_path, "finetune", "--bits", "4")))
    with pytest.raises(ConfigError, match="incompatible with ZeRO-3"):
        train(*parse(_argv(llava_parts, tmp_path, "finetune", "--bits", "4", "--lora_enable", "True",
                           "--deepspeed", "configs/deepspeed/zero3.json")))


def test_hf_llava_export_round_trip(finetuned, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_integration.hf_export import export_hf_llava

    tokenizer, model, _processor, _ = load_pretrained_model(finetuned[0], dtype=torch.float32)
    export_hf_llava(model, tokenizer, tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert set(dict(hf.model.multi_modal_projector.named_parameters())) == {
        "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    prompt = hf_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]}],
        add_generation_prompt=True)
    assert prompt == generation_prompt("What colour is the star?", get_template("v1"))
    inputs = hf_processor(images=image, text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == config["image_token_index"]).sum() == 16  # one token per patch
    with torch.no_grad():
        hf_logits = hf(**inputs).logits
    ours = _logits(model, tokenizer, inputs["pixel_values"])
    assert hf_logits.shape[1] == ours.shape[1]
    torch.testing.assert_close(hf_logits[..., : ours.shape[-1]], ours, atol=1e-4, rtol=1e-4)
    generated = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
