"""Benchmark protocols: stream a set's images through a model in batches, then score.

Retrieval goes through llm2clip.eval's `retrieval_features` and `retrieval_metrics`, the code the main
job's evaluation uses (hit@k with every caption of an image a positive, CLIP_benchmark's semantics).
Classification keeps only each image's true-class rank and top-1 class, so memory does not grow with
the number of classes times images; pixels never outlive their batch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..data.images import ImageSkip, load_image
from ..data.readers import fail
from ..errors import DataError
from ..eval import retrieval_features, retrieval_metrics
from .base import CLASSIFICATION, EvalSet

MAX_IMAGE_PIXELS = 4096 * 4096  # data.max_image_pixels' default: the decompression-bomb guard
# captions per encode_texts call: EvalModel length-sorts them into its own batches, so the more it sees
# at once the less padding its LLM / text tower runs on (only [n, E] outputs are held)
TEXT_GROUP = 8192


@dataclass
class EvalOptions:
    batch_size: int = 64
    recall_k: Sequence[int] = (1, 5, 10)
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it
    progress: bool = True
    max_image_pixels: int = MAX_IMAGE_PIXELS


class SetBatches:
    """An EvalSet as a split (what llm2clip.eval reads): batches of preprocessed pixels [b, 3, H, W],
    keys, and per image its captions {"0": text, "1": text, ...} or its class label."""

    def __init__(self, evalset: EvalSet, processor, options: EvalOptions):
        self.evalset, self.processor, self.options = evalset, processor, options

    def _decoded(self) -> Iterator[tuple[object, object]]:
        s, o = self.evalset, self.options
        for item in s.items():
            try:
                yield item, load_image(item.image, o.max_image_pixels)
            except ImageSkip as e:
                s.stats.read -= 1  # the reader counted it as read; it is skipped here instead
                fail(s.stats, o.strict, e.reason, f"{s.name}:{item.key}", e.detail)

    def batches(self, batch_size: int) -> Iterator[dict]:
        chunk: list = []
        for pair in self._decoded():
            chunk.append(pair)
            if len(chunk) == batch_size:
                yield self._batch(chunk)
                chunk = []
        if chunk:
            yield self._batch(chunk)

    def _batch(self, chunk: list) -> dict:
        items, images = zip(*chunk, strict=True)
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]  # [b, 3, H, W]
        batch = {"pixels": pixels, "keys": [it.key for it in items]}
        if self.evalset.task == CLASSIFICATION:
            batch["labels"] = torch.tensor([it.label for it in items], dtype=torch.long)  # [b]
        else:  # a caption shared by several images keeps its id in the field name (merged before scoring)
            batch["captions"] = [{f"id:{i}": c for i, c in zip(it.caption_ids, it.captions, strict=True)}
                                 if it.caption_ids else {str(i): c for i, c in enumerate(it.captions)} for it in items]
        return batch


def _bar(evalset: EvalSet, options: EvalOptions) -> Callable | None:
    if not options.progress:
        return None
    total = -(-evalset.size // options.batch_size) if evalset.size else None
    label = evalset.name + (f" [{evalset.language}]" if evalset.language != "en" else "")
    return lambda it: tqdm(it, total=total, desc=label, unit="batch")


def fold_metrics(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor, folds: int,
                 ks: Sequence[int]) -> dict[str, float]:
    """COCO 1k: the mean over `folds` consecutive equal image folds, each scored against its own
    images' captions. images [I, E], texts [T, E], owner [T] -> CLIP_benchmark keys."""
    size = images.shape[0] // folds
    if size == 0:
        raise ValueError(f"{images.shape[0]} images cannot make {folds} folds")
    per_fold = []
    for f in range(folds):
        lo, hi = f * size, (f + 1) * size
        mine = (owner >= lo) & (owner < hi)  # [T]
        per_fold.append(retrieval_metrics(images[lo:hi], texts[mine], owner[mine] - lo, ks))
    return {k: sum(m[k] for m in per_fold) / folds for k in per_fold[0]}


