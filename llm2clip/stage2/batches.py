"""Where a training step's batch comes from: one interface, two implementations.

- `MemoryBatches`: a split decoded once into RAM (`ImageSet`); step s's global batch is
  `batch_indices(seed, s)`, and each rank takes its slice. The shapes world and small splits use it:
  nothing is faster, and a resumed run needs no state beyond the step.
- `StreamBatches`: webdataset shards (or CSV/JSONL files) streamed through a torch DataLoader with
  workers, a shuffle buffer and per-rank/per-worker shard splitting (`llm2clip.data.stream`); memory
  does not grow with the dataset. A resumed run restarts each worker at its sample position, which the
  checkpoint carries (`position()`).

The training loop calls `iterate(...)` once and reads one `StepBatch` per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..data.readers import SkipCounter
from .data import Caption, CaptionSampler, ImageSet, batch_indices


@dataclass
class StepBatch:
    pixels: torch.Tensor  # [b, 3, H, W], this rank's share of the step's batch (uint8 if `normalize` is set)
    keys: list[str]
    captions: list[Caption]  # the caption each sample trains with this step
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None  # applied on the training device

    def pixels_on(self, device: torch.device) -> torch.Tensor:
        """float [b, 3, H, W] on `device`: a streamed uint8 batch crosses to it first, then is normalised."""
        pixels = self.pixels.to(device, non_blocking=True)
        return self.normalize(pixels) if self.normalize is not None else pixels


class MemoryBatches:
    """An in-memory split; a step's batch is a pure function of (seed, step)."""

    def __init__(self, images: ImageSet):
        self.images = images

    @property
    def stats(self) -> SkipCounter | None:
        return self.images.stats

    def only_cached(self, cache, strict: bool, fields: list[str]) -> tuple[MemoryBatches, int]:
        """Samples whose captions the cache lacks are dropped now (and counted); -> (self, dropped)."""
        return self, self.images.keep_cached(cache, strict, fields)

    def iterate(self, start: int, rank: int, world_size: int, batch_size: int, sampler: CaptionSampler,
                seed: int, resume: dict | None = None) -> Iterator[StepBatch]:
        """`batch_size`: the global batch (every rank draws it identically and takes its slice)."""
        images, b = self.images, batch_size // world_size
        step = start
        while True:
            batch = batch_indices(len(images), batch_size, step, seed)  # [B]
            chosen = sampler.choose([images.captions[i] for i in batch], step)
            idx, captions = batch[rank * b:(rank + 1) * b], chosen[rank * b:(rank + 1) * b]
            yield StepBatch(images.pixels[idx], [images.keys[i] for i in idx], captions)
            step += 1

    def position(self) -> dict:
        return {}  # the step alone fixes the next batch


class StreamBatches:
    """A streamed split (see llm2clip.data.stream): `make_dataset(rank=, world_size=, batch_size=, seed=,
    resume=, keep=)` builds the IterableDataset; `loader` is the StreamConfig (workers, prefetch, ...)."""

    def __init__(self, make_dataset, loader, keep=None):
        self.make_dataset, self.loader, self.keep = make_dataset, loader, keep
        self.stats = SkipCounter()  # what the workers skipped, summed as batches arrive
        self._position = None

    def only_cached(self, cache, strict: bool, fields: list[str]) -> tuple[StreamBatches, None]:
        """A copy whose workers drop captions the cache lacks, as they stream (counted then)."""
        return StreamBatches(self.make_dataset, self.loader, CachedOnly(cache, fields)), None

    def iterate(self, start: int, rank: int, world_size: int, batch_size: int, sampler: CaptionSampler,
                seed: int, resume: dict | None = None) -> Iterator[StepBatch]:
        """`batch_size`: the global batch; this rank streams batch_size // world_size samples a step.
        `resume`: what `position()` returned at step `start` (None: from the start)."""
        from ..data.stream import StreamPosition, make_loader

        dataset = self.make_dataset(rank=rank, world_size=world_size, batch_size=batch_size // world_size, seed=seed,
                                    resume=resume, keep=self.keep)
        self._position = StreamPosition(resume)
        step = start
        for batch in make_loader(dataset, self.loader.workers, self.loader.prefetch_factor, self.loader.pin_memory):
            self._position.update(batch)
            _count(self.stats, batch)
            # captions per sample: a function of (seed, step, rank), as each rank holds other samples
            chosen = sampler.choose(batch["captions"], step, salt=rank)
            yield StepBatch(batch["pixels"], batch["keys"], chosen, dataset.normalizer)
            step += 1

    def position(self) -> dict[str, Any]:
        return self._position.state() if self._position is not None else {}


class CachedOnly:
    """A stream's keep filter: the captions of `fields` the embedding cache holds; a sample left with
    none is dropped (counted as 'missing cache entry'; data.strict raises). Picklable: the cache
    reopens its memory maps in each worker."""

    reason = "missing cache entry"

    def __init__(self, cache, fields: list[str]):
        self.cache, self.fields = cache, list(fields)

    def __call__(self, key: str, captions: dict[str, str]) -> dict[str, str] | None:
        kept = {f: t for f, t in captions.items() if f not in self.fields or self.cache.has(key, f)}
        return kept if any(f in kept for f in self.fields) else None


def _count(stats: SkipCounter, batch: dict[str, Any]) -> None:
    """Add a streamed batch's samples and its workers' skip counts (since their previous batch)."""
    stats.counts.update(batch["skipped"])
    stats.read += len(batch["keys"])


def as_batches(data) -> MemoryBatches | StreamBatches:
    """An ImageSet is served from memory; a batch source passes through."""
    return MemoryBatches(data) if isinstance(data, ImageSet) else data


class StreamSplit:
    """An evaluation split read in one unshuffled pass per use, never whole in memory (the streamed
    counterpart of ImageSet's `batches` / `pixels_at`). `len()` and `stats` hold after a pass."""

    def __init__(self, data_cfg, path: str, processor, extra_fields: tuple[str, ...], workers: int, key: str):
        self.data_cfg, self.path, self.processor = data_cfg, path, processor
        self.extra_fields, self.workers, self.key = extra_fields, workers, key
        self.stats, self._count = SkipCounter(), None

    def batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        from ..data.stream import iter_eval_batches

        stats = SkipCounter()
        for batch in iter_eval_batches(self.data_cfg, self.path, self.processor, self.extra_fields, batch_size,
                                       self.workers, key=self.key):
            _count(stats, batch)
            yield batch
        self.stats, self._count = stats, stats.read

    def pixels_at(self, indices: list[int]) -> torch.Tensor:
        """[n, 3, H, W] of the samples at these positions of a pass (one more pass; the order is fixed)."""
        wanted, found, seen = set(indices), {}, 0
        for batch in self.batches(64):
            for j in range(len(batch["keys"])):
                if seen + j in wanted:
                    found[seen + j] = batch["pixels"][j]
            seen += len(batch["keys"])
        return torch.stack([found[i] for i in indices])

    def __len__(self) -> int:
        if self._count is None:  # known after a pass; count with one if none has run
            for _ in self.batches(256):
                pass
        return self._count
