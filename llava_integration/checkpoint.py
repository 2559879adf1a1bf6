"""Saving and reloading LLaVA outputs, in LLaVA's layouts.

    pretraining   mm_projector.bin (+ .safetensors), config.json, tokenizer
    LoRA / QLoRA  adapter_model.safetensors + adapter_config.json (peft), non_lora_trainables.bin
                  (+ .safetensors: the projector and any other trainable non-LoRA weight), config.json
    full          the LLM (save_pretrained), mm_projector.bin (+ .safetensors), tokenizer

config.json is the LLM's config with LLaVA's multimodal keys (mm_vision_tower, mm_hidden_size, ...).
Like LLaVA, checkpoints do not hold the tower: it is rebuilt from `mm_vision_tower`.
`load_pretrained_model` reloads any of them; with load_4bit only the LLM is quantised, so the
projector never becomes a [N, 1] 4-bit blob (LLaVA #744).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from llm2clip.errors import ConfigError

from .builder import build_vision_tower
from .model import MM_KEYS, LlavaForCausalLM
from .projector import build_vision_projector, load_projector, read_image_newline, save_projector

NON_LORA = "non_lora_trainables"
BASE_KEY = "llava_base_model"  # the LLM a projector-only or LoRA output was trained on


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
        extra_state = gathered_state([(f"model.{n}", p) for n, p in model.named_parameters()
                                      if p.requires_grad and not n.startswith(("language_model.", "mm_projector.",
                                                                               "image_newline"))])
        lm_state = None
    else:
        projector_state = {k.removeprefix("mm_projector."): v for k, v in state_dict.items()
                           if k.startswith("mm_projector.")}
        extra_state = {f"model.{k}": v for k, v in state_dict.items() if k.startswith("vision_tower.")
                       and model.get_parameter(k).requires_grad}
        lm_state = {k.removeprefix("language_model."): v for k, v in state_dict.items()
                    if k.startswith("language_model.")}
    # LLaVA-NeXT's image_newline always travels with the projector, trained or not
    newline = {} if not hasattr(model, "image_newline") else {"model.image_newline": (
        state_dict["image_newline"] if state_dict is not None else
        gathered_state([("image_newline", model.image_newline)])["image_newline"])}
    if not is_main:
        return
    out.mkdir(parents=True, exist_ok=True)
    config = lm.get_base_model().config if isinstance(lm, PeftModel) else lm.config
    if projector_only:
        save_projector(projector_state, out, extra=newline)
        _save_config(config, out)
    elif isinstance(lm, PeftModel):
        lm.save_pretrained(str(out), state_dict=lm_state)
        state = {f"model.mm_projector.{k}": v for k, v in projector_state.items()} | extra_state | newline
        torch.save(state, out / f"{NON_LORA}.bin")
        save_file(state, str(out / f"{NON_LORA}.safetensors"), metadata={"format": "pt"})
        _save_config(config, out)
    else:
        lm.save_pretrained(str(out), state_dict=lm_state)
        save_projector(projector_state, out, extra=newline)
        if extra_state:
            save_file(extra_state, str(out / "vision_tower.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))


def _save_config(config, out: Path) -> None:
    config.save_pretrained(str(out))
    data = json.loads((out / "config.json").read_text())
    data.setdefault(BASE_KEY, getattr(config, BASE_KEY, None) or config._name_or_path)
    (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")


def _load_lm(path: str, bits: int, compute_dtype: torch.dtype, device_map, trust_remote_code: bool,
             attn_implementation: str = "sdpa", double_quant: bool = True, quant_type: str = "nf4"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": compute_dtype, "trust_remote_code": trust_remote_code,
              "attn_implementation": attn_implementation}
    if bits in (4, 8):  # LLaVA skips mm_projector; lm_head stays unquantised too, as transformers' default
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4, load_in_8bit=bits == 8, llm_int8_skip_modules=["mm_projector", "lm_head"],
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_quant_type=quant_type)
        kwargs["device_map"] = device_map or {"": "cuda" if torch.cuda.is_available() else "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def assemble(lm, config_source, dtype: torch.dtype, projector_path: str | Path | None = None,
             require_newline: bool = False) -> LlavaForCausalLM:
    """Tower (rebuilt from mm_vision_tower) + projector (+ weights) around a loaded LLM."""
    mm = {k: getattr(config_source, k) for k in MM_KEYS if hasattr(config_source, k)}
    tower = build_vision_tower(SimpleNamespace(**mm))
    tower.to(dtype=dtype)
    projector = build_vision_projector(SimpleNamespace(
        mm_projector_type=mm.get("mm_projector_type", "linear"), mm_hidden_size=tower.hidden_size,
        hidden_size=lm.config.hidden_size))
    if projector_path is not None:
        load_projector(projector, projector_path)
    for key, value in mm.items():
        setattr(lm.config, key, value)
    model = LlavaForCausalLM(lm, tower, projector.to(dtype))
    if projector_path is not None and hasattr(model, "image_newline"):
        _load_newline(model, projector_path, required=require_newline)
    return model


def _load_newline(model: LlavaForCausalLM, path: str | Path, required: bool) -> None:
    """image_newline from a projector file; a pretraining without it leaves LLaVA-NeXT's random init."""
    newline = read_image_newline(path)
    if newline is None and required:
        raise ConfigError(f"{path} holds no image_newline but the model merges with "
                          f"'{model.merge_type}'; it was not saved by this version: retrain or re-save it")
    if newline is not None:
        with torch.no_grad():
            model.image_newline.copy_(newline)


