"""Folders that other tools read, written so that every transformers major loads them the same.

transformers 5.x flattened the vision models: `CLIPVisionModel.state_dict()` is `embeddings.*`,
`encoder.layers.*`, where 4.x (and every hub checkpoint, e.g. openai/clip-vit-large-patch14-336) has
`vision_model.embeddings.*`. 5.x reads both layouts; 4.x (LLaVA pins 4.37.2) reads only the hub's and
turns a flat folder into a randomly initialised tower with a warning. So every folder we hand to other
repos is written in the hub's canonical layout, and its config carries the 4.x spellings of renamed
keys (`torch_dtype`, `rope_theta`). `save_portable` then reloads what it wrote and refuses to finish
unless every key loads and the weights are identical: a future transformers change is caught at
export, not in a user's repo. tests/compat/ loads the same folders under transformers 4.37.2 and 4.45.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from .errors import Llm2ClipError

# Models whose 4.x module tree wraps the vision transformer in `vision_model` (5.x drops the wrapper).
VISION_WRAPPED = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel", "Siglip2VisionModel")
# Multimodal models whose `vision_tower` is one of those, saved at the file's top level.
TOWER_HOLDERS = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")


class ExportError(Llm2ClipError):
    """A written folder does not reload as what was written."""


def canonical_key(model_class: str, key: str) -> str:
    """The hub's (4.x) name of a key that 5.x's save_pretrained wrote."""
    if model_class in VISION_WRAPPED and not key.startswith("vision_model."):
        return "vision_model." + key
    tower = "vision_tower."
    if model_class in TOWER_HOLDERS and key.startswith(tower) and not key.startswith(tower + "vision_model."):
        return "vision_tower.vision_model." + key.removeprefix("vision_tower.")
    return key


def portable_config(config: dict) -> dict:
    """`config` (a to_dict()) plus the 4.x spellings of keys 5.x renamed, nested configs included."""
    out = dict(config)
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    rope = out.get("rope_parameters")
    if isinstance(rope, dict):  # 4.x reads rope_theta (default 1e4: Llama-3's 5e5 would go silently wrong)
        if "rope_theta" in rope:
            out.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    for key, value in config.items():
        if key.endswith("_config") and isinstance(value, dict):
            out[key] = portable_config(value)
    return out


def _legacy_merges(tokenizer_json: Path) -> None:
    """BPE merges as "a b" strings: tokenizers < 0.20 (under transformers 4.37) reads no [a, b] pairs.
    Left as pairs when a merged piece holds a space, which only the pair form can say."""
    if not tokenizer_json.is_file():
        return
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    merges = data.get("model", {}).get("merges")
    if merges and isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
        tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def _rewrite_weights(folder: Path, model_class: str) -> None:
    """Rename the keys of model.safetensors (or each shard, and the index) to the canonical layout."""
    from safetensors.torch import load_file, save_file

    index = folder / "model.safetensors.index.json"
    shards = sorted({*json.loads(index.read_text())["weight_map"].values()}) if index.is_file() else \
        ["model.safetensors"]
    for shard in shards:
        state = load_file(str(folder / shard))
        save_file({canonical_key(model_class, k): v for k, v in state.items()}, str(folder / shard),
                  metadata={"format": "pt"})
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {canonical_key(model_class, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")


def save_portable(model: nn.Module, folder: str | Path, processor=None) -> Path:
    """`model.save_pretrained(folder)` in the hub's canonical layout, then reloaded and checked."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    model_class = type(model).__name__
    _rewrite_weights(folder, model_class)
    config_file = folder / "config.json"
    config_file.write_text(json.dumps(portable_config(json.loads(config_file.read_text())), indent=2,
                                      sort_keys=True) + "\n")
    if processor is not None:
        processor.save_pretrained(str(folder))
        portable_processor_files(folder)
    verify_reload(folder, model)
    return folder


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, readable by transformers 4.x as well."""
    tokenizer.save_pretrained(str(folder))
    portable_processor_files(Path(folder))


def portable_processor_files(folder: Path) -> None:
    """Give a folder's tokenizer and processor files the names and keys transformers 4.x looks for.

    5.x writes the tokenizer class as `TokenizersBackend` (4.x: no such class), special tokens as
    `extra_special_tokens`, the chat template as chat_template.jinja and a processor's image settings
    only inside processor_config.json; 4.x reads `PreTrainedTokenizerFast`, `additional_special_tokens`,
    `chat_template` in tokenizer_config.json and preprocessor_config.json. 5.x reads all of these too."""
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file():
        data = json.loads(tokenizer_config.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
        if isinstance(data.get("extra_special_tokens"), list):
            data.setdefault("additional_special_tokens", data["extra_special_tokens"])
        template = folder / "chat_template.jinja"
        if template.is_file():
            data.setdefault("chat_template", template.read_text())
        tokenizer_config.write_text(json.dumps(data, indent=2) + "\n")
    _legacy_merges(folder / "tokenizer.json")
    processor_config = folder / "processor_config.json"
    if processor_config.is_file() and not (folder / "preprocessor_config.json").is_file():
        image_processor = json.loads(processor_config.read_text()).get("image_processor")
        if isinstance(image_processor, dict):
            (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")


def verify_reload(folder: str | Path, model: nn.Module) -> None:
    """Reload `folder` as `type(model)` and require every key present, none unexpected, equal tensors."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        reloaded, info = type(model).from_pretrained(str(folder), output_loading_info=True,
                                                     dtype=next(model.parameters()).dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = {k: sorted(info[k])[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if bad:
        raise ExportError(f"{folder} does not reload as a {type(model).__name__}: {bad}. The transformers "
                          "version in use changed its checkpoint layout; report it with `pip show transformers`")
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if name in expected and not torch.equal(tensor.cpu(), expected[name].detach().cpu().to(tensor.dtype)):
            raise ExportError(f"{folder}: weight {name} reloads with other values than were saved")


def vision_is_wrapped() -> bool:
    """True under transformers 4.x, whose CLIPVisionModel holds its layers in `vision_model`."""
    import transformers

    return int(transformers.__version__.split(".")[0]) < 5


def load_vision_layout(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Either layout of the vision weights under `prefix`, renamed to the installed transformers' own."""
    pattern = re.compile("^" + re.escape(prefix) + "vision_model\\.")
    wrapped = vision_is_wrapped()
    out = {}
    for key, value in state.items():
        if key.startswith(prefix) and wrapped and not pattern.match(key):
            key = prefix + "vision_model." + key[len(prefix):]
        elif key.startswith(prefix) and not wrapped:
            key = pattern.sub(prefix, key)
        out[key] = value
    return out
