"""SigLIP vision towers: stage 2 (sigmoid loss, attention-pool embedding), export, LLaVA tower and HF Llava."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from llm2clip.config import load_config
from llm2clip.data.images import make_image_processor
from llm2clip.errors import ConfigError
from llm2clip.export import export_model, export_vision_tower
from llm2clip.model import LLM2CLIP, ModelConfig
from llm2clip.stage2.data import CaptionSampler, ImageSet
from llm2clip.stage2.runs import build_llm2clip, prepare_vision, processor_for, run_clip_finetune
from llm2clip.stage2.train import TrainConfig, train_contrastive
from llm2clip.vision import load_vision_model

LLM_DIM, N = 24, 16


def _siglip(seed: int = 0, **kw) -> SiglipVisionModel:
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=32, patch_size=8, **kw)).eval()


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    """A SigLIP vision checkpoint as transformers 5 saves it, with its image processor."""
    folder = tmp_path_factory.mktemp("siglip") / "siglip-vision"
    _siglip().save_pretrained(folder)
    make_image_processor(32, family="siglip").save_pretrained(folder)
    return folder


def _pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # [B, 3, H, W]


def test_siglip_processor_resizes_to_a_square_with_half_normalisation(siglip_folder):
    processor = make_image_processor(pretrained=siglip_folder)  # family read from preprocessor_config.json
    assert type(processor).__name__.startswith("SiglipImageProcessor")
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    wide = Image.new("RGB", (64, 20), (255, 0, 0))
    pixels = processor(images=wide, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)  # squashed to the square, nothing cropped
    torch.testing.assert_close(pixels[0, 0], torch.ones(32, 32))  # (1 - 0.5) / 0.5
    torch.testing.assert_close(pixels[0, 1], -torch.ones(32, 32))


def test_unknown_encoders_and_headless_siglip_are_refused_by_name(tmp_path):
    from transformers import CLIPTextConfig

    CLIPTextConfig().save_pretrained(tmp_path / "text")
    with pytest.raises(ConfigError, match="must be a CLIP or SigLIP checkpoint"):
        load_vision_model(tmp_path / "text")
    with pytest.raises(ConfigError, match="vision_use_head=false"):
        LLM2CLIP(_siglip(vision_use_head=False), LLM_DIM, ModelConfig(embed_dim=16))


class Vectors:
    """A stand-in cache: a fixed random vector per (key, field)."""

    table = torch.randn(N, 2, LLM_DIM, generator=torch.Generator().manual_seed(2))

    def __call__(self, keys, captions):
        return torch.stack([self.table[int(k[1:]), int(c.field == "long_caption")]
                            for k, c in zip(keys, captions, strict=True)])


def test_stage2_trains_a_siglip_tower_with_the_sigmoid_loss(siglip_folder, tmp_path):
    cfg = load_config(None, [f"vision.model={siglip_folder}", "stage2.model.loss=siglip", "data.image_size=32",
                             "stage2.model.embed_dim=16", "stage2.model.adapter_depth=1"])
    assert type(processor_for(cfg)).__name__.startswith("SiglipImageProcessor")
    with pytest.raises(ConfigError, match=r"stage2\.clip_finetune\.enabled=false"):
        run_clip_finetune(cfg, data=None)
    model = build_llm2clip(cfg, LLM_DIM, None)
    assert isinstance(model.vision, SiglipVisionModel) and model.logit_bias is not None
    pixels = _pixels()
    with torch.no_grad():  # the image embedding is SigLIP's attention-pooling head, projected
        pooled = SiglipVisionModel.from_pretrained(siglip_folder)(pixels).pooler_output  # [B, 32]
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), model.visual_projection(pooled))
    model.vision = prepare_vision(model.vision, cfg.vision)
    before = {n: p.detach().clone() for n, p in model.vision.named_parameters()}
    g = torch.Generator().manual_seed(3)
    captions = [{"short_caption": f"s{i}", "long_caption": f"l{i}"} for i in range(N)]
    images = ImageSet([f"k{i}" for i in range(N)], torch.randn(N, 3, 32, 32, generator=g), captions, stats=None)
    run = TrainConfig(steps=4, batch_size=N, lr=1e-3, warmup_steps=0, checkpoint_every=0, out=str(tmp_path),
                      precision="fp32")  # the whole set with its short captions each step: the loss must fall
    summary = train_contrastive(model, Vectors(), images, CaptionSampler("short_caption", ["long_caption"], 0.0, 0),
                                run, name="siglip", loss="siglip", progress=False, device=torch.device("cpu"))
    assert summary["skipped_nonfinite"] == 0 and summary["loss_last"] < summary["loss_first"]
    changed = {n for n, p in model.vision.named_parameters() if not torch.equal(p, before[n])}
    assert "head.probe" in changed and any(n.startswith("encoder.layers.0.") for n in changed)


def _llm2clip_siglip() -> LLM2CLIP:
    model = LLM2CLIP(_siglip(seed=4), LLM_DIM, ModelConfig(embed_dim=16, adapter_depth=1, loss="siglip")).eval()
    model.text_adapter.set_center(Vectors.table[:, 1])
    return model


def test_siglip_export_is_a_stock_siglip_vision_folder(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor

    model = _llm2clip_siglip()
    export_vision_tower(model, tmp_path / "tower")
    config = json.loads((tmp_path / "tower/config.json").read_text())
    assert config["model_type"] == "siglip_vision_model"
    assert all(k.startswith("vision_model.") for k in load_file(tmp_path / "tower/model.safetensors"))  # hub layout
    processor = json.loads((tmp_path / "tower/preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "SiglipImageProcessor" and processor["image_mean"] == [0.5] * 3
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "tower")).__name__.startswith("SiglipImageProcessor")
    stock, info = SiglipVisionModel.from_pretrained(tmp_path / "tower", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pixels = _pixels()
    with torch.no_grad():
        ours, theirs = model.vision(pixels, output_hidden_states=True), stock.eval()(pixels, output_hidden_states=True)
    assert len(theirs.hidden_states) == 3
    for a, b in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ours.pooler_output, theirs.pooler_output)

    export_model(model, tmp_path / "whole", make_image_processor(32, family="siglip"))
    loaded = LLM2CLIP.from_pretrained(tmp_path / "whole")
    assert isinstance(loaded.vision, SiglipVisionModel)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(Vectors.table[:3, 0]), model.encode_text(Vectors.table[:3, 0]))
    export_vision_tower(tmp_path / "whole", tmp_path / "tower2")  # from the folder: processor kept as SigLIP's
    assert json.loads((tmp_path / "tower2/preprocessor_config.json").read_text())["image_processor_type"] == \
        "SiglipImageProcessor"


@pytest.fixture(scope="module")
def llm2clip_siglip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("l2c") / "llm2clip"
    export_model(_llm2clip_siglip(), folder, make_image_processor(32, family="siglip"))
    return folder


@pytest.mark.parametrize("source", ["siglip", "llm2clip"])
def test_llava_tower_on_siglip_keeps_every_token(source, siglip_folder, llm2clip_siglip_folder):
    from types import SimpleNamespace

    from llava_integration.builder import build_vision_tower

    folder = siglip_folder if source == "siglip" else llm2clip_siglip_folder
    args = SimpleNamespace(mm_vision_tower=str(folder), mm_vision_select_layer=-2)
    delayed = build_vision_tower(args, delay_load=True)
    assert not delayed.is_loaded and delayed.config.model_type == "siglip_vision_model"
    assert (delayed.num_patches, delayed.hidden_size, delayed.image_size, delayed.patch_size) == (16, 32, 32, 8)
    tower = build_vision_tower(args)
    reference = SiglipVisionModel.from_pretrained(folder) if source == "siglip" else \
        LLM2CLIP.from_pretrained(folder).vision
    pixels = _pixels(2)
    with torch.no_grad():
        features = tower(pixels)  # [B, (S/p)^2, C]: no CLS to drop
        expected = reference.eval()(pixels, output_hidden_states=True).hidden_states[-2]
    assert features.shape == (2, 16, 32) and torch.equal(features, expected)
    processor = tower.image_processor  # what LLaVA's data code reads
    assert processor.crop_size["height"] == processor.crop_size["width"] == 32
    assert list(processor.image_mean) == [0.5] * 3
    cls_args = SimpleNamespace(**vars(args), mm_vision_select_feature="cls_patch")
    for delay in (True, False):
        with pytest.raises(ConfigError, match=r"needs a CLS token.*use 'patch'"):
            build_vision_tower(cls_args, delay_load=delay)


def test_llava_trains_on_a_siglip_tower_and_exports_to_hf_llava(llava_parts, siglip_folder, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llava_integration.arguments import parse
    from llava_integration.checkpoint import load_pretrained_model
    from llava_integration.conversation import generation_prompt, get_template, tokenize_prompt
    from llava_integration.data import LlavaDataset
    from llava_integration.hf_export import export_hf_llava
    from llava_integration.train import train

    data = llava_parts["data"]
    samples = json.loads((data / "llava/train_instruct.json").read_text())[:7]
    samples.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                         {"from": "gpt", "value": "Hi."}]})
    (tmp_path / "data.json").write_text(json.dumps(samples))
    argv = ["--model_name_or_path", str(llava_parts["lm"]), "--vision_tower", str(siglip_folder),
            "--image_folder", str(data), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True",
            "--bf16", "True", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_strategy", "no",
            "--disable_tqdm", "True", "--seed", "0", "--model_max_length", "160", "--mm_projector_type",
            "mlp2x_gelu", "--version", "v1", "--learning_rate", "3e-3", "--max_steps", "3",
            "--image_aspect_ratio", "pad", "--unfreeze_mm_vision_tower", "True",
            "--data_path", str(tmp_path / "data.json")]
    model_args, data_args, training_args = parse(argv)
    summary = train(model_args, data_args, training_args, progress=False)
    assert summary["last_loss"] < summary["first_loss"] and summary["skipped"] == {}

    tokenizer, model, processor, _ = load_pretrained_model(tmp_path / "out", dtype=torch.float32)
    assert model.mm_projector[0].in_features == 32  # projector input = SigLIP hidden size
    stock = SiglipVisionModel.from_pretrained(siglip_folder)
    trained = model.get_vision_tower().vision_tower  # the unfrozen tower's trained weights came back
    assert not torch.equal(trained.encoder.layers[0].mlp.fc1.weight, stock.encoder.layers[0].mlp.fc1.weight)
    dataset = LlavaDataset(data_args, tokenizer, processor, "v1", 160, 16, progress=False)
    assert dataset[0]["image"].shape == dataset[7]["image"].shape == (3, 32, 32)  # image and text-only

    export_hf_llava(model, tokenizer, tmp_path / "hf")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["vision_feature_select_strategy"] == "full" and config["image_seq_length"] == 16
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    prompt = generation_prompt("What colour is the star?", get_template("v1"))
    inputs = hf_processor(images=Image.new("RGB", (32, 32), (200, 30, 30)), text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == config["image_token_index"]).sum() == 16  # every SigLIP token, no CLS
    with torch.no_grad():
        hf_logits = hf.eval()(**inputs).logits
        ours = model(input_ids=torch.tensor([tokenize_prompt(prompt, tokenizer)[0]]),
                     images=inputs["pixel_values"]).logits
    assert hf_logits.shape[1] == ours.shape[1]
    torch.testing.assert_close(hf_logits[..., : ours.shape[-1]], ours, atol=1e-4, rtol=1e-4)


def test_siglip2_naflex_trains_in_stage2_and_exports_with_its_own_processor(tmp_path):
    from types import SimpleNamespace

    from transformers import AutoImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    from llava_integration.builder import build_vision_tower
    from llm2clip.data.images import naflex_processor
    from llm2clip.vision import vision_inputs

    torch.manual_seed(0)
    Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, patch_size=8, num_patches=16)).save_pretrained(
        tmp_path / "s2")
    naflex_processor(make_image_processor(32, family="siglip2"), 8).save_pretrained(tmp_path / "s2")
    cfg = load_config(None, [f"vision.model={tmp_path / 's2'}", "stage2.model.loss=siglip", "data.image_size=32",
                             "stage2.model.embed_dim=16", "stage2.model.adapter_depth=1"])
    model = build_llm2clip(cfg, LLM_DIM, None).eval()
    image = Image.fromarray((torch.rand(50, 50, 3, generator=torch.Generator().manual_seed(5)) * 255).byte().numpy())
    hf_inputs = AutoImageProcessor.from_pretrained(tmp_path / "s2")(images=image, return_tensors="pt")
    assert hf_inputs["spatial_shapes"].tolist() == [[4, 4]]
    pixels = processor_for(cfg)(images=image, return_tensors="pt")["pixel_values"]  # [1, 3, 32, 32] square
    ours = vision_inputs(model.vision.config, pixels)  # patchified as Siglip2ImageProcessor does
    torch.testing.assert_close(ours["pixel_values"], hf_inputs["pixel_values"])
    with torch.no_grad():
        stock = Siglip2VisionModel.from_pretrained(tmp_path / "s2").eval()
        torch.testing.assert_close(model.encode_image(pixels, normalize=False),
                                   model.visual_projection(stock(**hf_inputs).pooler_output))

    g = torch.Generator().manual_seed(3)
    captions = [{"short_caption": f"s{i}", "long_caption": f"l{i}"} for i in range(N)]
    images = ImageSet([f"k{i}" for i in range(N)], torch.randn(N, 3, 32, 32, generator=g), captions, stats=None)
    run = TrainConfig(steps=4, batch_size=N, lr=1e-3, warmup_steps=0, checkpoint_every=0, out=str(tmp_path / "run"),
                      precision="fp32")
    summary = train_contrastive(model.train(), Vectors(), images,
                                CaptionSampler("short_caption", ["long_caption"], 0.0, 0), run, name="siglip2",
                                loss="siglip", progress=False, device=torch.device("cpu"))
    assert summary["skipped_nonfinite"] == 0 and summary["loss_last"] < summary["loss_first"]

    model.eval()
    export_vision_tower(model, tmp_path / "tower", processor_for(cfg))  # the square one becomes NaFlex's
    assert json.loads((tmp_path / "tower/config.json").read_text())["model_type"] == "siglip2_vision_model"
    saved = json.loads((tmp_path / "tower/preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "Siglip2ImageProcessor" and saved["max_num_patches"] == 16
    exported, info = Siglip2VisionModel.from_pretrained(tmp_path / "tower", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_inputs = AutoImageProcessor.from_pretrained(tmp_path / "tower")(images=image, return_tensors="pt")
    with torch.no_grad():
        theirs = exported.eval()(**hf_inputs, output_hidden_states=True)
        mine = model.vision(**vision_inputs(model.vision.config, pixels), output_hidden_states=True)
    for a, b in zip(mine.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ConfigError, match="SigLIP 2 NaFlex tower"):
        build_vision_tower(SimpleNamespace(mm_vision_tower=str(tmp_path / "tower")))
