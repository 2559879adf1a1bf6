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

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..data.readers import SkipCounter
from .data import Caption, CaptionSampler, ImageSet, batch_indices


@dataclass
class StepBatch:
    pixels: torch.Tensor  # [b, 3, H, W], this rank's share of the step's batch
    keys: list[str]
    captions: list[Caption]  # the caption each sample trains with this step


class MemoryBatches:
    """An in-memory split; a step's batch is a pure function of (seed, step)."""

    def __init__(self, images: ImageSet):
        self.images = images

    @property
    def stats(self) -> SkipCounter | None:
        return self.images.stats

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
    """A streamed split (see llm2clip.data.stream): `make_dataset(rank, world_size, batch_size, seed,
    resume)` builds the IterableDataset; `loader` holds the DataLoader knobs."""

    def __init__(self, make_dataset, loader, stats: SkipCounter | None = None):
        self.make_dataset, self.loader = make_dataset, loader
        self.stats = stats or SkipCounter()
        self._position = None

    def iterate(self, start: int, rank: int, world_size: int, batch_size: int, sampler: CaptionSampler,
                seed: int, resume: dict | None = None) -> Iterator[StepBatch]:
        """`batch_size`: the global batch; this rank streams batch_size // world_size samples a step.
        `resume`: what `position()` returned at step `start` (None: from the start)."""
        from ..data.stream import StreamPosition, make_loader

        dataset = self.make_dataset(rank=rank, world_size=world_size, batch_size=batch_size // world_size, seed=seed,
                                    resume=resume)
        self._position = StreamPosition(start, resume)
        step = start
        for batch in make_loader(dataset, self.loader.workers, self.loader.prefetch_factor, self.loader.pin_memory):
            self._position.update(batch)
            for reason, n in batch["skipped"].items():
                self.stats.counts[reason] += n
            self.stats.read += len(batch["keys"])
            # captions per sample: a function of (seed, step, rank), as each rank holds other samples
            chosen = sampler.choose(batch["captions"], step, salt=rank)
            yield StepBatch(batch["pixels"], batch["keys"], chosen)
            step += 1

    def position(self) -> dict[str, Any]:
        return self._position.state() if self._position is not None else {}


def as_batches(data) -> MemoryBatches | StreamBatches:
    """An ImageSet is served from memory; a batch source passes through."""
    return MemoryBatches(data) if isinstance(data, ImageSet) else data
