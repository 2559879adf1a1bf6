"""Pretrain a tiny causal LM on the shapes-world corpus, so it knows the world's language before
stage 1 (the embedded default's stand-in for Llama's pretraining). Real runs skip this step.

GPT-style packing: the corpus is tokenised once, joined with EOS, and cut into `seq_len` blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..embedder import resolve_device
from ..errors import ConfigError
from ..files import atomic_dir
from ..precision import bf16_autocast
from ..tiny import LLM_FAMILIES, tiny_llm_config
from .common import TrainState, make_optimizer, seed_everything


@dataclass
class PretrainLMConfig:
    enabled: bool = False  # tiny world only: real LLMs arrive pretrained
    family: str = "llama"  # llama | mistral | qwen2 | qwen3 | gemma | gemma2 | gemma3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    attn_implementation: str = "sdpa"  # sdpa | eager (eager is faster on CPU at short lengths)
    precision: str = "bf16"  # bf16: autocast where it pays (llm2clip.precision) | fp32
    corpus: str = "${run.out_dir}/data/corpus.txt"
    tokenizer: str = "${run.out_dir}/data/tokenizer"
    out: str = "${run.out_dir}/stage1/lm"

    def validate(self) -> None:
        if self.family not in LLM_FAMILIES:
            raise ConfigError(f"stage1.pretrain.family: '{self.family}' is not one of {sorted(LLM_FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("stage1.pretrain.hidden_size must be divisible by stage1.pretrain.num_heads")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError("stage1.pretrain.attn_implementation must be sdpa or eager")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"stage1.pretrain.precision: '{self.precision}' must be bf16 or fp32")


def pack_corpus(lines: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """[n_blocks, seq_len] token blocks; each line starts with BOS and ends with EOS."""
    ids: list[int] = []
    for row in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *row, tokenizer.eos_token_id]
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise ConfigError(f"the corpus has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)


def pretrain_lm(cfg: PretrainLMConfig, seed: int = 0, progress: bool = True) -> dict:
    """Train from scratch; writes an HF causal-LM folder (weights + tokenizer) to cfg.out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    for path in (cfg.corpus, cfg.tokenizer):
        if not Path(path).exists():
            raise ConfigError(f"'{path}' does not exist; generate the shapes world first (llm2clip data synth)")
    seed_everything(seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    blocks = pack_corpus(Path(cfg.corpus).read_text(encoding="utf-8").splitlines(), tokenizer, cfg.seq_len)
    hf_config = tiny_llm_config(cfg.family, vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                                num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                intermediate_size=cfg.intermediate_size,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    device = resolve_device("auto")
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation).to(device)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=generator)
    state = TrainState()
    model.train()
    for step in tqdm(range(cfg.steps), desc="pretrain-lm", disable=not progress):
        start = (step * cfg.batch_size) % len(blocks)
        if start + cfg.batch_size > len(blocks):  # next epoch: reshuffle
            order = torch.randperm(len(blocks), generator=generator)
        idx = order[start:start + cfg.batch_size]
        batch = blocks[idx].to(device)
        with bf16_autocast(device, enabled=cfg.precision == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss  # HF shifts labels for causal LM
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.log(loss.item())
    with atomic_dir(cfg.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    first, last = state.mean_first(20), state.mean_last(20)
    return {"loss_first": first, "loss_last": last, "perplexity_last": math.exp(last),
            "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len, "blocks": len(blocks),
            "parameters": sum(p.numel() for p in model.parameters())}
