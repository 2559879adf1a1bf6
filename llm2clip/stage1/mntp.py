"""Masked next-token prediction (MNTP), llm2vec's bridge from a causal LM to a bidirectional one.

Tokens are masked as in BERT (80% mask token, 10% random, 10% kept; HF's collator), attention is
bidirectional, and the token masked at position i is predicted from position i-1: the LM head is
reused unchanged. LoRA sits on the inner base model, so the saved adapter loads onto `AutoModel`
(the embedder) as well as onto the causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..embedder import EmbedderConfig, resolve_device
from ..errors import ConfigError
from ..files import atomic_dir
from ..precision import bf16_autocast
from .common import TrainState, make_optimizer, seed_everything
from .lora import LoraSettings, add_lora


@dataclass
class MNTPConfig:
    enabled: bool = False  # run MNTP before CC (the paper finds it optional)
    text: str = "${run.out_dir}/data/corpus.txt"  # one text per line
    mask_probability: float = 0.2
    mask_token: str = "_"  # used when the tokenizer has none (Llama, Mistral); llm2vec's "blank" choice
    max_length: int = 128
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    gradient_checkpointing: bool = False
    out: str = "${run.out_dir}/stage1/mntp"


def mntp_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], labels [B, T] (-100 = not masked): position i-1 predicts the token masked at i."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def set_mask_token(tokenizer, mask_token: str) -> None:
    if tokenizer.mask_token is not None:
        return
    ids = tokenizer(mask_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"stage1.mntp.mask_token '{mask_token}' is {len(ids)} tokens for this tokenizer; "
                          "choose a string that is a single token (e.g. '_')")
    tokenizer.mask_token = mask_token


def train_mntp(cfg: MNTPConfig, emb_cfg: EmbedderConfig, seed: int = 0, progress: bool = True) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    if not Path(cfg.text).is_file():
        raise ConfigError(f"stage1.mntp.text: '{cfg.text}' does not exist")
    if emb_cfg.adapters:
        raise ConfigError("MNTP starts from the base model; clear embedder.adapters")
    seed_everything(seed)
    device = resolve_device(emb_cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(emb_cfg.model, trust_remote_code=emb_cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    set_mask_token(tokenizer, cfg.mask_token)
    hf_config = AutoConfig.from_pretrained(emb_cfg.model, trust_remote_code=emb_cfg.trust_remote_code)
    hf_config.is_causal = not emb_cfg.bidirectional
    lm = AutoModelForCausalLM.from_pretrained(emb_cfg.model, config=hf_config,
                                              attn_implementation=emb_cfg.attn_implementation,
                                              trust_remote_code=emb_cfg.trust_remote_code).to(device)
    base_attr = lm.base_model_prefix  # 'model' for Llama-style LMs
    setattr(lm, base_attr, add_lora(getattr(lm, base_attr), cfg.lora,
                                    gradient_checkpointing=cfg.gradient_checkpointing))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.mask_probability)
    lines = [x for x in Path(cfg.text).read_text(encoding="utf-8").splitlines() if x.strip()]
    encoded = tokenizer(lines, truncation=True, max_length=cfg.max_length)["input_ids"]
    optimizer, scheduler = make_optimizer(lm.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps)
    generator = torch.Generator().manual_seed(seed)
    state = TrainState()
    lm.train()
    for _ in tqdm(range(cfg.steps), desc="stage1 mntp", disable=not progress):
        idx = torch.randint(len(encoded), (cfg.batch_size,), generator=generator).tolist()
        batch = collator([{"input_ids": encoded[i]} for i in idx])
        with bf16_autocast(device, enabled=emb_cfg.autocast):
            logits = lm(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device)).logits
        loss = mntp_loss(logits, batch["labels"].to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in lm.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.log(loss.item())
    with atomic_dir(cfg.out) as tmp:
        getattr(lm, base_attr).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return {"loss_first": state.mean_first(10), "loss_last": state.mean_last(10), "steps": cfg.steps}
