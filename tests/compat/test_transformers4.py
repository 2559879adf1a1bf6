"""Every folder another tool reads loads the same under transformers 4.37.2 (LLaVA's pin), 4.45 and 5.x.

The folders are written by our real writers (vision tower export, whole-model folder, Knowledge-CLIP's
CLIP folder, the baseline's tower, converted released checkpoints, the LLaVA HF export), then loaded in
a side environment with the stock classes: 0 missing, 0 unexpected keys, and outputs within 1e-5 of
what transformers 5.x computes from the same folders.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.compat import side_env
from tests.compat.load_folders import load_entry

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("LLM2CLIP_SKIP_COMPAT") == "1", reason="LLM2CLIP_SKIP_COMPAT=1")]

VERSIONS = ["4.37.2", "4.45.2"]
SCRIPT = Path(__file__).with_name("load_folders.py")
TEXT = "a red circle on a blue background"


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """No LayerNorm left at ones or bias at zero: every tensor must land where it belongs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _llm2clip_model(family: str = "clip"):
    import transformers

    from llm2clip.model import LLM2CLIP, ModelConfig

    torch.manual_seed(0)
    name = {"clip": "CLIPVision", "siglip": "SiglipVision"}[family]
    vision = getattr(transformers, name + "Model")(getattr(transformers, name + "Config")(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8))
    model = LLM2CLIP(vision, 24, ModelConfig(embed_dim=16, adapter_depth=1))
    _perturb(model, 1)
    return model.eval()


