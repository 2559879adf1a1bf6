"""LLaVA-NeXT anyres: tiling, spatial_unpad merging, training, reload and the LlavaNext export, checked
against transformers' own LlavaNext image processor, processor and model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llava_integration.anyres import (
    merge_crops,
    num_image_tokens,
    parse_grid_pinpoints,
    process_anyres_image,
    select_best_resolution,
)
from llava_integration.arguments import parse, validate
from llava_integration.conversation import generation_prompt, get_template, tokenize_prompt
from llava_integration.data import DataCollator, LlavaDataset
from llm2clip.data.images import make_image_processor
from llm2clip.errors import ConfigError

PINPOINTS = "[(32, 64), (64, 32), (64, 64)]"  # [h, w] for the 32 px test tower (LLaVA-NeXT's 336 ones, scaled)
GRIDS = [[32, 64], [64, 32], [64, 64]]
SIZES = [(24, 48), (56, 24), (32, 32), (50, 70), (40, 90)]  # (height, width): wide, tall, square, ...


def _hf_image_processor():
    from llava_integration.hf_export_next import next_image_processor

    return next_image_processor(make_image_processor(32), GRIDS)


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def test_grid_pinpoints_forms_and_errors():
    assert parse_grid_pinpoints(PINPOINTS, 32) == GRIDS
    assert parse_grid_pinpoints(GRIDS, 32) == GRIDS
    assert parse_grid_pinpoints("(1x1),...,(2x2)", 32) == [[32, 32], [32, 64], [64, 32], [64, 64]]
    with pytest.raises(ConfigError, match="multiples of 32"):
        parse_grid_pinpoints("[(336, 672)]", 32)
    with pytest.raises(ConfigError, match="height, width"):
        parse_grid_pinpoints("[(1, 2, 3)]", 32)
    with pytest.raises(ConfigError, match="not a list"):
        parse_grid_pinpoints("__import__('os')", 32)


def test_tiles_and_token_counts_equal_transformers_llava_next(llava_parts):
    from transformers import AutoTokenizer, LlavaNextProcessor

    ours, theirs = make_image_processor(32), _hf_image_processor()
    processor = LlavaNextProcessor(image_processor=theirs, tokenizer=AutoTokenizer.from_pretrained(llava_parts["lm"]),
                                   patch_size=8, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1)
    for h, w in SIZES:
        image = _image(h, w)
        pixels = process_anyres_image(image, ours, GRIDS)  # [1 + tiles, 3, 32, 32]
        reference = theirs(image, return_tensors="pt")
        assert reference["image_sizes"][0].tolist() == [h, w]
        expected = reference["pixel_values"][0][: len(pixels)]
        torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0)
        hf_tokens = processor._get_num_multimodal_tokens(image_sizes=[[h, w]])["num_image_tokens"][0]
        assert num_image_tokens((h, w), GRIDS, 32, 4, "spatial_unpad") == hf_tokens


def test_spatial_unpad_merge_equals_transformers_pack_image_features():
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=32, patch_size=8), image_grid_pinpoints=GRIDS)
    newline = torch.randn(6)
    for h, w in SIZES:
        rows, cols = (side // 32 for side in select_best_resolution((h, w), GRIDS))
        features = torch.randn(1 + rows * cols, 16, 6)
        ours = merge_crops(features, (h, w), GRIDS, 32, "spatial_unpad", newline)
        theirs, _ = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), [features],
                                                       torch.tensor([[h, w]]), "default", newline)
        torch.testing.assert_close(ours, theirs[0], atol=0, rtol=0)
        assert len(ours) == num_image_tokens((h, w), GRIDS, 32, 4, "spatial_unpad")
        flat = merge_crops(features, (h, w), GRIDS, 32, "spatial", None)
        assert len(flat) == num_image_tokens((h, w), GRIDS, 32, 4, "spatial") == 16 * len(features)


def test_pinpoints_from_a_yaml_preset(llava_parts, tmp_path):
    preset = tmp_path / "next.yaml"
    preset.write_text("image_aspect_ratio: anyres\nimage_grid_pinpoints: [[32, 64], [64, 32], [64, 64]]\n"
                      "mm_patch_merge_type: spatial_unpad\n")
    model_args, data_args, training_args = parse(["--config", str(preset), *_argv(llava_parts, tmp_path, preset)])
    validate(model_args, data_args, training_args)
    assert parse_grid_pinpoints(data_args.image_grid_pinpoints, 32) == GRIDS


def test_bad_anyres_arguments_fail_before_loading(llava_parts, tmp_path):
    def args(*extra):
        return parse(_argv(llava_parts, tmp_path, tmp_path / "data.json", *extra))

    with pytest.raises(ConfigError, match="needs --image_grid_pinpoints"):
        validate(*args("--image_aspect_ratio", "anyres"))
    with pytest.raises(ConfigError, match="only applies with --image_aspect_ratio anyres"):
        validate(*args("--image_grid_pinpoints", PINPOINTS))
    with pytest.raises(ConfigError, match="use one of flat, spatial, spatial_unpad"):
        validate(*args("--mm_patch_merge_type", "spatial_unpad_maxpool"))
    with pytest.raises(ConfigError, match="no CLS"):
        validate(*args("--mm_patch_merge_type", "spatial", "--mm_vision_select_feature", "cls_patch"))


# -- data on disk: images of several aspect ratios ----------------------------------------------------
def _argv(parts, out, data, *extra):
    return ["--model_name_or_path", str(parts["lm"]), "--vision_tower", str(parts["tower"]),
            "--image_folder", str(data.parent), "--data_path", str(data), "--output_dir", str(out),
            "--use_cpu", "True", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "0", "--model_max_length", "768",
            "--mm_projector_type", "mlp2x_gelu", "--version", "v1", "--learning_rate", "1e-3", *extra]


ANYRES = ["--image_aspect_ratio", "anyres", "--image_grid_pinpoints", PINPOINTS,
          "--mm_patch_merge_type", "spatial_unpad"]


@pytest.fixture(scope="module")
def anyres_data(llava_parts, tmp_path_factory):
    """Four samples of the world's instruction data, their images re-sized to wide, tall and square ones."""
    root = tmp_path_factory.mktemp("anyres_data")
    samples = json.loads((llava_parts["data"] / "llava/train_instruct.json").read_text())[:4]
    for sample, (h, w) in zip(samples, [(24, 48), (56, 24), (40, 90), (32, 32)], strict=True):
        image = Image.open(llava_parts["data"] / sample["image"]).convert("RGB").resize((w, h))
        sample["image"], sample["conversations"] = f"img_{sample['id']}.png", sample["conversations"][:2]
        image.save(root / sample["image"])
    (root / "data.json").write_text(json.dumps(samples))
    return root / "data.json"


