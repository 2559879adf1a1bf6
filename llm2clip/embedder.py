"""Stage 1 output: a decoder LLM turned into a caption embedder.

Bidirectional attention uses transformers' native switch (`config.is_causal = False`, transformers
>= 5.2), not llm2vec's patched mask functions, which broke silently when transformers changed. A probe
at load time proves the switch took effect, so an unsupported family fails loudly instead of
quietly staying causal.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import instructions
from .errors import ConfigError
from .guards import load_tensor_pickle
from .pooling import POOLING_MODES, pool
from .precision import bf16_autocast
from .quantization import cpu_4bit_repacking_disabled

log = logging.getLogger(__name__)
CONFIG_NAME = "embedder_config.json"
LLM2VEC_CONFIG_NAME = "llm2vec_config.json"
DEFAULT_INSTRUCTION = instructions.DEFAULT


@dataclass
class EmbedderConfig:
    model: str = "${run.out_dir}/stage1/lm"  # base LLM: local folder or hub id
    adapters: list[str] = field(default_factory=list)  # peft adapters applied in order (e.g. MNTP, then CC)
    pooling: str = "mean"  # mean | weighted_mean | eos | last_token
    skip_instruction: bool = True  # instruction tokens are attended to but not pooled
    instruction: str = DEFAULT_INSTRUCTION
    instruction_format: str = "{instruction}: "  # how the instruction is written before the text
    max_length: int = 512  # tokens, instruction included; longer texts are truncated and counted
    bidirectional: bool = True  # false keeps causal attention (ablation)
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    dtype: str = "auto"  # weights: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    autocast: bool = True  # bf16 autocast for the forward pass
    padding_side: str = "left"  # pooling is correct for either side
    batch_size: int = 32  # encode() batch size
    compile: bool = False  # torch.compile the LLM for encode() (precompute, eval): fuses the non-GEMM ops
    load_in_4bit: bool = False  # bitsandbytes nf4 with double quantisation (QLoRA)
    trust_remote_code: bool = False
    allow_pickle: bool = False  # read adapter_model.bin (torch.load(weights_only=True)) when no safetensors
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def validate(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ConfigError(f"embedder.pooling: '{self.pooling}' is not one of {', '.join(POOLING_MODES)}")
        if self.padding_side not in ("left", "right"):
            raise ConfigError("embedder.padding_side must be 'left' or 'right'")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError("embedder.dtype must be auto, float32, bfloat16 or float16")
        if self.max_length < 8 or self.batch_size < 1:
            raise ConfigError("embedder.max_length must be >= 8 and embedder.batch_size >= 1")
        if "{instruction}" not in self.instruction_format:
            raise ConfigError("embedder.instruction_format must contain '{instruction}'")

    def saved_fields(self) -> dict:
        """What changes the vectors, written beside the adapter (and into cache fingerprints)."""
        skip = {"device", "batch_size", "compile", "trust_remote_code", "allow_pickle"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_ref(key: str, value: str) -> None:
    """A model reference is an existing local folder or a hub id ('org/name'); say which key is wrong."""
    if Path(value).expanduser().exists():
        return
    if value.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(value):
        raise ConfigError(f"{key}: local path '{value}' does not exist. Fix: point it at a folder holding "
                          f"config.json, or use a hub id such as 'meta-llama/Meta-Llama-3-8B-Instruct'")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _weights_dtype(cfg: EmbedderConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def check_bidirectional(model: nn.Module, vocab_size: int) -> None:
    """Raise unless a change at a late token changes token 0's state (i.e. attention is not causal)."""
    device = next(model.parameters()).device
    ids = torch.arange(3, 11, device=device).remainder(vocab_size)[None]  # [1, 8]
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % vocab_size
    with torch.inference_mode():
        a = model(input_ids=ids).last_hidden_state[0, 0]
        b = model(input_ids=changed).last_hidden_state[0, 0]
    if torch.allclose(a.float(), b.float(), atol=0, rtol=0):
        family = getattr(model.config, "model_type", type(model).__name__)
        impl = getattr(model.config, "_attn_implementation", "?")
        raise ConfigError(
            f"model family '{family}' stayed causal with config.is_causal=False under attn_implementation='{impl}'. "
            "Bidirectional attention is verified for llama, mistral, qwen2, qwen3, gemma, gemma3 (sdpa, eager) and "
            "gemma2 (eager). Fix: pick one of those, try embedder.attn_implementation=eager, or set "
            "embedder.bidirectional=false for a causal embedder")


