"""Retrieval metrics with CLIP_benchmark's semantics and names.

Naming trap, kept for compatibility: `image_retrieval_recall@k` is text->image (a text retrieves
images) and `text_retrieval_recall@k` is image->text. Both are hit@k: a query scores when any of its
positives is in its top k, which is what matters when an image has several captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _hit_rates(queries: torch.Tensor, candidates: torch.Tensor, is_positive, ks: Sequence[int],
               chunk: int) -> dict[int, float]:
    """queries [Q, D], candidates [C, D] -> per k, the fraction of queries with a positive among their top-k
    candidates. Scored `chunk` queries at a time, so memory is [chunk, C], never [Q, C];
    is_positive(first query index, top [q, k] candidate indices) -> bool [q, k]."""
    k_max = min(max(ks), candidates.shape[0])
    hits = dict.fromkeys(ks, 0)
    for start in range(0, queries.shape[0], chunk):
        top = (queries[start:start + chunk] @ candidates.T).topk(k_max, dim=1).indices  # [q, k_max]
        positive = is_positive(start, top)  # [q, k_max]
        for k in ks:
            hits[k] += int(positive[:, :k].any(dim=1).sum())
    return {k: hits[k] / queries.shape[0] for k in ks}


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """image_features [I, D], text_features [T, D] (L2-normalised), text_to_image: [T] LongTensor (each
    text's image index) or [T, I] bool (a text with several images: a hit when any of them ranks).
    Returns CLIP_benchmark's keys as fractions in [0, 1]."""
    if text_features.shape[0] != text_to_image.shape[0]:
        raise ValueError(f"{text_features.shape[0]} texts but {text_to_image.shape[0]} text_to_image entries")
    images, texts = image_features.float(), text_features.float()
    if text_to_image.dtype == torch.bool:  # [T, I]
        def t2i(start, top):
            return text_to_image[start:start + len(top)].gather(1, top)

        def i2t(start, top):
            return text_to_image.T[start:start + len(top)].gather(1, top)
    else:  # [T]: compare indices, so no [T, I] matrix is ever built
        def t2i(start, top):
            return top == text_to_image[start:start + len(top), None]

        def i2t(start, top):
            return text_to_image[top] == torch.arange(start, start + len(top))[:, None]
    text_to_images = _hit_rates(texts, images, t2i, ks, chunk)
    image_to_texts = _hit_rates(images, texts, i2t, ks, chunk)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = text_to_images[k]  # text -> image
        out[f"text_retrieval_recall@{k}"] = image_to_texts[k]  # image -> text
    return out


def as_percent_table(metrics: dict[str, float], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark keys -> our results.json keys (i2t_r1, t2i_r1, ...) in percent."""
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = round(100 * metrics[f"text_retrieval_recall@{k}"], 2)
        out[f"t2i_r{k}"] = round(100 * metrics[f"image_retrieval_recall@{k}"], 2)
    return out


# -- evaluating a model ------------------------------------------------------------------------------------
# A split is anything with `batches(batch_size)` -> {"pixels" [b, 3, H, W], "keys", "captions" (field -> text)}
# in a fixed order, and `pixels_at(indices)` [n, 3, H, W]: an in-memory ImageSet, or a streamed split that
# never holds more than a few batches of pixels.
def retrieval_sets(keys: list[str], captions: list[dict[str, str]], sets: dict[str, list[str] | None]
                   ) -> dict[str, tuple[list[str], list, torch.Tensor]]:
    """Per set: (keys, captions, text_to_image) over every caption of the listed fields that exists
    (fields None: every caption of each image, as benchmarks with several captions per image have)."""
    from .stage2.data import Caption

    out = {}
    for name, fields in sets.items():
        set_keys, set_captions, owner = [], [], []
        for i, (key, caps) in enumerate(zip(keys, captions, strict=True)):
            for f in (caps if fields is None else fields):
                if f in caps:
                    set_keys.append(key)
                    set_captions.append(Caption(f, caps[f]))
                    owner.append(i)
        if set_captions:
            out[name] = (set_keys, set_captions, torch.tensor(owner, dtype=torch.long))
    return out


@torch.inference_mode()
def encode_in_batches(fn, items, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(items[i:i + batch_size]).float().cpu() for i in range(0, len(items), batch_size)])


@torch.inference_mode()
def encode_split(encode_images, split, batch_size: int) -> tuple[torch.Tensor, list[str], list[dict[str, str]]]:
    """Image features [I, E] of a split as its batches arrive, with the keys and captions in that order."""
    features, keys, captions = [], [], []
    for batch in split.batches(batch_size):
        features.append(encode_images(batch["pixels"]).float().cpu())
        keys += batch["keys"]
        captions += batch["captions"]
    if not features:
        raise ValueError("the evaluation split yielded no image")
    return torch.cat(features), keys, captions


@torch.inference_mode()
def retrieval_features(encode_images, encode_texts, split, sets: dict[str, list[str] | None],
                       batch_size: int = 256, progress=None, text_batch_size: int | None = None) -> dict:
    """encode_images(pixels [B, 3, H, W]) -> [B, E]; encode_texts(keys, captions) -> [B, E] (both
    L2-normalised). Returns {"images" [I, E], "image_keys", set: (texts [T, E], text_to_image [T], captions)}.
    `progress`: a callable wrapping the batch iterator (e.g. a tqdm factory), or None. `text_batch_size`
    (default batch_size): texts per encode_texts call; an encoder that length-sorts its own batches
    wants many at once, so that captions of one length share a batch."""
    batches = split.batches(batch_size)
    image_features, image_keys, image_captions = encode_split(
        encode_images, _Batches(progress(batches) if progress else batches), batch_size)  # [I, E]
    features = {"images": image_features, "image_keys": image_keys}
    for name, (keys, captions, owner) in retrieval_sets(image_keys, image_captions, sets).items():
        def encode(idx, keys=keys, captions=captions):
            return encode_texts([keys[i] for i in idx], [captions[i] for i in idx])

        features[name] = (encode_in_batches(encode, list(range(len(keys))), text_batch_size or batch_size), owner,
                          captions)  # [T, E]
    return features


class _Batches:
    """An iterator of batches presented as a split (what encode_split reads)."""

    def __init__(self, batches):
        self._batches = batches

    def batches(self, batch_size: int):
        return iter(self._batches)


def evaluate_retrieval(encode_images, encode_texts, split, sets: dict[str, list[str] | None],
                       batch_size: int = 256) -> tuple[dict[str, dict[str, float]], dict]:
    """The main job's evaluation: ({set: {i2t_r1, t2i_r1, ...} in percent}, raw features for plots).
    `llm2clip eval` reads benchmarks through the same retrieval_features and retrieval_metrics."""
    features = retrieval_features(encode_images, encode_texts, split, sets, batch_size)
    results = {name: as_percent_table(retrieval_metrics(features["images"], *features[name][:2]))
               for name in sets if name in features}
    return results, features
