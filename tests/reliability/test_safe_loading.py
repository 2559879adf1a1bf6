"""Safe loading: a crafted pickle placed where weights are read is never executed."""

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT


class _Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weight": _Payload(marker)}))
    return path


def test_a_crafted_projector_bin_is_refused_not_executed(tmp_path):
    from llava_integration.projector import read_projector_file

    marker = tmp_path / "pwned"
    with pytest.raises(Exception):  # noqa: B017  (torch's UnpicklingError, whatever its class in this version)
        read_projector_file(_crafted(tmp_path / "mm_projector.bin", marker))
    assert not marker.exists()


def test_a_crafted_pytorch_model_bin_in_a_model_folder_is_refused_not_executed(tmp_path):
    from transformers import CLIPVisionConfig

    from llm2clip.vision import load_vision_model

    folder, marker = tmp_path / "tower", tmp_path / "pwned"
    folder.mkdir()
    CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     image_size=32, patch_size=16).save_pretrained(folder)
    _crafted(folder / "pytorch_model.bin", marker)
    with pytest.raises(Exception):  # noqa: B017
        load_vision_model(folder)
    assert not marker.exists()


def test_a_pickle_dropped_into_a_checkpoint_folder_is_never_read(tmp_path):
    from llm2clip.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    model, marker = torch.nn.Linear(3, 2), tmp_path / "pwned"
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, model, None, None)
    _crafted(ckpt / "optimizer.pt", marker)  # HF Trainer's name for its pickled optimizer state
    found, damaged = latest_checkpoint(tmp_path / "ckpts")
    assert found == ckpt and not damaged
    assert load_checkpoint(found, model, None, None) == 1 and not marker.exists()


def _calls(name: str):
    for path in [*ROOT.glob("llm2clip/**/*.py"), *ROOT.glob("llava_integration/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
                yield path, node


def test_the_code_never_unpickles_and_keeps_remote_code_off_by_default():
    loads = list(_calls("load"))
    torch_loads = [(p, n) for p, n in loads if isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"]
    for path, node in torch_loads:
        flags = {k.arg: k.value for k in node.keywords}
        assert isinstance(flags.get("weights_only"), ast.Constant) and flags["weights_only"].value is True, path
    for path in [*ROOT.glob("llm2clip/**/*.py"), *ROOT.glob("llava_integration/**/*.py")]:
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
        modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not ({"pickle", "dill", "cloudpickle"} & (imported | modules)), path
    # remote code: every from_pretrained passes a flag from a config whose default is False
    from llava_integration.arguments import ModelArguments
    from llm2clip.embedder import EmbedderConfig

    assert EmbedderConfig(model="x").trust_remote_code is False and ModelArguments().trust_remote_code is False
    for path, node in _calls("from_pretrained"):
        for k in node.keywords:
            if k.arg == "trust_remote_code":
                assert not (isinstance(k.value, ast.Constant) and k.value.value is True), path


class _Touch:
    """Unpickling this would create `marker` through pathlib (no shell involved)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    return folder


def test_a_pickled_peft_adapter_needs_allow_pickle_and_is_read_weights_only(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from llm2clip.embedder import EmbedderConfig, apply_adapters
    from llm2clip.errors import ConfigError

    base, adapter = _tiny_llama(tmp_path / "base"), tmp_path / "adapter"
    peft_model = get_peft_model(AutoModel.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in peft_model.parameters():  # non-zero LoRA so the merge visibly changes the weights
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(adapter, safe_serialization=False)
    assert (adapter / "adapter_model.bin").is_file() and not (adapter / "adapter_model.safetensors").exists()
    with pytest.raises(ConfigError, match=r"only adapter_model\.bin, a pickle .*embedder\.allow_pickle=true"):
        apply_adapters(AutoModel.from_pretrained(base), str(base), [str(adapter)])
    merged = apply_adapters(AutoModel.from_pretrained(base), str(base), [str(adapter)], allow_pickle=True)
    want = peft_model.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, want[name])
    # the flag does not change the vectors, so it stays out of embedder_config.json and cache fingerprints
    assert EmbedderConfig().allow_pickle is False and "allow_pickle" not in EmbedderConfig().saved_fields()


def test_a_crafted_adapter_model_bin_never_runs(tmp_path):
    import json

    from llm2clip.embedder import CaptionEmbedder, EmbedderConfig
    from llm2clip.errors import ConfigError

    base, adapter, marker = _tiny_llama(tmp_path / "base"), tmp_path / "adapter", tmp_path / "pwned"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(base), "r": 4, "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weight": _Touch(marker)}))
    cfg = EmbedderConfig(model=str(base), adapters=[str(adapter)], device="cpu")
    with pytest.raises(ConfigError, match=r"holds only adapter_model\.bin"):
        CaptionEmbedder.load(cfg)
    with pytest.raises(ConfigError, match=r"refused by torch\.load\(weights_only=True\)"):
        CaptionEmbedder.load(EmbedderConfig(**{**cfg.__dict__, "allow_pickle": True}))
    assert not marker.exists()
