"""One contrastive training loop for every stage-2 run: CLIP pretraining and fine-tuning (baseline) and
LLM2CLIP (vision encoder + text adapter against frozen LLM vectors).

- AdamW (betas, eps and weight decay default to the official LLM2CLIP run's; `optim.py`), optional layer-wise
  learning-rate decay on the vision tower (EVA-CLIP's `--visual-ld`), transformers' cosine schedule
  with warmup, grad-norm clipping, logit scale clamped to ln(100) after each step. Precision: bf16
  autocast, fp16 autocast with a dynamic loss scale (`torch.amp.GradScaler`, as the official LLM2CLIP
  trains; V100/T4 have no bf16), or fp32.
- Gradient accumulation as open_clip's `--accum-freq`: features of every micro-batch are computed
  once without grad, then each micro-batch is recomputed with grad against all of them, so the
  negatives span the whole accumulated batch and the gradient equals the big-batch gradient.
- One process, torchrun (DDP; each rank takes a slice of the global batch and features are gathered
  with gradients) or DeepSpeed (`deepspeed` = a ZeRO JSON config).
- Batches come from a `llm2clip.stage2.batches` source: in memory, or streamed from shards.
- Atomic checkpoints every `checkpoint_every` steps; `resume` continues from the newest valid one and,
  on CPU, reproduces the uninterrupted run bit for bit: in memory a batch is a function of the step;
  streamed, the checkpoint carries every rank's and worker's sample position (and the loss scale).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import checkpoint_extra, latest_checkpoint, load_checkpoint, save_checkpoint
from ..distributed import global_mean, init_from_env
from ..errors import ConfigError
from ..guards import apply_step, check_policy
from ..losses import ClipLoss, SigLipLoss
from ..precision import bf16_autocast
from .batches import as_batches
from .data import CaptionSampler
from .optim import make_optimizer


@dataclass
class TrainConfig:
    enabled: bool = True
    steps: int = 300
    batch_size: int = 128  # global, over all processes and accumulation steps
    lr: float = 1e-3  # the vision side (EVA-CLIP / LLM2CLIP's --visual-lr)
    text_lr: float | None = None  # the text side (adapter or CLIP text tower); None = lr (--text-lr)
    head_lr: float | None = None  # fresh heads (Knowledge-CLIP's W_e and concept classifier); None = text_lr
    warmup_steps: int = 20
    weight_decay: float = 0.05
    # AdamW's; the official LLM2CLIP's (EVA-CLIP's defaults for model names without 'vit')
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    layer_decay: float = 1.0  # vision tower: lr x decay^(num_layers + 1 - layer id); 1 = off (official: 0.85)
    max_grad_norm: float = 5.0
    long_caption_ratio: float = 0.5  # share of samples that train with a long caption (paper: 1:1)
    accum_freq: int = 1  # micro-batches per step; negatives still span the whole batch
    precision: str = "bf16"  # bf16 (autocast) | fp16 (autocast + dynamic loss scaling) | fp32
    checkpoint_every: int = 100  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    deepspeed: str | None = None  # DeepSpeed JSON (ZeRO-1/2); run under torchrun or the deepspeed launcher
    nonfinite: str = "stop"  # a NaN/inf loss: stop with an error (nothing applied) | skip the batch and count it
    out: str = "${run.out_dir}/stage2/run"

    def validate(self, name: str) -> None:
        """`name`: the run's config section, e.g. 'llm2clip' (under stage2) or 'knowledge_clip.train'."""
        name = name if "." in name else f"stage2.{name}"
        if self.batch_size < 2 or self.steps < 1 or self.accum_freq < 1:
            raise ConfigError(f"{name}: batch_size must be >= 2, steps and accum_freq >= 1")
        if not 0.0 <= self.long_caption_ratio <= 1.0:
            raise ConfigError(f"{name}.long_caption_ratio must be in [0, 1]")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"{name}.precision must be bf16, fp16 or fp32")
        betas = list(self.adam_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"{name}.adam_betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {betas}")
        if not self.adam_eps > 0:
            raise ConfigError(f"{name}.adam_eps must be > 0, e.g. 1e-8; got {self.adam_eps}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"{name}.layer_decay must be in (0, 1]: 1 turns it off, the official LLM2CLIP uses "
                              f"0.85; got {self.layer_decay}")
        check_policy(f"{name}.nonfinite", self.nonfinite, self.deepspeed)
        if self.deepspeed and self.accum_freq > 1:
            raise ConfigError(f"{name}: accum_freq > 1 is not supported under DeepSpeed; raise batch_size "
                              "or use torchrun")

    def resume_key(self, seed: int, loss: str) -> dict:
        """What a checkpoint must have been written with to be resumed: every setting but where and how often
        it is saved (steps too: the warmup-cosine schedule is laid out over them)."""
        skip = {"enabled", "out", "checkpoint_every", "keep_checkpoints"}
        key = {"seed": seed, "loss": loss, **{k: v for k, v in asdict(self).items() if k not in skip}}
        return json.loads(json.dumps(key))  # as a checkpoint's JSON gives it back (tuples as lists)


