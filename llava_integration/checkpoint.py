"""Saving and reloading LLaVA outputs, in stock LLaVA's layouts (layout.py; docs/LLAVA.md).

    pretraining   mm_projector.bin (+ .safetensors), config.json, tokenizer
    LoRA / QLoRA  adapter_model.safetensors + adapter_config.json (peft), non_lora_trainables.bin
                  (+ .safetensors: the projector and any other trainable non-LoRA weight), config.json
    full          model.safetensors: the LLM and `model.mm_projector.*`, as LlavaLlamaForCausalLM saves it;
                  config.json (llava_llama), tokenizer; an unfrozen tower's weights in vision_tower.safetensors

config.json is the LLM's config with LLaVA's multimodal keys (mm_vision_tower, mm_hidden_size, ...).
Like LLaVA, checkpoints do not hold the tower: it is rebuilt from `mm_vision_tower`, an absolute path.
`load_pretrained_model` reloads any of them (and the older layout with the projector beside the LLM);
with load_4bit only the LLM is quantised, so the projector never becomes a [N, 1] 4-bit blob (LLaVA #744).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from llm2clip.errors import ConfigError
from llm2clip.portable import save_tokenizer

from .builder import build_vision_tower
from .layout import (
    BASE_KEY,
    NEWLINE,
    PEFT,
    PROJECTOR,
    TOWER,
    newline_in,
    read_lm_config,
    read_weights,
    split_llava_names,
    tower_state,
    weight_files,
    write_llava_config,
)
from .model import MM_KEYS, LlavaForCausalLM
from .projector import build_vision_projector, load_projector, read_image_newline, save_projector

NON_LORA = "non_lora_trainables"
TOWER_FILE = "vision_tower.safetensors"  # an unfrozen tower's weights beside a full output
PEFT_010_FIELDS = {"alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
                   "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
                   "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout", "megatron_config",
                   "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
                   "target_modules", "task_type", "use_dora", "use_rslora"}  # LoraConfig of peft 0.10.0


def gathered_state(named: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """CPU copies of (possibly ZeRO-3-partitioned) parameters, as LLaVA's maybe_zero_3 does."""
    params = [p for _, p in named if hasattr(p, "ds_id")]
    context = nullcontext()
    if params:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(params)
    with context:
        return {name: p.detach().cpu().clone().contiguous() for name, p in named}