def test_anyres_training_step_reaches_projector_and_newline(llava_parts, anyres_data, tmp_path):
    from llava_integration.train import build_model, image_token_count

    model_args, data_args, training_args = parse(_argv(llava_parts, tmp_path, anyres_data, *ANYRES))
    validate(model_args, data_args, training_args)
    model, tokenizer = build_model(model_args, training_args, data_args)
    assert model.config.image_grid_pinpoints == GRIDS and model.image_newline.requires_grad
    tower = model.get_vision_tower()
    dataset = LlavaDataset(data_args, tokenizer, tower.image_processor, "v1", 768, image_token_count(model),
                           progress=False, grid_pinpoints=GRIDS)
    batch = DataCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])  # a wide and a tall image
    assert [im.shape[0] for im in batch["images"]] == [3, 3]  # base + a 1x2 and a 2x1 grid
    assert batch["image_sizes"].tolist() == [[48, 24], [24, 56]]  # (width, height), as LLaVA-NeXT passes
    _, _, mask, _, _, _ = model.prepare_inputs_labels_for_multimodal(
        batch["input_ids"], None, batch["attention_mask"], None, batch["labels"], batch["images"],
        batch["image_sizes"])
    for i, (h, w) in enumerate([(24, 48), (56, 24)]):  # each row grew by its image's rows, minus the placeholder
        rows = num_image_tokens((h, w), GRIDS, 32, 4, "spatial_unpad")
        assert mask[i].sum() == batch["attention_mask"][i].sum() + rows - 1
        assert dataset.samples[i]["length"] == int(mask[i].sum())
    # HF-style input: one [B, max crops, 3, S, S] tensor, zero-padded; each image keeps only its own crops
    padded = torch.zeros(2, 5, 3, 32, 32)
    for i, im in enumerate(batch["images"]):
        padded[i, : len(im)] = im
    with torch.no_grad():
        for a, b in zip(model.encode_anyres(padded, batch["image_sizes"]),
                        model.encode_anyres(batch["images"], batch["image_sizes"]), strict=True):
            torch.testing.assert_close(a, b)
        with pytest.raises(ConfigError, match="need image_sizes"):
            model.encode_anyres(batch["images"], None)
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert model.mm_projector[0].weight.grad.abs().sum() > 0
    assert model.image_newline.grad is not None and model.image_newline.grad.abs().sum() > 0


# -- end to end: CLI fine-tuning, reload, export to transformers' LlavaNext -------------------------------
@pytest.fixture(scope="module")
def exported(llava_parts, anyres_data, tmp_path_factory):
    from llava_integration.cli import main

    out = tmp_path_factory.mktemp("anyres_ft")
    assert main(["finetune", *_argv(llava_parts, out, anyres_data, *ANYRES, "--max_steps", "2")]) == 0
    assert main(["export", "--model_path", str(out), "--out", str(out / "hf")]) == 0
    return out