def check_resume_key(ckpt: Path, saved: dict | None, expected: dict, section: str) -> None:
    """A checkpoint from a run with other settings is refused with the keys that differ, not resumed
    into this one. Checkpoints written before resume keys existed carry none and are resumed."""
    if saved is None or saved == expected:
        return
    changed = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
    raise ConfigError(f"{ckpt} was written by a run with other {section} settings ({', '.join(changed)}). "
                      f"Fix: restore them to resume, or delete {ckpt.parent} to start over")


def _to(x, device):
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def _split(x, n: int) -> list:
    if isinstance(x, dict):
        parts = {k: v.chunk(n) for k, v in x.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n)]
    return list(x.chunk(n))


def _objective(loss_fn, weights: dict[str, float], outputs, weight_scale: float = 1.0):
    """Model outputs -> (loss to backpropagate, its parts detached).

    outputs: (image [B, E], text [B, E], scale, bias) and, for models with auxiliary objectives
    (Knowledge-CLIP), a dict of per-sample-mean terms, weighted by `weights` (missing weight: 1).
    `weight_scale` divides the auxiliary terms across accumulated micro-batches."""
    image, text, scale, bias = outputs[:4]
    contrastive = loss_fn(image, text, scale, bias)
    terms = outputs[4] if len(outputs) > 4 else {}
    if not terms:
        return contrastive, {}
    total = weights.get("clip", 1.0) * contrastive
    for name, value in terms.items():
        total = total + weights.get(name, 1.0) * weight_scale * value
    return total, {"clip": contrastive.detach(), **{k: v.detach() for k, v in terms.items()}}


def _step_loss(model, loss_fn, pixels, text_in, accum_freq: int, no_sync, weights=None, backward=None):
    """Forward + backward of one step; returns the loss and its parts (detached). `backward(loss)`:
    e.g. through a loss scaler (default: loss.backward())."""
    weights = weights or {}
    backward = backward or torch.Tensor.backward
    if accum_freq == 1:
        loss, parts = _objective(loss_fn, weights, model(pixels, text_in))
        backward(loss)
        return loss.detach(), parts
    px, tx = pixels.chunk(accum_freq), _split(text_in, accum_freq)
    with torch.no_grad():
        cached = [model(p, t)[:2] for p, t in zip(px, tx, strict=True)]  # [(image [b, E], text [b, E])]
    clip_value, aux = None, {}
    for j in range(accum_freq):
        outputs = model(px[j], tx[j])
        image_j, text_j, scale, bias = outputs[:4]
        images = torch.cat([image_j if i == j else c[0] for i, c in enumerate(cached)])
        texts = torch.cat([text_j if i == j else c[1] for i, c in enumerate(cached)])
        if j > 0:  # the scale/bias gradient is complete after the first pass; don't count it again
            scale, bias = scale.detach(), bias.detach() if bias is not None else None
        with no_sync() if j < accum_freq - 1 else contextlib.nullcontext():
            # the contrastive loss spans the whole batch in every pass; per-sample terms add up over passes
            loss, parts = _objective(loss_fn, weights, (images, texts, scale, bias, *outputs[4:]), 1 / accum_freq)
            backward(loss)
        clip_value = parts.get("clip")
        for k, v in parts.items():
            if k != "clip":
                aux[k] = aux.get(k, 0.0) + v / accum_freq
    if not aux:
        return loss.detach(), {}
    total = weights.get("clip", 1.0) * clip_value + sum(weights.get(k, 1.0) * v for k, v in aux.items())
    return total, {"clip": clip_value, **aux}


