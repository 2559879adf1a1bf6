"""Random Llama checkpoints of a given size, shared by the benchmarks (real HF configs, saved locally)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_random_llama(folder: Path, tokenizer_dir: Path, hidden: int, layers: int, causal_lm: bool = False):
    """Save a seeded random Llama (head width 64, SwiGLU width ~8/3·hidden) with the given tokenizer;
    returns the model."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from llm2clip.tiny import tiny_llm_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_llm_config("llama", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=layers,
                             num_heads=max(1, hidden // 64), num_kv_heads=max(1, hidden // 64),
                             intermediate_size=int(hidden * 8 / 3) // 64 * 64)
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