def _ids(tokenizer, question="What colour is the star?"):
    return torch.tensor([tokenize_prompt(generation_prompt(question, get_template("v1")), tokenizer)[0]])


def test_reload_keeps_anyres_settings_and_newline(exported, anyres_data):
    from safetensors.torch import load_file

    from llava_integration.checkpoint import load_pretrained_model
    from llava_integration.evaluate import evaluate_vqa

    config = json.loads((exported / "config.json").read_text())
    assert config["image_aspect_ratio"] == "anyres" and config["image_grid_pinpoints"] == GRIDS
    assert config["mm_patch_merge_type"] == "spatial_unpad"
    tokenizer, model, processor, _ = load_pretrained_model(exported, dtype=torch.float32)
    # a full output holds it beside the projector in the model weights, as LLaVA-NeXT's LlavaMetaModel names it
    saved = load_file(str(exported / "model.safetensors"))["model.image_newline"]
    assert torch.equal(model.image_newline, saved)
    # VQA evaluation tiles its images the same way
    result = evaluate_vqa(model, tokenizer, processor, anyres_data, anyres_data.parent, progress=False)
    assert result["predictions"] and all("prediction" in p for p in result["predictions"])


def test_llava_next_export_matches_our_logits_and_generates(exported):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava_integration.checkpoint import load_pretrained_model
    from llava_integration.hf_export import export_hf_llava

    tokenizer, model, processor, _ = load_pretrained_model(exported, dtype=torch.float32)
    hf, info = LlavaNextForConditionalGeneration.from_pretrained(exported / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_processor = AutoProcessor.from_pretrained(exported / "hf")
    assert type(hf_processor).__name__ == "LlavaNextProcessor"
    torch.testing.assert_close(hf.model.image_newline, model.image_newline)
    prompt = hf_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}]}],
        add_generation_prompt=True)
    for h, w in [(24, 48), (56, 24)]:
        image = _image(h, w, seed=h)
        inputs = hf_processor(images=image, text=prompt, return_tensors="pt")
        n_image = int((inputs["input_ids"] == hf.config.image_token_index).sum())
        assert n_image == num_image_tokens((h, w), GRIDS, 32, 4, "spatial_unpad")
        pixels = process_anyres_image(image, processor, GRIDS)
        with torch.no_grad():
            ours = model(input_ids=_ids(tokenizer), images=[pixels], image_sizes=[image.size]).logits
            theirs = hf(**inputs).logits
        assert theirs.shape[1] == ours.shape[1] == inputs["input_ids"].shape[1]
        torch.testing.assert_close(theirs[..., : ours.shape[-1]], ours, atol=1e-4, rtol=1e-4)
    generated = hf.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    with pytest.raises(ConfigError, match="export_hf_llava_next"):
        export_hf_llava(model, tokenizer, exported / "flat")


def test_image_newline_survives_every_save_layout(llava_parts, anyres_data, tmp_path):
    from safetensors.torch import load_file

    from llava_integration.checkpoint import load_pretrained_model, restore_trainables, save_llava
    from llava_integration.train import build_model

    def build(*extra):
        model_args, data_args, training_args = parse(_argv(llava_parts, tmp_path, anyres_data, *ANYRES, *extra))
        return build_model(model_args, training_args, data_args)

    model, tokenizer = build("--tune_mm_mlp_adapter", "True")
    with torch.no_grad():
        model.image_newline.copy_(torch.arange(64.0))
    save_llava(model, tokenizer, tmp_path / "pretrain", projector_only=True)  # mm_projector.bin / .safetensors
    assert torch.equal(load_file(str(tmp_path / "pretrain/mm_projector.safetensors"))["model.image_newline"],
                       torch.arange(64.0))
    lora, tokenizer = build("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8",
                            "--pretrain_mm_mlp_adapter", str(tmp_path / "pretrain/mm_projector.bin"))
    assert torch.equal(lora.image_newline, torch.arange(64.0))  # fine-tuning starts from the pretrained one
    with torch.no_grad():
        lora.image_newline.mul_(-1)
    save_llava(lora, tokenizer, tmp_path / "lora", projector_only=False)  # non_lora_trainables
    _, reloaded, _, _ = load_pretrained_model(tmp_path / "lora", dtype=torch.float32)
    assert torch.equal(reloaded.image_newline, -torch.arange(64.0))
    fresh, _ = build("--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8")
    restore_trainables(fresh, tmp_path / "lora")  # resuming a Trainer checkpoint
    assert torch.equal(fresh.image_newline, -torch.arange(64.0))