def adapter_weight_keys(adapter: str | Path, allow_pickle: bool = False) -> list[str]:
    """Tensor names of a peft adapter folder, read before peft opens it. A folder with only
    adapter_model.bin (a pickle: unpickling can run code) is refused unless `allow_pickle`; then it is
    read with torch.load(weights_only=True), which rebuilds tensors only, so a crafted file fails here."""
    from safetensors import safe_open

    folder = Path(adapter)
    if (folder / "adapter_model.safetensors").is_file():
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            return list(f.keys())
    pickled = folder / "adapter_model.bin"
    if not pickled.is_file():
        raise ConfigError(f"embedder.adapters: '{adapter}' holds no adapter_model.safetensors. Fix: point it at a "
                          "peft adapter folder (adapter_config.json + adapter_model.safetensors)")
    if not allow_pickle:
        raise ConfigError(f"embedder.adapters: '{adapter}' holds only adapter_model.bin, a pickle (unpickling can "
                          "run code). Fix: re-save it as safetensors (peft save_pretrained(safe_serialization=True)), "
                          "or set embedder.allow_pickle=true to read it with torch.load(weights_only=True)")
    return list(load_tensor_pickle(pickled))


def _keys_missing_from(model: nn.Module, saved: Sequence[str]) -> list[str]:
    """Adapter tensors that found no place in `model` (peft only warns about these)."""
    loaded = {k.replace(".default", "") for k in model.state_dict()}
    return [k for k in saved if k not in loaded]


