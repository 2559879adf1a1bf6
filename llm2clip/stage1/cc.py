"""Caption-contrastive (CC) fine-tuning: LoRA or QLoRA on a bidirectional LLM with a supervised
contrastive loss, so two captions of one image embed close together.

One process, torchrun (DDP, gloo on CPU), or DeepSpeed (`cc.deepspeed` = a ZeRO config such as
configs/deepspeed/zero2.json; "auto" values are filled in as the HF Trainer does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.readers import DataConfig
from ..distributed import init_from_env
from ..embedder import CaptionEmbedder, EmbedderConfig, load_backbone, resolve_device
from ..errors import ConfigError
from ..losses import caption_contrastive_loss
from .common import TrainState, atomic_dir, make_optimizer, seed_everything
from .lora import LoraSettings, add_lora
from .pairs import PairSampler, read_caption_groups, read_text_pairs


@dataclass
class CCConfig:
    data: str = "${data.path}"  # captions: any format the data readers take
    text_pairs: str | None = "${run.out_dir}/data/parallel.jsonl"  # {source, target} JSONL, or null
    translation_fraction: float = 0.3  # share of batches drawn from text_pairs
    long_long_pairs: bool = False  # also pair two long paraphrases of one image
    hard_negatives: bool = True
    scale: float = 50.0  # logit scale of the cosine similarities
    steps: int = 200
    batch_size: int = 32  # pairs per process and step
    lr: float = 2e-4
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # cosine | constant (after warmup)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: bool = False  # 4-bit nf4 base with double quantisation (bitsandbytes)
    gradient_checkpointing: bool = True
    # attention while training; null: embedder.attn_implementation. The saved embedder keeps the
    # embedder's (on CPU, eager trains a tiny LM faster, sdpa encodes 1.9x faster)
    attn_implementation: str | None = None
    deepspeed: str | None = None  # DeepSpeed JSON config; run under torchrun or the deepspeed launcher
    out: str = "${run.out_dir}/stage1/cc"

    def validate(self) -> None:
        if not 0.0 <= self.translation_fraction < 1.0:
            raise ConfigError("stage1.cc.translation_fraction must be in [0, 1)")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError("stage1.cc.lr_schedule must be 'cosine' or 'constant'")
        if self.batch_size < 2 or self.steps < 1:
            raise ConfigError("stage1.cc.batch_size must be >= 2 (in-batch negatives) and steps >= 1")
        if self.attn_implementation not in (None, "sdpa", "eager", "flash_attention_2"):
            raise ConfigError("stage1.cc.attn_implementation must be null, sdpa, eager or flash_attention_2")


def deepspeed_config(path: str, micro_batch: int, world_size: int, max_grad_norm: float, bf16: bool) -> dict:
    """Load a DeepSpeed JSON (LLaVA-style files use "auto") and fill the values we own."""
    config = json.loads(Path(path).read_text())
    auto = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size, "gradient_clipping": max_grad_norm}
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for precision, enabled in (("bf16", bf16), ("fp16", False)):
        if isinstance(config.get(precision), dict) and config[precision].get("enabled") == "auto":
            config[precision]["enabled"] = enabled
    config.pop("optimizer", None), config.pop("scheduler", None)  # ours: AdamW + transformers cosine
    return config


def train_cc(cfg: CCConfig, emb_cfg: EmbedderConfig, seed: int = 0, progress: bool = True,
             data_cfg: DataConfig | None = None) -> dict:
    """Train a CC LoRA on top of `emb_cfg` (base + earlier adapters, merged) and save it to cfg.out.
    `data_cfg` supplies caption column names (its path is replaced by cfg.data)."""
    cfg.validate()
    rank, world_size = init_from_env()
    seed_everything(seed + rank)
    groups = read_caption_groups(cfg.data, data_cfg)
    text_pairs = read_text_pairs(cfg.text_pairs) if cfg.text_pairs and cfg.translation_fraction > 0 else []
    sampler = PairSampler(groups, text_pairs, long_long=cfg.long_long_pairs,
                          translation_fraction=cfg.translation_fraction, seed=seed * 1000 + rank, task_seed=seed)

    device = resolve_device(emb_cfg.device)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    train_emb_cfg = replace(emb_cfg, load_in_4bit=cfg.qlora,
                            attn_implementation=cfg.attn_implementation or emb_cfg.attn_implementation)
    if cfg.qlora and emb_cfg.adapters:
        raise ConfigError("QLoRA cannot merge earlier adapters into 4-bit weights; merge them first "
                          "(llm2clip stage1 merge) and point embedder.model at the merged folder")
    backbone, tokenizer = load_backbone(train_emb_cfg, device)
    backbone = add_lora(backbone, cfg.lora, quantized=cfg.qlora, gradient_checkpointing=cfg.gradient_checkpointing)
    embedder = CaptionEmbedder(backbone, tokenizer, emb_cfg)
    embedder.train()
    optimizer, scheduler = make_optimizer(embedder.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup_steps,
                                          cfg.steps, cfg.lr_schedule)
    engine = model = embedder
    if cfg.deepspeed:
        import deepspeed

        ds_config = deepspeed_config(cfg.deepspeed, cfg.batch_size, world_size, cfg.max_grad_norm,
                                     bf16=device.type == "cuda")
        engine, optimizer, _, scheduler = deepspeed.initialize(model=embedder, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds_config)
        model = engine
    elif world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(embedder)

    state = TrainState()
    for _ in tqdm(range(cfg.steps), desc="stage1 cc", disable=not progress or rank != 0):
        pairs = sampler.batch(cfg.batch_size)
        # Queries and documents go through separately: they differ in kind (short vs long, English vs
        # Chinese), so one padded batch would be mostly padding.
        queries = model(**embedder.batch([x.query for x in pairs], instruction=pairs[0].instruction))  # [B, D]
        docs = [x.positive for x in pairs] + ([x.negative for x in pairs] if cfg.hard_negatives else [])
        positives, *negatives = model(**embedder.batch(docs)).split(cfg.batch_size)  # [B, D] (+ [B, D])
        loss = caption_contrastive_loss(queries, positives, negatives[0] if negatives else None, scale=cfg.scale)
        if cfg.deepspeed:
            engine.backward(loss)
            engine.step()  # clips, steps the optimizer and the schedule
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in embedder.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        state.log(loss.item())

    if rank == 0:
        save_cc_adapter(embedder, emb_cfg, cfg.out)
    if world_size > 1:
        torch.distributed.barrier()
    return {"loss_first": state.mean_first(10), "loss_last": state.mean_last(10), "loss_curve": state.curve(),
            "steps": cfg.steps,
            "world_size": world_size, "truncated_texts": embedder.stats["truncated"],
            "trainable_parameters": sum(p.numel() for p in embedder.parameters() if p.requires_grad)}


def save_cc_adapter(embedder: CaptionEmbedder, emb_cfg: EmbedderConfig, out: str) -> None:
    """The peft adapter, the tokenizer and embedder_config.json (adapters: earlier ones, then '.')."""
    with atomic_dir(out) as tmp:
        embedder.model.save_pretrained(tmp)
        embedder.tokenizer.save_pretrained(tmp)
        adapters = [str(Path(a).resolve()) for a in emb_cfg.adapters] + ["."]
        model = emb_cfg.model if not Path(emb_cfg.model).exists() else str(Path(emb_cfg.model).resolve())
        embedder.save_config(tmp, model=model, adapters=adapters, load_in_4bit=False)