def train_contrastive(model: torch.nn.Module, text_side, data, sampler: CaptionSampler, cfg: TrainConfig, *,
                      name: str, seed: int = 0, loss: str = "clip", resume: bool = True, progress: bool = True,
                      device: torch.device | None = None) -> dict:
    """Train `model` (forward(pixels, text_input) -> image, text, scale, bias) in place; returns a summary.
    `data`: an ImageSet or a batch source (llm2clip.stage2.batches)."""
    cfg.validate(name)
    rank, world_size = init_from_env()
    section = name if "." in name else f"stage2.{name}"
    if cfg.batch_size % (world_size * cfg.accum_freq):
        raise ConfigError(f"{section}.batch_size={cfg.batch_size} must divide by processes x accum_freq "
                          f"({world_size} x {cfg.accum_freq})")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    loss_fn = SigLipLoss() if loss == "siglip" else ClipLoss(local_loss=True)
    optimizer, scheduler = make_optimizer(model, cfg, section)
    # fp16: a dynamic loss scale; a step whose gradients overflow is skipped and the scale halves
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16" and not cfg.deepspeed)
    source = as_batches(data)
    out = Path(cfg.out)
    start, rejected, data_position = 0, [], None
    if resume:
        ckpt, rejected = latest_checkpoint(out / "checkpoints")
        if ckpt is not None:  # under DeepSpeed: weights and schedule (ZeRO partitions the optimizer)
            extra = checkpoint_extra(ckpt)
            check_resume_key(ckpt, extra.get("resume_key"), cfg.resume_key(seed, loss), section)
            start = load_checkpoint(ckpt, model, None if cfg.deepspeed else optimizer, scheduler)
            if extra.get("scaler"):
                scaler.load_state_dict(extra["scaler"])
            data_position = _rank_position(extra.get("data"), rank, world_size, section)
    engine, no_sync, scalars = model, contextlib.nullcontext, []
    if cfg.deepspeed:
        import deepspeed

        from ..distributed import init_for_deepspeed
        from ..stage1.cc import deepspeed_config

        init_for_deepspeed()  # one process without a launcher: a one-rank group, not MPI
        ds = deepspeed_config(cfg.deepspeed, cfg.batch_size // world_size, world_size, cfg.max_grad_norm,
                              bf16=device.type == "cuda" and cfg.precision == "bf16",
                              fp16=device.type == "cuda" and cfg.precision == "fp16")
        scalars = _scalars_as_vectors(model)
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds)
    elif world_size > 1:
        engine = torch.nn.parallel.DistributedDataParallel(model)
        no_sync = engine.no_sync
    writer = _tensorboard(out / "tensorboard") if rank == 0 else None
    weights = getattr(model, "loss_weights", {})  # e.g. Knowledge-CLIP's α, β, γ
    key, skipped, overflows = f"{section}.nonfinite", 0, 0
    curve, terms, seen, t0 = [], [], 0, time.perf_counter()
    batches = source.iterate(start, rank, world_size, cfg.batch_size, sampler, seed, data_position)
    bar = tqdm(range(start, cfg.steps), desc=name, disable=not progress or rank != 0,
               initial=start, total=cfg.steps)
    for step in bar:
        batch = next(batches)
        pixels, text_in = batch.pixels_on(device), _to(text_side(batch.keys, batch.captions), device)
        with autocast(device, cfg.precision):
            if cfg.deepspeed:
                step_loss, parts = _objective(loss_fn, weights, engine(pixels, text_in))
                engine.backward(step_loss)
                apply_step(step_loss, step, key, "stop")
                engine.step()
                step_loss = step_loss.detach()
            else:
                step_loss, parts = _step_loss(engine, loss_fn, pixels, text_in, cfg.accum_freq, no_sync, weights,
                                              lambda value: scaler.scale(value).backward())
        if not cfg.deepspeed:
            if apply_step(step_loss, step, key, cfg.nonfinite):
                overflows += not _optimizer_step(model, optimizer, scaler, cfg.max_grad_norm)
            else:
                skipped += 1
            scheduler.step()  # a skipped batch still uses up its step: the schedule stays a function of the step
            optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()
        logged = global_mean(step_loss)  # the whole batch's loss, as one process would log it
        value = logged.item() if torch.isfinite(logged) else None  # JSON has no NaN
        curve.append(value)
        terms.append({k: v.item() for k, v in parts.items()} if value is not None else {})
        seen += cfg.batch_size
        rate = seen / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{value:.3f}" if value is not None else "skipped", img_s=f"{rate:.0f}")
        if writer and value is not None:
            writer.add_scalar(f"{name}/loss", value, step)
            writer.add_scalar(f"{name}/lr", scheduler.get_last_lr()[0], step)
            writer.add_scalar(f"{name}/logit_scale", model.logit_scale.exp().item(), step)
            writer.add_scalar(f"{name}/images_per_s", rate, step)
            for k, v in terms[-1].items():
                writer.add_scalar(f"{name}/loss_{k}", v, step)
        last = step + 1 == cfg.steps
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or last:
            extra = {"resume_key": cfg.resume_key(seed, loss), "data": _gather_positions(source.position(), world_size),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None}
            if rank == 0:
                with _scalar_shapes(scalars):
                    save_checkpoint(out / "checkpoints", step + 1, model, None if cfg.deepspeed else optimizer,
                                    scheduler, cfg.keep_checkpoints, extra=extra)
    _reshape(scalars, ())
    if writer:
        writer.close()
    summary = {"steps": cfg.steps, "resumed_from": start, "damaged_checkpoints": rejected,
               "loss_first": curve[0] if curve else None, "loss_last": curve[-1] if curve else None,
               "images_per_s": round(seen / max(time.perf_counter() - t0, 1e-9), 1), "world_size": world_size,
               "skipped_nonfinite": skipped}
    if scaler.is_enabled():
        summary.update(loss_scale_overflows=overflows, loss_scale=scaler.get_scale())
    if terms and terms[0]:
        summary["terms_first"], summary["terms_last"] = terms[0], terms[-1]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "loss.jsonl", "a" if start else "w") as f:
            for i, (v, parts) in enumerate(zip(curve, terms, strict=True), start):
                f.write(json.dumps({"step": i, "loss": v, **({"terms": parts} if parts else {})}) + "\n")
    return summary