def save_llava(model: LlavaForCausalLM, tokenizer, output_dir: str | Path, *, projector_only: bool,
               is_main: bool = True, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write `model` in LLaVA's layout. `state_dict`: the full weights when the model's own are ZeRO-3
    partitions (HF Trainer gathers them); otherwise partitioned parameters are gathered here."""
    from peft import PeftModel
    from safetensors.torch import save_file

    out = Path(output_dir)
    lm = model.language_model
    if state_dict is None:
        projector_state = gathered_state(list(model.mm_projector.named_parameters()))
        tower_trained = gathered_state([(n, p) for n, p in model.named_parameters()
                                        if p.requires_grad and n.startswith("vision_tower.")])
        lm_state = None
    else:
        projector_state = {k.removeprefix("mm_projector."): v for k, v in state_dict.items()
                           if k.startswith("mm_projector.")}
        tower_trained = {k: v for k, v in state_dict.items() if k.startswith("vision_tower.")
                         and model.get_parameter(k).requires_grad}
        lm_state = {k.removeprefix("language_model."): v for k, v in state_dict.items()
                    if k.startswith("language_model.")}
    # LLaVA-NeXT's image_newline (LlavaMetaModel.image_newline) travels with the projector, trained or not
    newline = {} if not hasattr(model, "image_newline") else {NEWLINE: (
        state_dict["image_newline"] if state_dict is not None else
        gathered_state([("image_newline", model.image_newline)])["image_newline"])}
    if not is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    config = lm.get_base_model().config if isinstance(lm, PeftModel) else lm.config
    base = getattr(config, BASE_KEY, None) or config._name_or_path
    if projector_only:
        save_projector(projector_state, out, extra=newline)
    elif isinstance(lm, PeftModel):
        lm.save_pretrained(str(out), state_dict=lm_state)
        _portable_adapter_config(out, base)
        # PeftModel(LlavaLlamaForCausalLM)'s own names (llava/train/train.py:978-984)
        state = {PEFT + PROJECTOR + k: v for k, v in projector_state.items()} | \
            tower_state(model, tower_trained, PEFT) | {PEFT + k: v for k, v in newline.items()}
        torch.save(state, out / f"{NON_LORA}.bin")
        save_file(state, str(out / f"{NON_LORA}.safetensors"), metadata={"format": "pt"})
    else:
        lm_state = dict(lm.state_dict() if lm_state is None else lm_state)
        lm.save_pretrained(str(out), state_dict=lm_state | {PROJECTOR + k: v for k, v in projector_state.items()}
                           | newline)
        if tower_trained:
            save_file(tower_state(model, tower_trained, ""), str(out / TOWER_FILE), metadata={"format": "pt"})
    write_llava_config(config, model, out, projector_only=projector_only, base=base)
    save_tokenizer(tokenizer, out)  # readable by LLaVA's transformers 4.37 / tokenizers 0.15 too


def _portable_adapter_config(out: Path, base: str) -> None:
    """adapter_config.json for the peft that LLaVA's pins allow (transformers 4.37.2 cannot import recent
    peft; peft <= 0.10 passes every key to LoraConfig and fails on newer ones): the fields peft 0.10 has,
    plus any newer field set away from its default. Names the base LLM by its absolute folder."""
    from peft import LoraConfig

    file = out / "adapter_config.json"
    data = json.loads(file.read_text())
    defaults = LoraConfig().to_dict()
    data = {k: v for k, v in data.items() if k in PEFT_010_FIELDS or k not in defaults or v != defaults[k]}
    data["base_model_name_or_path"] = os.path.abspath(base) if os.path.exists(base) else base
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _load_lm(path: str, bits: int, compute_dtype: torch.dtype, device_map, trust_remote_code: bool,
             attn_implementation: str = "sdpa", double_quant: bool = True, quant_type: str = "nf4",
             config=None, unused: tuple[str, ...] = ()):
    """The causal LM at `path`. `unused`: key prefixes the checkpoint may hold beyond the LM (a full
    LLaVA output's projector); any other leftover or missing key is an error, not a warning."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    kwargs = {"dtype": compute_dtype, "trust_remote_code": trust_remote_code,
              "attn_implementation": attn_implementation}
    if config is not None:
        kwargs["config"] = config
    if bits in (4, 8):  # LLaVA skips mm_projector; lm_head stays unquantised too, as transformers' default
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8, llm_int8_skip_modules=["mm_projector", "lm_head"],
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_quant_type=quant_type)
        kwargs["device_map"] = device_map or {"": "cuda" if torch.cuda.is_available() else "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if not unused:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would list the projector's keys: checked below
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(unused))
    bad = {"missing": sorted(info["missing_keys"])[:3], "unexpected": unexpected[:3],
           "mismatched": sorted(info["mismatched_keys"])[:3]}
    if any(bad.values()):
        raise ConfigError(f"{path} does not load as a {type(lm).__name__} plus a projector: {bad}; is it a "
                          "full fine-tuning output of this LLM family?")
    return lm


def assemble(lm, config_source, dtype: torch.dtype, projector_path=None) -> LlavaForCausalLM:
    """Tower (rebuilt from mm_vision_tower) + projector (+ weights: a file or a state dict) around an LLM.
    A projector file's image_newline is loaded too (a pretraining without one leaves LLaVA-NeXT's init)."""
    mm = {k: getattr(config_source, k) for k in MM_KEYS if hasattr(config_source, k)}
    # the tower also needs where aliases resolve and whether it trains (not config keys of the LLM)
    tower_only = {k: getattr(config_source, k) for k in ("llm2clip_run_dir", "unfreeze_mm_vision_tower")
                  if getattr(config_source, k, None) is not None}
    tower = build_vision_tower(SimpleNamespace(**mm, **tower_only))
    tower.to(dtype=dtype)
    projector = build_vision_projector(SimpleNamespace(
        mm_projector_type=mm.get("mm_projector_type", "linear"), mm_hidden_size=tower.hidden_size,
        hidden_size=lm.config.hidden_size))
    if projector_path is not None:
        load_projector(projector, projector_path)
    for key, value in mm.items():
        setattr(lm.config, key, value)
    model = LlavaForCausalLM(lm, tower, projector.to(dtype))
    if isinstance(projector_path, str | Path) and hasattr(model, "image_newline"):
        _set_newline(model, read_image_newline(projector_path), projector_path, required=False)
    return model


def _set_newline(model: LlavaForCausalLM, newline: torch.Tensor | None, source, required: bool) -> None:
    if newline is None and required:
        raise ConfigError(f"{source} holds no image_newline but the model merges with '{model.merge_type}'; "
                          "it was not saved by this version: retrain or re-save it")
    if newline is not None:
        with torch.no_grad():
            model.image_newline.copy_(newline)


