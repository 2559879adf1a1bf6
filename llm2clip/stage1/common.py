"""Pieces shared by the stage-1 trainers: seeding, optimiser + schedule."""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, warmup_steps: int,
                   total_steps: int, schedule: str = "cosine"):
    """AdamW over trainable parameters; transformers' cosine, linear (the HF Trainer's default, as the
    official LLM2CLIP stage 1) or constant schedule, each after a linear warmup."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    trainable = [p for p in params if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # empty groups dropped: DeepSpeed's ZeRO optimiser drops them too, which would desync the schedule
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999))
    warmup = min(warmup_steps, total_steps)
    if schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    elif schedule == "linear":
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    elif schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    else:
        raise ValueError(f"unknown lr schedule '{schedule}'; use cosine, linear or constant")
    return optimizer, scheduler


class TrainState:
    """Loss history, for the summaries the trainers return."""

    def __init__(self):
        self.losses: list[float] = []

    def log(self, loss: float) -> None:
        self.losses.append(loss)

    def mean_first(self, n: int) -> float:
        return float(np.mean(self.losses[:n]))

    def mean_last(self, n: int) -> float:
        return float(np.mean(self.losses[-n:]))

    def curve(self, points: int = 10) -> list[float]:
        """The loss at `points` evenly spaced steps, for run summaries."""
        idx = np.linspace(0, len(self.losses) - 1, min(points, len(self.losses))).round().astype(int)
        return [round(self.losses[i], 4) for i in idx]