def autocast(device: torch.device, precision: str):
    """bf16 where it pays (llm2clip.precision), fp16 as asked, fp32 otherwise."""
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return bf16_autocast(device, enabled=precision == "bf16")


def _optimizer_step(model, optimizer, scaler: torch.amp.GradScaler, max_grad_norm: float) -> bool:
    """Unscale, clip and step; False when the loss scaler skipped the step (inf/NaN gradients), which
    also lowers the scale. A disabled scaler is a plain step."""
    params = [p for p in model.parameters() if p.requires_grad]
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    return scale is None or scaler.get_scale() >= scale


def _gather_positions(position: dict, world_size: int) -> dict | None:
    """Every rank's data position (streamed data; None in memory), for rank 0's checkpoint."""
    positions = [position]
    if world_size > 1:
        positions = [None] * world_size
        torch.distributed.all_gather_object(positions, position)
    return {"world_size": world_size, "ranks": positions} if any(positions) else None


def _rank_position(saved: dict | None, rank: int, world_size: int, section: str) -> dict | None:
    if not saved:
        return None
    if saved["world_size"] != world_size:
        raise ConfigError(f"{section}: the checkpoint streamed data with {saved['world_size']} processes and this run "
                          f"has {world_size}; a stream's sample position is per process. Fix: resume with "
                          f"{saved['world_size']} processes, or start over in a new {section}.out")
    return saved["ranks"][rank]


def _scalars_as_vectors(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """DeepSpeed broadcasts parameters as byte views, which 0-dim tensors (logit_scale, CLIP's too)
    cannot give: train them as [1] views of the same storage; `_scalar_shapes` restores them."""
    scalars = [p for p in model.parameters() if p.dim() == 0]
    _reshape(scalars, (1,))
    return scalars


def _reshape(params: list[torch.nn.Parameter], shape: tuple[int, ...]) -> None:
    for p in params:
        p.data = p.data.reshape(shape)  # a view: DeepSpeed's flat buffers keep pointing at it


@contextlib.contextmanager
def _scalar_shapes(scalars: list[torch.nn.Parameter]):
    """Checkpoints keep the model's own 0-dim shapes."""
    _reshape(scalars, ())
    try:
        yield
    finally:
        _reshape(scalars, (1,))


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a bare environment should still train
        return None
    return SummaryWriter(str(folder))