def merge_shared_captions(texts: torch.Tensor, owner: torch.Tensor, captions: list, num_images: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts with an id ('id:<x>' fields) that several images list become one query whose positives are
    all those images. texts [T, E], owner [T] -> (texts [T', E], positives [T', I] bool)."""
    rows: dict[str, int] = {}
    keep, owners = [], []
    for t, caption in enumerate(captions):
        shared = caption.field.startswith("id:")
        if shared and caption.field in rows:
            owners[rows[caption.field]].append(int(owner[t]))
            continue
        if shared:
            rows[caption.field] = len(keep)
        keep.append(t)
        owners.append([int(owner[t])])
    positives = torch.zeros(len(keep), num_images, dtype=torch.bool)
    for row, images in enumerate(owners):
        positives[row, images] = True
    return texts[keep], positives


def evaluate_retrieval_set(model, evalset: EvalSet, options: EvalOptions) -> dict[str, dict[str, float]]:
    """{"": metrics over the whole set, "1k": the fold mean (only when evalset.folds > 1)}; fractions."""
    split = SetBatches(evalset, model.processor, options)
    features = retrieval_features(model.encode_images, lambda keys, captions: model.encode_texts(
        [c.text for c in captions]), split, {"captions": None}, options.batch_size, _bar(evalset, options),
        text_batch_size=TEXT_GROUP)
    if "captions" not in features:
        raise ValueError(f"{evalset.name}: no caption was read ({evalset.stats.brief()})")
    images = features["images"]  # [I, E]
    texts, owner, captions = features["captions"]  # [T, E], [T]
    if any(c.field.startswith("id:") for c in captions):
        if evalset.folds > 1:
            raise ValueError(f"{evalset.name}: captions shared by several images cannot be scored in folds")
        texts, positives = merge_shared_captions(texts, owner, captions, images.shape[0])  # [T', E], [T', I]
        return {"": retrieval_metrics(images, texts, positives, options.recall_k)}
    out = {"": retrieval_metrics(images, texts, owner, options.recall_k)}
    if evalset.folds > 1:
        # a skipped image would shift every later fold's boundary: such folds are not the standard ones
        if evalset.stats.skipped or images.shape[0] % evalset.folds:
            print(f"{evalset.name}: 1k folds not scored: {evalset.stats.skipped} images were skipped and "
                  f"{images.shape[0]} remain (the folds need every image of the split)", file=sys.stderr)
        else:
            out["1k"] = fold_metrics(images, texts, owner, evalset.folds, options.recall_k)
    return out


@torch.inference_mode()
def evaluate_classification_set(model, evalset: EvalSet, options: EvalOptions) -> dict[str, dict[str, float]]:
    """Zero-shot classification with OpenAI's prompt ensembling: {"": {acc1, acc5, mean_per_class_recall}}."""
    from .classification import metrics_from_ranks, ranks_and_predictions, zero_shot_classifier

    classifier = zero_shot_classifier(model.encode_texts, evalset.classnames, evalset.templates,
                                      options.batch_size)  # [C, E]
    ranks, predictions, targets = [], [], []
    bar = _bar(evalset, options)
    batches = SetBatches(evalset, model.processor, options).batches(options.batch_size)
    for batch in bar(batches) if bar else batches:
        logits = model.encode_images(batch["pixels"]).float() @ classifier.T  # [b, C]
        rank, prediction = ranks_and_predictions(logits, batch["labels"])  # [b], [b]
        ranks.append(rank)
        predictions.append(prediction)
        targets.append(batch["labels"])
    if not ranks:
        raise ValueError(f"{evalset.name}: no image was read ({evalset.stats.brief()})")
    return {"": metrics_from_ranks(torch.cat(ranks), torch.cat(predictions), torch.cat(targets),
                                   len(evalset.classnames))}


def evaluate_set(model, evalset: EvalSet, options: EvalOptions) -> dict[str, dict[str, float]]:
    run = evaluate_classification_set if evalset.task == CLASSIFICATION else evaluate_retrieval_set
    try:
        return run(model, evalset, options)
    except ValueError as e:  # e.g. every sample skipped: one line for the command, not a traceback
        raise DataError(f"{evalset.name}: {e} ({evalset.stats.brief()}). Fix: check --data-root; --strict stops at "
                        "the first bad sample and names it") from None
