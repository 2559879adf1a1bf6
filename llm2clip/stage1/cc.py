"""Caption-contrastive (CC) fine-tuning: LoRA or QLoRA on a bidirectional LLM with a supervised
contrastive loss, so two captions of one image embed close together.

One process, torchrun (DDP, gloo on CPU), or DeepSpeed (`cc.deepspeed` = a ZeRO config such as
configs/deepspeed/zero2.json; "auto" values are filled in as the HF Trainer does).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.readers import DataConfig
from ..distributed import global_mean, init_from_env
from ..embedder import CaptionEmbedder, EmbedderConfig, load_backbone, resolve_device
from ..errors import ConfigError
from ..files import atomic_dir
from ..guards import apply_step, check_policy
from ..losses import alignment_loss, caption_contrastive_loss
from .common import TrainState, make_optimizer, seed_everything
from .lora import LoraSettings, add_lora
from .pairs import INSTRUCTIONS, PairSampler, read_caption_groups, read_text_pairs


@dataclass
class CCConfig:
    data: str = "${data.path}"  # captions: any format the data readers take
    text_pairs: str | None = "${run.out_dir}/data/parallel.jsonl"  # {source, target} JSONL, or null
    translation_fraction: float = 0.3  # share of batches drawn from text_pairs
    # > 0: translation batches embed both sides as documents (the instruction the cache uses) and add
    # this weight x the mean squared distance of each unit pair, so the vectors stage 2 reads for a
    # text and its translation coincide, not only rank first (docs/STAGE1.md)
    translation_alignment: float = 0.0
    long_long_fraction: float = 0.0  # share of caption batches pairing two long paraphrases (rest: short<->long)
    mixed_directions: bool = True  # draw short->long / long->short per row, as LLM2CLIP's E5_cc3m.py
    mixed_from_step: int = 0  # per-row directions from this step on; one direction per batch before it
    short_long_from_step: int | None = None  # caption batches pair short with long only from this step (null: never)
    hard_negatives: bool = True
    # > 0: each caption batch is a neighbourhood of this many similar scenes (TF-IDF), so in-batch and
    # hard negatives are near misses, not random scenes (docs/STAGE1.md, part 6). 0: random scenes
    neighbour_batches: int = 0
    scale: float = 50.0  # logit scale of the cosine similarities
    steps: int = 200
    batch_size: int = 32  # pairs per process and step
    lr: float = 2e-4
    warmup_steps: int = 20
    lr_schedule: str = "cosine"  # cosine | linear (the official's, the HF Trainer default) | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)
    qlora: bool = False  # 4-bit nf4 base with double quantisation (bitsandbytes)
    gradient_checkpointing: bool = True
    # attention while training; null: embedder.attn_implementation. The saved embedder keeps the
    # embedder's (on CPU, eager trains a tiny LM faster, sdpa encodes 1.9x faster)
    attn_implementation: str | None = None
    # the training forward: bf16 autocast where it pays and embedder.autocast allows it (llm2clip.precision)
    # | fp32. The saved embedder keeps embedder.autocast for encoding
    precision: str = "bf16"
    deepspeed: str | None = None  # DeepSpeed JSON config; run under torchrun or the deepspeed launcher
    checkpoint_every: int = 100  # steps between atomic checkpoints of the LoRA weights and state (0 = none)
    keep_checkpoints: int = 2
    nonfinite: str = "stop"  # a NaN/inf loss: stop with an error (nothing applied) | skip the batch and count it
    out: str = "${run.out_dir}/stage1/cc"
    checkpoint_dir: str = "${run.out_dir}/stage1/cc-checkpoints"  # removed once `out` is written

    def validate(self) -> None:
        if not 0.0 <= self.translation_fraction < 1.0:
            raise ConfigError("stage1.cc.translation_fraction must be in [0, 1)")
        if self.translation_alignment < 0:
            raise ConfigError("stage1.cc.translation_alignment must be >= 0 (0: off)")
        if self.mixed_from_step < 0:
            raise ConfigError("stage1.cc.mixed_from_step must be >= 0 (0: per-row directions from the start)")
        if self.short_long_from_step is not None and self.short_long_from_step < 0:
            raise ConfigError("stage1.cc.short_long_from_step must be null or >= 0 (0: short<->long from the start)")
        if not 0.0 <= self.long_long_fraction <= 1.0:
            raise ConfigError("stage1.cc.long_long_fraction must be in [0, 1]")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError("stage1.cc.lr_schedule must be 'cosine', 'linear' or 'constant'")
        if self.neighbour_batches < 0:
            raise ConfigError("stage1.cc.neighbour_batches must be >= 0 (0: random scenes per batch)")
        if 0 < self.neighbour_batches < self.batch_size:
            raise ConfigError(f"stage1.cc.neighbour_batches ({self.neighbour_batches}) must be 0 or at least "
                              f"stage1.cc.batch_size ({self.batch_size}) scenes to fill a batch")
        if self.batch_size < 2 or self.steps < 1:
            raise ConfigError("stage1.cc.batch_size must be >= 2 (in-batch negatives) and steps >= 1")
        if self.attn_implementation not in (None, "sdpa", "eager", "flash_attention_2"):
            raise ConfigError("stage1.cc.attn_implementation must be null, sdpa, eager or flash_attention_2")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("stage1.cc.checkpoint_every must be >= 0 and keep_checkpoints >= 1")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"stage1.cc.precision: '{self.precision}' must be bf16 or fp32")
        check_policy("stage1.cc.nonfinite", self.nonfinite, self.deepspeed)

    def resume_key(self, seed: int) -> dict:
        """What a checkpoint must have been written with to be resumed (not: steps, out, checkpointing)."""
        skip = {"steps", "out", "checkpoint_dir", "checkpoint_every", "keep_checkpoints"}
        return {"seed": seed, **{k: v for k, v in asdict(self).items() if k not in skip}}


def deepspeed_config(path: str, micro_batch: int, world_size: int, max_grad_norm: float, bf16: bool,
                     fp16: bool = False) -> dict:
    """Load a DeepSpeed JSON (LLaVA-style files use "auto") and fill the values we own."""
    config = json.loads(Path(path).read_text())
    auto = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": micro_batch * world_size, "gradient_clipping": max_grad_norm}
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for precision, enabled in (("bf16", bf16), ("fp16", fp16)):
        if isinstance(config.get(precision), dict) and config[precision].get("enabled") == "auto":
            config[precision]["enabled"] = enabled
        elif enabled and precision == "fp16" and precision not in config:  # DeepSpeed's own loss scaler
            config[precision] = {"enabled": True}
    config.pop("optimizer", None), config.pop("scheduler", None)  # ours: AdamW + transformers cosine
    return config


def train_cc(cfg: CCConfig, emb_cfg: EmbedderConfig, seed: int = 0, progress: bool = True,
             data_cfg: DataConfig | None = None,
             on_step: Callable[[int, CaptionEmbedder], None] | None = None) -> dict:
    """Train a CC LoRA on top of `emb_cfg` (base + earlier adapters, merged) and save it to cfg.out.
    `data_cfg` supplies caption column names (its path is replaced by cfg.data). `on_step(steps_done,
    embedder)` runs on rank 0 after every training step (e.g. to save the adapter for a CRA curve)."""
    cfg.validate()
    rank, world_size = init_from_env()
    seed_everything(seed + rank)
    groups = read_caption_groups(cfg.data, data_cfg)
    text_pairs = read_text_pairs(cfg.text_pairs) if cfg.text_pairs and cfg.translation_fraction > 0 else []
    # Every rank draws the same global batch (batch_size x processes) and trains on its slice, so N
    # processes at batch b see exactly what one process at batch N x b sees.
    sampler = PairSampler(groups, text_pairs, long_long_fraction=cfg.long_long_fraction,
                          translation_fraction=cfg.translation_fraction, seed=seed * 1000, task_seed=seed,
                          mixed_directions=cfg.mixed_directions, mixed_from_batch=cfg.mixed_from_step,
                          short_long_from_batch=cfg.short_long_from_step, neighbour_batches=cfg.neighbour_batches,
                          # aligned text pairs are embedded as documents on both sides: the vectors stage 2 reads
                          translation_instruction=None if cfg.translation_alignment else INSTRUCTIONS["translation"])

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
    train_autocast = emb_cfg.autocast and cfg.precision == "bf16"
    embedder = CaptionEmbedder(backbone, tokenizer, replace(emb_cfg, autocast=train_autocast))
    embedder.train()
    optimizer, scheduler = make_optimizer(embedder.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup_steps,
                                          cfg.steps, cfg.lr_schedule)
    # before DeepSpeed takes the weights: ZeRO keeps its own fp32 master copy of them
    state = TrainState()
    start, skipped = _resume(cfg, seed, embedder, None if cfg.deepspeed else optimizer, scheduler, sampler, state,
                             rank, world_size), 0
    engine = model = embedder
    if cfg.deepspeed:
        import deepspeed

        from ..distributed import init_for_deepspeed

        init_for_deepspeed()  # one process without a launcher: a one-rank group, not MPI
        ds_config = deepspeed_config(cfg.deepspeed, cfg.batch_size, world_size, cfg.max_grad_norm,
                                     bf16=device.type == "cuda" and cfg.precision == "bf16")
        engine, optimizer, _, scheduler = deepspeed.initialize(model=embedder, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds_config)
        model = engine
    elif world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(embedder)

    for step in tqdm(range(start, cfg.steps), desc="stage1 cc", disable=not progress or rank != 0, initial=start,
                     total=cfg.steps):
        pairs = sampler.batch(cfg.batch_size * world_size)[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]
        align = cfg.translation_alignment > 0 and pairs[0].kind == "translation"
        queries, positives, *negatives = _embed_pairs(model, embedder, pairs, cfg.hard_negatives)  # [B, D] each
        loss = caption_contrastive_loss(queries, positives, negatives[0] if negatives else None, scale=cfg.scale)
        if align:
            loss = loss + cfg.translation_alignment * alignment_loss(queries, positives)
        if cfg.deepspeed:
            engine.backward(loss)
            apply_step(loss, step, "stage1.cc.nonfinite", "stop")
            engine.step()  # clips, steps the optimizer and the schedule
        else:
            loss.backward()
            if apply_step(loss, step, "stage1.cc.nonfinite", cfg.nonfinite):
                torch.nn.utils.clip_grad_norm_([p for p in embedder.parameters() if p.requires_grad],
                                               cfg.max_grad_norm)
                optimizer.step()
            else:
                skipped += 1
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        logged = global_mean(loss)  # the whole batch's loss, as one process would log it
        if torch.isfinite(logged):
            state.log(logged.item())
        if on_step is not None and rank == 0:
            on_step(step + 1, embedder)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _checkpoint(cfg, seed, step + 1, embedder, None if cfg.deepspeed else optimizer, scheduler, sampler,
                        state, rank, world_size)

    if rank == 0:
        save_cc_adapter(embedder, emb_cfg, cfg.out)
        shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)  # the finished adapter supersedes them
    if world_size > 1:
        torch.distributed.barrier()
    return {"loss_first": state.mean_first(10), "loss_last": state.mean_last(10), "loss_curve": state.curve(),
            "steps": cfg.steps, "resumed_from": start, "skipped_nonfinite": skipped,
            "world_size": world_size, "truncated_texts": embedder.stats["truncated"],
            "trainable_parameters": sum(p.numel() for p in embedder.parameters() if p.requires_grad)}


def _embed_pairs(model, embedder: CaptionEmbedder, pairs, hard_negatives: bool) -> list[torch.Tensor]:
    """[queries, positives(, negatives)], each [B, D]. The texts differ in kind (short and long, English
    and Chinese, and with mixed directions both within one list), so one padded batch would be mostly
    padding: they are sorted by token length and run as two forwards, shorter and longer half."""
    texts = [x.query for x in pairs] + [x.positive for x in pairs]
    texts += [x.negative for x in pairs] if hard_negatives else []
    insts = [x.instruction for x in pairs] + [None] * (len(texts) - len(pairs))  # documents: the default
    items = embedder.tokenize_texts(texts, insts)
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    half = len(order) // 2
    out = [None] * len(items)
    for idx in (order[:half], order[half:]):
        for i, row in zip(idx, model(**embedder.collate([items[i] for i in idx])), strict=True):
            out[i] = row
    return list(torch.stack(out).split(len(pairs)))


def save_cc_adapter(embedder: CaptionEmbedder, emb_cfg: EmbedderConfig, out: str) -> None:
    """The peft adapter, the tokenizer and embedder_config.json (adapters: earlier ones, then '.')."""
    with atomic_dir(out) as tmp:
        embedder.model.save_pretrained(tmp)
        embedder.tokenizer.save_pretrained(tmp)
        adapters = [str(Path(a).resolve()) for a in emb_cfg.adapters] + ["."]
        model = emb_cfg.model if not Path(emb_cfg.model).exists() else str(Path(emb_cfg.model).resolve())
        # the encoding precision is the embedder's, whatever stage1.cc.precision trained with
        embedder.save_config(tmp, model=model, adapters=adapters, load_in_4bit=False, autocast=emb_cfg.autocast)


# -- kill and resume: LoRA weights, optimizer, schedule and every rank's RNG streams ---------------------
def _rank_state(sampler: PairSampler) -> dict:
    return {"sampler": sampler.state(), "torch_rng": torch.get_rng_state().tolist()}


def _checkpoint(cfg: CCConfig, seed: int, step: int, embedder, optimizer, scheduler, sampler: PairSampler,
                state: TrainState, rank: int, world_size: int) -> None:
    from ..checkpoint import save_checkpoint

    ranks = [_rank_state(sampler)]
    if world_size > 1:  # every rank's sampler and RNG: a resumed run draws what each rank would have drawn
        ranks = [None] * world_size
        torch.distributed.all_gather_object(ranks, _rank_state(sampler))
    if rank == 0:
        extra = {"resume_key": cfg.resume_key(seed), "world_size": world_size, "ranks": ranks,
                 "losses": state.losses}
        save_checkpoint(cfg.checkpoint_dir, step, embedder, optimizer, scheduler, cfg.keep_checkpoints,
                        trainable_only=True, extra=extra)
    if world_size > 1:
        torch.distributed.barrier()


def _resume(cfg: CCConfig, seed: int, embedder, optimizer, scheduler, sampler: PairSampler, state: TrainState,
            rank: int, world_size: int) -> int:
    """Continue from the newest valid checkpoint in cfg.checkpoint_dir (0 when there is none)."""
    from ..checkpoint import checkpoint_extra, latest_checkpoint, load_checkpoint

    ckpt, _ = latest_checkpoint(cfg.checkpoint_dir)
    if ckpt is None:
        return 0
    extra = checkpoint_extra(ckpt)
    if extra.get("resume_key") != json.loads(json.dumps(cfg.resume_key(seed))):
        changed = sorted(k for k, v in cfg.resume_key(seed).items()
                         if json.loads(json.dumps(v)) != extra.get("resume_key", {}).get(k))
        raise ConfigError(f"{ckpt} was written by a run with other stage1.cc settings ({', '.join(changed)}). "
                          f"Fix: restore them to resume, or delete {cfg.checkpoint_dir} to start over")
    if extra["world_size"] != world_size:
        raise ConfigError(f"{ckpt} was written by {extra['world_size']} processes, this run has {world_size}. "
                          "Fix: resume with the same number of processes")
    step = load_checkpoint(ckpt, embedder, optimizer, scheduler)
    mine = extra["ranks"][rank]
    sampler.set_state(mine["sampler"])
    torch.set_rng_state(torch.tensor(mine["torch_rng"], dtype=torch.uint8))
    state.losses = list(extra["losses"])
    return step
