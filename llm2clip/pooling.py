"""Pool token states into one caption vector, whichever side the batch is padded on.

`attention_mask` marks real tokens; `pool_mask` marks the tokens that may be pooled (the caption
text, without the instruction, as llm2vec's `skip_instruction` does). Both are [B, T] of 0/1.
"""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "weighted_mean", "eos", "last_token")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, T, D] -> [B, D] in hidden's dtype."""
    if mode in ("eos", "last_token"):
        # Last real token, for left or right padding: the highest position whose mask is 1.
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * attention_mask).argmax(dim=1)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = pool_mask.to(hidden.dtype)  # [B, T]
    if mode == "weighted_mean":
        # Weights 1..L over the pooled tokens in order (later tokens have seen more of the text).
        mask = torch.cumsum(mask, dim=1) * mask
    elif mode != "mean":
        raise ValueError(f"unknown pooling mode '{mode}'; choose one of {POOLING_MODES}")
    denom = mask.sum(dim=1, keepdim=True).clamp_min(1e-9)  # [B, 1]
    return torch.einsum("btd,bt->bd", hidden, mask) / denom