def load_pretrained_model(model_path: str | Path, model_base: str | None = None, load_8bit: bool = False,
                          load_4bit: bool = False, device_map=None, dtype: torch.dtype = torch.bfloat16,
                          trust_remote_code: bool = False):
    """LLaVA's loader: returns (tokenizer, model, image_processor, context_len). Routing is by the files
    present, not by the folder's name (LLaVA needs 'llava' and 'lora' in it: #1597, #245)."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a LLaVA output folder (no config.json)")
    bits = 4 if load_4bit else 8 if load_8bit else 16
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    base = model_base or getattr(config, BASE_KEY, None)
    is_lora = (path / "adapter_config.json").is_file()
    projector_only = not is_lora and not any(path.glob("model*.safetensors")) and not any(path.glob("pytorch_model*"))
    if (is_lora or projector_only) and not base:
        raise ConfigError(f"{path} holds no LLM weights; pass model_base (the LLM it was trained on)")
    lm = _load_lm(base if (is_lora or projector_only) else str(path), bits, dtype, device_map, trust_remote_code)
    if is_lora:
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, str(path))
        if bits == 16:
            lm = lm.merge_and_unload()  # 4-bit bases keep the adapter unmerged
    projector_file = path / (f"{NON_LORA}.safetensors" if is_lora else "mm_projector.safetensors")
    model = assemble(lm, config, dtype, projector_file, require_newline=True)
    if (path / "vision_tower.safetensors").is_file() or is_lora:
        _load_tower_weights(model, path, is_lora)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    tower = model.get_vision_tower()
    return tokenizer, model, tower.image_processor, getattr(config, "tokenizer_model_max_length", 2048)


def _load_tower_weights(model: LlavaForCausalLM, path: Path, is_lora: bool) -> None:
    """An unfrozen tower's trained weights (saved beside the LLM or among the non-LoRA trainables)."""
    from safetensors.torch import load_file

    file = path / (f"{NON_LORA}.safetensors" if is_lora else "vision_tower.safetensors")
    state = {k.removeprefix("model.vision_tower."): v for k, v in load_file(str(file)).items()
             if k.startswith("model.vision_tower.")}
    if state:
        _, unexpected = model.vision_tower.load_state_dict(state, strict=False)
        if unexpected:
            raise ConfigError(f"{file}: tower weights {unexpected[:3]} do not fit the tower at mm_vision_tower")


def restore_trainables(model: LlavaForCausalLM, folder: str | Path) -> None:
    """Load what `save_llava` wrote into `folder` back into a model being trained (resuming from a
    Trainer checkpoint, whose weights are in LLaVA's layout rather than the Trainer's)."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    lm = model.language_model
    if (folder / "mm_projector.safetensors").is_file():
        load_projector(model.mm_projector, folder / "mm_projector.safetensors")
        if hasattr(model, "image_newline"):
            _load_newline(model, folder / "mm_projector.safetensors", required=True)
    if isinstance(lm, PeftModel) and (folder / "adapter_model.safetensors").is_file():
        set_peft_model_state_dict(lm, load_file(str(folder / "adapter_model.safetensors")))
    elif not isinstance(lm, PeftModel) and list(folder.glob("model*.safetensors")):
        state = {}
        for shard in sorted(folder.glob("model*.safetensors")):
            state.update(load_file(str(shard)))
        unexpected = lm.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise ConfigError(f"{folder} holds LM weights this model does not have: {unexpected[:3]}")
    extras = {}
    for name in (f"{NON_LORA}.safetensors", "vision_tower.safetensors"):
        if (folder / name).is_file():
            extras.update({k.removeprefix("model."): v for k, v in load_file(str(folder / name)).items()})
    if extras:
        model.load_state_dict(extras, strict=False)