def load_pretrained_model(model_path: str | Path, model_base: str | None = None, load_8bit: bool = False,
                          load_4bit: bool = False, device_map=None, dtype: torch.dtype = torch.bfloat16,
                          trust_remote_code: bool = False):
    """LLaVA's loader: returns (tokenizer, model, image_processor, context_len). Routing is by the files
    present, not by the folder's name (stock LLaVA needs 'llava' and 'lora' in it: #1597, #245)."""
    from transformers import AutoTokenizer

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a LLaVA output folder (no config.json)")
    bits = 4 if load_4bit else 8 if load_8bit else 16
    lm_config, data = read_lm_config(path, trust_remote_code)
    config = SimpleNamespace(**data)
    base = model_base or data.get(BASE_KEY)
    is_lora = (path / "adapter_config.json").is_file()
    full = weight_files(path) or sorted(path.glob("pytorch_model*.bin"))
    projector_only = not is_lora and not full
    if (is_lora or projector_only) and not base:
        raise ConfigError(f"{path} holds no LLM weights; pass model_base (the LLM it was trained on)")
    if is_lora or projector_only:
        lm = _load_lm(base, bits, dtype, device_map, trust_remote_code)
    else:  # stock LLaVA's full checkpoints also hold the tower it was trained with
        lm = _load_lm(str(path), bits, dtype, device_map, trust_remote_code, config=lm_config,
                      unused=(PROJECTOR, TOWER, NEWLINE))
    tower_weights, newline = {}, None
    if is_lora:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(path))
        if bits == 16:
            lm = lm.merge_and_unload()  # 4-bit bases keep the adapter unmerged
        non_lora = path / f"{NON_LORA}.safetensors"
        non_lora = non_lora if non_lora.is_file() else non_lora.with_suffix(".bin")  # stock LLaVA writes .bin
        weights = read_weights([non_lora])
        _, projector, tower_weights = split_llava_names(weights)
        newline = newline_in(weights)
    elif projector_only:
        projector = path  # mm_projector.safetensors, else stock LLaVA's mm_projector.bin
        newline = read_image_newline(path)
    elif (path / "mm_projector.safetensors").is_file():  # the older full layout
        projector = path / "mm_projector.safetensors"
        newline = read_image_newline(projector)
    else:
        projector = {k.removeprefix(PROJECTOR): v for k, v in read_weights(full, (PROJECTOR,)).items()}
        newline = newline_in(read_weights(full, (NEWLINE,)))
    model = assemble(lm, config, dtype, projector)
    if hasattr(model, "image_newline"):
        _set_newline(model, newline, path, required=True)
    if not is_lora:
        extra = [path / TOWER_FILE] if (path / TOWER_FILE).is_file() else []
        tower_weights = split_llava_names(read_weights([*full, *extra], (TOWER,)))[2]
    if tower_weights:
        _load_tower_weights(model, tower_weights, path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), config=lm_config)  # config.json says llava_llama
    model.eval()
    tower = model.get_vision_tower()
    return tokenizer, model, tower.image_processor, getattr(config, "tokenizer_model_max_length", 2048)


def _load_tower_weights(model: LlavaForCausalLM, state: dict[str, torch.Tensor], path: Path) -> None:
    """An unfrozen tower's trained weights (`vision_tower.vision_tower.*` of our model)."""
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ConfigError(f"{path}: tower weights {unexpected[:3]} do not fit the tower at mm_vision_tower")


def restore_trainables(model: LlavaForCausalLM, folder: str | Path) -> None:
    """Load what `save_llava` wrote into `folder` back into a model being trained (resuming from a
    Trainer checkpoint, whose weights are in LLaVA's layout rather than the Trainer's)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    lm = model.language_model
    projector, tower, newline = {}, {}, None
    if (folder / "mm_projector.safetensors").is_file():
        load_projector(model.mm_projector, folder / "mm_projector.safetensors")
        newline = read_image_newline(folder / "mm_projector.safetensors")
    if isinstance(lm, PeftModel) and (folder / "adapter_model.safetensors").is_file():
        set_peft_model_state_dict(lm, load_file(str(folder / "adapter_model.safetensors")))
    elif not isinstance(lm, PeftModel) and weight_files(folder):
        weights = read_weights(weight_files(folder))
        lm_state, projector, tower = split_llava_names(weights)
        newline = newline_in(weights) if newline is None else newline
        unexpected = lm.load_state_dict(lm_state, strict=False).unexpected_keys
        if unexpected:
            raise ConfigError(f"{folder} holds LM weights this model does not have: {unexpected[:3]}")
    for name in (f"{NON_LORA}.safetensors", TOWER_FILE):
        if (folder / name).is_file():
            weights = load_file(str(folder / name))
            _, more_projector, more_tower = split_llava_names(weights)
            projector, tower = projector | more_projector, tower | more_tower
            newline = newline_in(weights) if newline is None else newline
    if projector:
        load_projector(model.mm_projector, projector)
    if tower:
        _load_tower_weights(model, tower, folder)
    if hasattr(model, "image_newline"):
        _set_newline(model, newline, folder, required=True)
