"""Contrastive losses.

`caption_contrastive_loss` is llm2vec's HardNegativeNLLLoss (scaled cosine, in-batch negatives plus
one hard negative per query), extended to gather candidates from every rank with gradients (local
loss: each rank scores its own queries against all candidates, open_clip style).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import all_gather_with_grad, world


def caption_contrastive_loss(query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None,
                             scale: float = 50.0) -> torch.Tensor:
    """query/positive/negative [B, D] -> scalar. Candidates: all positives, then all hard negatives."""
    rank, _ = world()
    if negative is None:
        candidates = all_gather_with_grad(positive)
    else:
        candidates = torch.cat([all_gather_with_grad(positive), all_gather_with_grad(negative)], dim=0)
    logits = scale * F.normalize(query, dim=-1) @ F.normalize(candidates, dim=-1).T  # [B, world*B*(1|2)]
    labels = torch.arange(query.shape[0], device=query.device) + rank * query.shape[0]
    return F.cross_entropy(logits, labels)