def _llava_model(tower_folder: Path, tokenizer, anyres: bool = False):
    from transformers import AutoModelForCausalLM

    from llava_integration.builder import build_vision_tower
    from llava_integration.model import LlavaForCausalLM
    from llava_integration.projector import build_vision_projector
    from llm2clip.tiny import tiny_llm_config

    # Llama-3's rope theta: transformers 4.x reads `rope_theta`, 5.x `rope_parameters`; both must agree
    config = tiny_llm_config("llama", vocab_size=len(tokenizer), hidden_size=64, num_layers=2,
                             rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                             tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(2)
    lm = AutoModelForCausalLM.from_config(config)
    lm.config.mm_projector_type = "mlp2x_gelu"
    if anyres:  # LLaVA-NeXT: tiles of the tower's 32 px, spatially unpadded, with an image_newline
        lm.config.image_aspect_ratio, lm.config.mm_patch_merge_type = "anyres", "spatial_unpad"
        lm.config.image_grid_pinpoints = [[32, 64], [64, 32], [64, 64]]
    tower = build_vision_tower(SimpleNamespace(mm_vision_tower=str(tower_folder), mm_vision_select_layer=-2,
                                               mm_vision_select_feature="patch"))
    projector = build_vision_projector(SimpleNamespace(mm_projector_type="mlp2x_gelu",
                                                       mm_hidden_size=tower.hidden_size, hidden_size=64))
    model = LlavaForCausalLM(lm, tower, projector)
    _perturb(model, 3)
    return model.eval()


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory) -> dict:
    """Writes every folder kind with our writers; returns the manifest and 5.x's own outputs."""
    from transformers import AutoProcessor, AutoTokenizer

    from llava_integration.hf_export import export_hf_llava
    from llava_integration.hf_export_next import export_hf_llava_next
    from llm2clip.convert import convert_released_llm2clip
    from llm2clip.data.images import make_image_processor
    from llm2clip.export import export_model, export_vision_tower
    from tests.test_convert_released import Released, _write
    from tests.test_knowledge import _tiny_knowledge_clip

    root = tmp_path_factory.mktemp("compat")
    model = _llm2clip_model()
    export_vision_tower(model, root / "vision_tower")
    export_model(model, root / "llm2clip")
    export_vision_tower(_llm2clip_model("siglip"), root / "siglip_vision_tower")
    knowledge = _tiny_knowledge_clip(world)
    _perturb(knowledge.clip, 4)
    knowledge.save_pretrained(root / "knowledge_clip", make_image_processor(32))
    export_vision_tower(root / "knowledge_clip", root / "clip_vision_tower")  # the baseline's tower path
    released = Released().eval()
    _perturb(released, 5)
    src = _write(root / "LLM2CLIP-Openai-tiny", released.released_state())
    convert_released_llm2clip(src, root / "converted", vision_out=root / "converted_vision")
    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    export_hf_llava(_llava_model(root / "vision_tower", tokenizer), tokenizer, root / "llava_hf")
    export_hf_llava_next(_llava_model(root / "vision_tower", tokenizer, anyres=True), tokenizer, root / "llava_next")

    config = json.loads((root / "llava_hf" / "config.json").read_text())
    image_id, n = config["image_token_index"], config["image_seq_length"]
    head, tail = tokenizer("USER:")["input_ids"], tokenizer(" what colour? ASSISTANT:")["input_ids"]
    g = torch.Generator().manual_seed(6)
    inputs = {"pixels": torch.randn(2, 3, 32, 32, generator=g), "vectors": torch.randn(2, 24, generator=g) * 5,
              "clip_ids": torch.tensor([knowledge.tokenize([TEXT])["input_ids"][0].tolist()]),
              "llava_ids": torch.tensor([head + [image_id] * n + tail]),
              "llava_ids_single": torch.tensor([[*head, image_id, *tail]])}
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(root / "im.png")
    image = Image.open(root / "im.png").convert("RGB")
    next_inputs = AutoProcessor.from_pretrained(root / "llava_next")(
        images=image, text="USER: <image>\nwhat colour? ASSISTANT:", return_tensors="pt")
    inputs |= {"next_ids": next_inputs["input_ids"], "next_pixels": next_inputs["pixel_values"],
               "next_sizes": next_inputs["image_sizes"]}
    save_file(inputs, str(root / "inputs.safetensors"))
    entries = [{"name": "vision_tower", "kind": "vision", "path": str(root / "vision_tower")},
               {"name": "llm2clip", "kind": "llm2clip", "path": str(root / "llm2clip")},
               {"name": "siglip_vision_tower", "kind": "vision", "path": str(root / "siglip_vision_tower")},
               {"name": "knowledge_clip", "kind": "clip", "path": str(root / "knowledge_clip"), "text": TEXT},
               {"name": "clip_vision_tower", "kind": "vision", "path": str(root / "clip_vision_tower")},
               {"name": "converted", "kind": "llm2clip", "path": str(root / "converted")},
               {"name": "converted_vision", "kind": "vision", "path": str(root / "converted_vision")},
               {"name": "llava_hf", "kind": "llava_hf", "path": str(root / "llava_hf"), "text": TEXT},
               {"name": "llava_next", "kind": "llava_next_hf", "path": str(root / "llava_next"), "text": TEXT,
                "min_transformers": [4, 39]}]
    manifest = {"inputs": str(root / "inputs.safetensors"), "image": str(root / "im.png"), "entries": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    reference = {}
    for entry in entries:  # transformers 5.x, this process: the same loaders
        report, outputs = load_entry(entry, load_file(str(root / "inputs.safetensors")), image)
        assert not any(report.values()), f"{entry['name']} under 5.x: {report}"
        reference[entry["name"]] = outputs
    return {"root": root, "manifest": root / "manifest.json", "reference": reference}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_exported_folder_loads_the_same_under_transformers_4(folders, version, tmp_path):
    summary = side_env.run(version, SCRIPT, str(folders["manifest"]), str(tmp_path))
    assert summary["transformers"] == version
    for name, report in summary["reports"].items():
        assert not any(report.values()), f"{name} under transformers {version}: {report}"
    older = tuple(int(x) for x in version.split(".")[:2]) < (4, 39)  # LlavaNext arrived in 4.39
    assert summary["skipped"] == (["llava_next"] if older else [])
    for name, expected in folders["reference"].items():
        if name in summary["skipped"]:
            continue
        got = load_file(str(tmp_path / f"{name}.safetensors"))
        assert got.keys() == expected.keys(), name
        for key, value in expected.items():
            assert got[key].shape == value.shape, f"{name}.{key} under {version}"
            if value.is_floating_point():
                error = (got[key] - value).abs().max().item()
                assert error <= 1e-5, f"{name}.{key}: max |4.x - 5.x| = {error:.2e} under transformers {version}"
            else:
                assert torch.equal(got[key], value), f"{name}.{key} (token ids) differ under transformers {version}"


def test_an_export_that_does_not_reload_as_written_is_refused(monkeypatch, tmp_path):
    import llm2clip.portable as portable
    from llm2clip.export import export_vision_tower

    monkeypatch.setattr(portable, "canonical_key", lambda model_class, key: "renamed." + key)
    with pytest.raises(portable.ExportError, match="does not reload as a CLIPVisionModel"):
        export_vision_tower(_llm2clip_model(), tmp_path / "tower")
    assert not (tmp_path / "tower").exists()  # nothing half-checked is left where a user would look


def test_folders_are_written_in_the_hub_layout(folders):
    root = folders["root"]
    for name in ("vision_tower", "clip_vision_tower", "converted_vision", "siglip_vision_tower"):
        keys = load_file(str(root / name / "model.safetensors")).keys()
        assert keys and all(k.startswith("vision_model.") for k in keys), name
    llava = load_file(str(root / "llava_hf" / "model.safetensors")).keys()
    assert {k.split(".")[0] for k in llava} == {"vision_tower", "multi_modal_projector", "language_model"}
    assert all(k.startswith("vision_tower.vision_model.") for k in llava if k.startswith("vision_tower."))
    text_config = json.loads((root / "llava_hf" / "config.json").read_text())["text_config"]
    assert text_config["rope_theta"] == 500000.0  # what 4.x reads
    whole = load_file(str(root / "llm2clip" / "model.safetensors")).keys()
    assert all(k.startswith("vision.vision_model.") for k in whole if k.startswith("vision."))
    assert (root / "llava_hf" / "preprocessor_config.json").is_file()  # 4.x's processors read only this file
