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


def micro_run_overrides(data: Path, out: Path) -> list[str]:
    """`--set` values that shrink configs/tiny.yaml's main job to seconds on the `world` fixture's data."""
    d = data
    return [f"run.out_dir={out}", f"data.path={d}/train.jsonl", "data.image_size=32",
            f"stage1.pretrain.corpus={d}/corpus.txt", f"stage1.pretrain.tokenizer={d}/tokenizer",
            "stage1.pretrain.hidden_size=32", "stage1.pretrain.num_layers=1", "stage1.pretrain.intermediate_size=64",
            "stage1.pretrain.steps=5", "stage1.pretrain.seq_len=32", "stage1.pretrain.batch_size=4",
            f"stage1.cc.data={d}/stage1_train.jsonl", f"stage1.cc.text_pairs={d}/parallel.jsonl",
            "stage1.cc.steps=3", "stage1.cc.batch_size=4",
            f"stage1.cra_data={d}/test.jsonl", "embedder.max_length=96",
            f"cache.data=[{d}/train.jsonl,{d}/test.jsonl]", f"stage2.eval_data={d}/test.jsonl",
            f"stage2.text.tokenizer={d}/tokenizer", "vision.hidden_size=32", "vision.num_layers=1",
            "vision.patch_size=16", "stage2.model.embed_dim=16", "stage2.model.adapter_depth=1",
            *(f"stage2.{r}.{k}" for r in ("clip_pretrain", "clip_finetune", "llm2clip")
              for k in ("steps=3", "batch_size=8", "checkpoint_every=2"))]
