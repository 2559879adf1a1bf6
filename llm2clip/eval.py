"""Retrieval metrics with CLIP_benchmark's semantics and names.

Naming trap, kept for compatibility: `image_retrieval_recall@k` is text->image (a text retrieves
images) and `text_retrieval_recall@k` is image->text. Both are hit@k: a query scores when any of its
positives is in its top k, which is what matters when an image has several captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _hit_at_k(scores: torch.Tensor, positives: torch.Tensor, k: int) -> float:
    """scores, positives [Q, C] -> fraction of queries with a positive among their top-k candidates."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # [Q, k]
    return positives.gather(1, top).any(dim=1).float().mean().item()


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """image_features [I, D], text_features [T, D] (L2-normalised), text_to_image [T] (LongTensor: each
    text's image index). Returns CLIP_benchmark's keys as fractions in [0, 1]."""
    if text_features.shape[0] != text_to_image.shape[0]:
        raise ValueError(f"{text_features.shape[0]} texts but {text_to_image.shape[0]} text_to_image entries")
    scores = text_features.float() @ image_features.float().T  # [T, I]
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(len(text_to_image)), text_to_image] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = _hit_at_k(scores, positives, k)  # text -> image
        out[f"text_retrieval_recall@{k}"] = _hit_at_k(scores.T, positives.T, k)  # image -> text
    return out


def as_percent_table(metrics: dict[str, float], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark keys -> our results.json keys (i2t_r1, t2i_r1, ...) in percent."""
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = round(100 * metrics[f"text_retrieval_recall@{k}"], 2)
        out[f"t2i_r{k}"] = round(100 * metrics[f"image_retrieval_recall@{k}"], 2)
    return out


# -- evaluating a model ------------------------------------------------------------------------------------
def retrieval_sets(images, sets: dict[str, list[str]]) -> dict[str, tuple[list[str], list, torch.Tensor]]:
    """Per set: (keys, captions, text_to_image) over every caption of the listed fields that exists."""
    from .stage2.data import Caption

    out = {}
    for name, fields in sets.items():
        keys, captions, owner = [], [], []
        for i, (key, caps) in enumerate(zip(images.keys, images.captions, strict=True)):
            for f in fields:
                if f in caps:
                    keys.append(key)
                    captions.append(Caption(f, caps[f]))
                    owner.append(i)
        if captions:
            out[name] = (keys, captions, torch.tensor(owner, dtype=torch.long))
    return out


@torch.inference_mode()
def encode_in_batches(fn, items, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(items[i:i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)])


@torch.inference_mode()
def evaluate_retrieval(encode_images, encode_texts, images, sets: dict[str, list[str]],
                       batch_size: int = 256) -> tuple[dict[str, dict[str, float]], dict]:
    """encode_images(pixels [B, 3, H, W]) -> [B, E]; encode_texts(keys, captions) -> [B, E] (both
    L2-normalised). Returns ({set: {i2t_r1, t2i_r1, ...} in percent}, raw features for plots)."""
    image_features = encode_in_batches(encode_images, images.pixels, batch_size)  # [I, E]
    results, features = {}, {"images": image_features}
    for name, (keys, captions, owner) in retrieval_sets(images, sets).items():
        def encode(idx, keys=keys, captions=captions):
            return encode_texts([keys[i] for i in idx], [captions[i] for i in idx])

        texts = encode_in_batches(encode, list(range(len(keys))), batch_size)  # [T, E]
        results[name] = as_percent_table(retrieval_metrics(image_features, texts, owner))
        features[name] = (texts, owner, captions)
    return results, features