def load_backbone(cfg: EmbedderConfig, device: torch.device | None = None):
    """(model, tokenizer): the base model without LM head, adapters applied, attention as configured."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    device = device or resolve_device(cfg.device)
    check_model_ref("embedder.model", cfg.model)
    hf_config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    hf_config.is_causal = not cfg.bidirectional
    kwargs: dict = {"attn_implementation": cfg.attn_implementation, "dtype": _weights_dtype(cfg, device)}
    if cfg.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModel.from_pretrained(cfg.model, config=hf_config, trust_remote_code=cfg.trust_remote_code,
                                      **kwargs)
    if not cfg.load_in_4bit:
        model.to(device)
    elif device.type == "cpu":
        # Full-precision tensors kept as they are (norms, embeddings) are views into the memory-mapped
        # checkpoint and would pin all of it, quantised layers included; copy them out.
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.clone()
    model = apply_adapters(model, cfg.model, cfg.adapters, merge=not cfg.load_in_4bit,
                           allow_pickle=cfg.allow_pickle)
    tok_source = next((a for a in reversed(cfg.adapters) if (Path(a) / "tokenizer_config.json").is_file()),
                      cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(tok_source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:  # Llama/Mistral ship none; llm2vec pads with EOS
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.bidirectional:
        with cpu_4bit_repacking_disabled(model):
            check_bidirectional(model, hf_config.vocab_size)
    return model, tokenizer


def apply_adapters(model: nn.Module, base_name: str, adapters: Sequence[str], merge: bool = True,
                   allow_pickle: bool = False) -> nn.Module:
    """Apply peft adapters in order. An adapter trained on another base model is refused by name; a
    pickled adapter (adapter_model.bin only) is refused unless `allow_pickle` (see adapter_weight_keys)."""
    from peft import PeftModel

    for adapter in adapters:
        config_file = Path(adapter) / "adapter_config.json"
        if not config_file.is_file():
            raise ConfigError(f"embedder.adapters: '{adapter}' is not a peft adapter folder (no adapter_config.json)")
        saved = adapter_weight_keys(adapter, allow_pickle)  # before peft reads the file
        trained_on = json.loads(config_file.read_text()).get("base_model_name_or_path")
        mismatch = f"adapter '{adapter}' (trained on '{trained_on}') does not fit base model '{base_name}'"
        try:
            model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"{mismatch}: {str(e).splitlines()[0][:300]}") from None
        if missing := _keys_missing_from(model, saved):
            raise ConfigError(f"{mismatch}: {len(missing)} adapter tensors match no module, e.g. {missing[0]}")
        if merge:
            model = model.merge_and_unload()
    return model


class CaptionEmbedder(nn.Module):
    """Tokenise with an instruction, run the (bidirectional) LLM, pool the caption tokens."""

    def __init__(self, model: nn.Module, tokenizer, cfg: EmbedderConfig):
        super().__init__()
        cfg.validate()
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.tokenizer.padding_side = cfg.padding_side
        self.stats = {"truncated": 0, "empty": 0}  # counted over the embedder's lifetime
        self._instruction_ids: dict[str, list[int]] = {}
        self.__dict__["_compiled"] = None  # not a submodule: its parameters are self.model's

    @classmethod
    def load(cls, cfg: EmbedderConfig, device: torch.device | None = None) -> CaptionEmbedder:
        cfg.validate()
        model, tokenizer = load_backbone(cfg, device)
        return cls(model, tokenizer, cfg)

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> CaptionEmbedder:
        """Load a folder written by `save` (ours) or by llm2vec (adapter + llm2vec_config.json)."""
        return cls.load(read_embedder_config(folder, **overrides))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    # -- tokenisation ----------------------------------------------------------------------------------
    def _prefix_ids(self, instruction: str | None) -> list[int]:
        instruction = self.cfg.instruction if instruction is None else instruction
        if instruction not in self._instruction_ids:
            text = self.cfg.instruction_format.format(instruction=instruction) if instruction else ""
            bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
            self._instruction_ids[instruction] = bos + self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._instruction_ids[instruction]

    def tokenize_texts(self, texts: Sequence[str], instruction: str | Sequence[str] | None = None
                       ) -> list[tuple[list[int], int]]:
        """Per text: (ids, n_text_tokens). The instruction (one for all, or one per text) is kept whole;
        the text is truncated to fit."""
        per_text = [instruction] * len(texts) if instruction is None or isinstance(instruction, str) else instruction
        if len(per_text) != len(texts):
            raise ValueError(f"{len(per_text)} instructions for {len(texts)} texts")
        out = []
        for ids, inst in zip(self.tokenizer([t.strip() for t in texts], add_special_tokens=False)["input_ids"],
                             per_text, strict=True):
            prefix = self._prefix_ids(inst)
            budget = self.cfg.max_length - len(prefix)
            if budget < 1:
                raise ConfigError(f"the instruction alone takes {len(prefix)} tokens >= embedder.max_length")
            if len(ids) > budget:
                self.stats["truncated"] += 1
                ids = ids[:budget]
            if not ids:
                self.stats["empty"] += 1  # pooled over the instruction instead (see collate)
            out.append((prefix + ids, len(ids)))
        return out

    def collate(self, items: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        """Pad to the longest item on the configured side. pool_mask marks text tokens."""
        width = max(len(ids) for ids, _ in items)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        pool_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, n_text) in enumerate(items):
            start = width - len(ids) if self.cfg.padding_side == "left" else 0
            input_ids[row, start:start + len(ids)] = torch.tensor(ids)
            attention[row, start:start + len(ids)] = 1
            if self.cfg.skip_instruction and n_text > 0:
                pool_mask[row, start + len(ids) - n_text:start + len(ids)] = 1
            else:
                pool_mask[row] = attention[row]
        return {"input_ids": input_ids, "attention_mask": attention, "pool_mask": pool_mask}

    def batch(self, texts: Sequence[str], instruction: str | Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        return self.collate(self.tokenize_texts(texts, instruction))

    # -- forward -------------------------------------------------------------------------------------
    def _autocast(self):
        return bf16_autocast(self.device, enabled=self.cfg.autocast and self.device.type in ("cpu", "cuda"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor,
                model: nn.Module | None = None) -> torch.Tensor:
        """[B, T] ids -> [B, D] float32 embeddings (not normalised). `model`: a compiled self.model."""
        dev = self.device
        with self._autocast():
            model = self.model if model is None else model
            hidden = model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev)).last_hidden_state
        return pool(hidden.float(), attention_mask.to(dev), pool_mask.to(dev), self.cfg.pooling)

    def _encoding_model(self) -> nn.Module:
        """self.model, or with `compile` its torch.compile wrapper (built once; dynamic shapes, so the
        length buckets share one graph). Only encode() uses it: training keeps the eager model."""
        if not self.cfg.compile:
            return self.model
        if self._compiled is None or self._compiled._orig_mod is not self.model:  # built once per model
            log.info("embedder.compile: the first batch compiles the LLM (a one-off cost of seconds to minutes)")
            self.__dict__["_compiled"] = torch.compile(self.model, dynamic=True)
        return self._compiled

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], instruction: str | None = None, batch_size: int | None = None,
               progress: bool = False) -> torch.Tensor:
        """Embed `texts` -> [N, D] float32 on CPU, in input order. Batches are length-sorted."""
        if len(texts) == 0:
            return torch.empty(0, self.dim)
        items = self.tokenize_texts(list(texts), instruction)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))  # longest first: OOM shows early
        bs = batch_size or self.cfg.batch_size
        out = torch.empty(len(items), self.dim)
        was_training = self.model.training
        self.model.eval()
        model = self._encoding_model()
        for start in tqdm(range(0, len(order), bs), desc="encode", unit="batch", disable=not progress):
            idx = order[start:start + bs]
            out[idx] = self(**self.collate([items[i] for i in idx]), model=model).cpu()
        self.model.train(was_training)
        return out

    # -- persistence -----------------------------------------------------------------------------------
    def save_config(self, folder: str | Path, **changes) -> None:
        data = {**self.cfg.saved_fields(), **changes}
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / CONFIG_NAME).write_text(json.dumps(data, indent=1) + "\n")


def read_embedder_config(folder: str | Path, **overrides) -> EmbedderConfig:
    """EmbedderConfig from our embedder_config.json, or from an llm2vec checkpoint folder."""
    folder = Path(folder)
    known = {f.name for f in fields(EmbedderConfig)}
    if (folder / CONFIG_NAME).is_file():
        data = json.loads((folder / CONFIG_NAME).read_text())
    elif (folder / LLM2VEC_CONFIG_NAME).is_file():
        data = from_llm2vec_config(folder)
    else:
        raise ConfigError(f"{folder}: neither {CONFIG_NAME} nor {LLM2VEC_CONFIG_NAME} found; is this an "
                          "embedder folder written by `llm2clip stage1`?")
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"{folder / CONFIG_NAME}: unknown keys {sorted(unknown)}")
    # paths inside the folder are stored relative to it ('.' = the folder itself), so folders can move
    data["adapters"] = [str((folder / a).resolve()) if not Path(a).is_absolute() else a for a in data["adapters"]]
    if data["model"] == ".":
        data["model"] = str(folder.resolve())
    cfg = EmbedderConfig(**{**data, **overrides})
    cfg.validate()
    return cfg


def from_llm2vec_config(folder: Path) -> dict:
    """Map llm2vec's llm2vec_config.json (+ adapter_config.json) onto our fields."""
    l2v = json.loads((folder / LLM2VEC_CONFIG_NAME).read_text())
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        base = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        adapters = [str(folder)]
    else:  # merged weights saved with the config
        base, adapters = str(folder), []
    pooling = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "eos", "last_token": "last_token"}
    mode = l2v.get("pooling_mode", "mean")
    if mode not in pooling:
        raise ConfigError(f"{folder}: llm2vec pooling_mode '{mode}' is not supported; use one of {sorted(pooling)}")
    return {"model": base, "adapters": adapters, "pooling": pooling[mode],
            "max_length": int(l2v.get("max_length", 512)),
            "skip_instruction": bool(l2v.get("skip_instruction", True)),
            # llm2vec writes the instruction then its separator; the text follows directly
            "instruction_format": "{instruction}"}
