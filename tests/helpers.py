"""Tiny checkpoints on disk, built from real HF configs and saved with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch

from llm2clip.tiny import tiny_llm_config


def save_tiny_llm(folder: Path, tokenizer_dir: Path, family: str = "llama", hidden_size: int = 64,
                  num_layers: int = 2, seed: int = 0, causal_lm: bool = False) -> Path:
    """A randomly initialised tiny LLM of `family` plus the shapes-world tokenizer, as a checkpoint folder."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = tiny_llm_config(family, vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if causal_lm else AutoModel).from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
