"""Contrastive losses.

`caption_contrastive_loss` is llm2vec's HardNegativeNLLLoss (scaled cosine, in-batch negatives plus
one hard negative per query), extended to gather candidates from every rank with gradients.

`clip_loss` / `ClipLoss` and `SigLipLoss` follow open_clip: features are gathered from every rank
with gradients and, with `local_loss`, each rank scores only its own rows against all columns, so
memory grows linearly with the global batch and results equal the one-process loss.
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


def alignment_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between paired unit vectors, a/b [B, D] -> scalar (2 - 2 cos per pair):
    Wang & Isola's alignment term, the MSE of Reimers & Gurevych's multilingual distillation."""
    return (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).pow(2).sum(-1).mean()


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
              logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised [N, D] features (public API, one process).

    `logit_scale` is the multiplier, already exponentiated. Returns the mean of the image->text and
    text->image cross-entropies."""
    logits = logit_scale * image_features @ text_features.T  # [N, N]
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class ClipLoss(torch.nn.Module):
    """`clip_loss` across processes: gather-with-grad, then local or global scoring."""

    def __init__(self, local_loss: bool = True):
        super().__init__()
        self.local_loss = local_loss

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        rank, world_size = world()
        if world_size == 1:
            return clip_loss(image_features, text_features, logit_scale)
        all_images, all_texts = all_gather_with_grad(image_features), all_gather_with_grad(text_features)
        if not self.local_loss:  # every rank computes the whole [N, N] matrix
            return clip_loss(all_images, all_texts, logit_scale)
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device) + n * rank
        logits_per_image = logit_scale * image_features @ all_texts.T  # [n, world*n]
        logits_per_text = logit_scale * text_features @ all_images.T  # [n, world*n]
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(torch.nn.Module):
    """Sigmoid loss (Zhai et al. 2023): every image-text pair is a binary decision. Other ranks' texts
    arrive as negatives through a gather with gradients (open_clip's 'gather' implementation)."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        rank, _ = world()
        n = image_features.shape[0]
        all_texts = all_gather_with_grad(text_features)
        logits = logit_scale * image_features @ all_texts.T  # [n, world*n]
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = -torch.ones_like(logits)
        labels[torch.arange(n), torch.arange(n) + n * rank] = 1.0
        return -F.logsigmoid(labels * logits).sum() / n


# -- Knowledge-CLIP (arXiv 2412.03513) ---------------------------------------------------------------------
def embedding_distillation_loss(predicted: torch.Tensor, llm_vectors: torch.Tensor) -> torch.Tensor:
    """L_emb = ‖E_T(c)·W_e − LLM(c)‖², summed over the LLM width and averaged over the batch.

    predicted: E_T(c)·W_e [B, D] (CLIP text features mapped into the LLM's width); llm_vectors [B, D]."""
    if predicted.shape != llm_vectors.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and LLM vectors {tuple(llm_vectors.shape)} differ in "
                         "shape; is W_e's output width the cache's width?")
    return (predicted.float() - llm_vectors.float()).pow(2).sum(-1).mean()


def soft_concept_loss(logits: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """KL(soft_labels ‖ softmax(logits)) averaged over the batch: soft cross-entropy minus the labels'
    entropy, so a perfect classifier scores 0 whatever the labels' sharpness. logits, soft_labels [B, K]."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1), soft_labels.float(), reduction="batchmean")
