"""Streaming image-caption batches for stage 2: split without duplicates, shuffled, resumable (issue #19).

`ImageSet` (stage2/data.py) decodes a whole split into RAM; CC3M/CC12M-sized webdataset shards never
fit, so `StreamDataset` reads them as open_clip's `get_wds_dataset` does, one batch at a time, and
holds nothing proportional to the number of samples (only the file list and the shuffle buffer).

Splitting. A consumer is one (rank, dataloader worker) pair: c = rank * workers + worker, C of them.
With at least C files (shards, JSONL/CSV files), every epoch permutes the file list with a generator
seeded by (seed, epoch) and consumer c reads files c, c + C, c + 2C, ... of it. With fewer files (one
JSONL file, an image folder), every consumer reads every file but keeps rows r with r % C == c
(CaptionReader's `shard=(c, C)`: other rows are not decoded). Either way each sample arrives exactly
once per epoch over all consumers. Consumers step through epochs independently.

Shuffling. Each consumer passes its records through a buffer of `shuffle_buffer` samples (webdataset's
`.shuffle(n)`) with its own generator seeded by (seed, epoch, consumer). The buffer holds undecoded
samples (image bytes or path), so its memory is the compressed size; images are decoded and
preprocessed after it, where an undecodable one is counted (or, strict, raises) as the readers do.

Resume. With fixed (seed, world_size, workers, batch_size, data) each consumer's batches are a pure
function of those. Torch's DataLoader returns worker 0's batch, then worker 1's, ..., so global step s
on a rank is consumer (rank, s % W)'s batch s // W. Every batch carries `state` = {epoch, consumed:
records drawn from that epoch's shuffled stream, dropped ones included}; `StreamPosition` collects the
latest state per consumer. Resuming at step s, each consumer rebuilds the same epoch's record stream
and shuffle buffer and discards `consumed` records, and torch worker i plays consumer role (i + s) % W
so the first batch returned is the one the uninterrupted run returned at step s. Cost: replay re-reads
(tar / JSON parsing, no image decoding, no processor) the epoch's records up to the position: about an
epoch's worth of I/O at worst, per consumer, once per resume.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import ConfigError, DataError, one_line
from .images import ImageSkip, make_image_processor
from .readers import CaptionReader, DataConfig, Sample, SkipCounter, caption_fields, decode_sample, fail

# keep(key, captions) -> captions to train with, or None to drop the sample (counted under keep.reason)
KeepFilter = Callable[[str, dict[str, str]], "dict[str, str] | None"]


@dataclass
class StreamConfig:
    """The `stage2.loader` knobs."""

    workers: int = 2  # dataloader worker processes per rank (0: decode in the training process)
    shuffle_buffer: int = 1000  # undecoded samples each worker shuffles among (1: reading order)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool | None = None  # None: when CUDA is available

    def validate(self, key: str = "stage2.loader") -> None:
        for name, low in (("workers", 0), ("shuffle_buffer", 1), ("prefetch_factor", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{key}.{name}: {value!r} must be an integer >= {low}")
        if not (self.pin_memory is None or isinstance(self.pin_memory, bool)):
            raise ConfigError(f"{key}.pin_memory: {self.pin_memory!r} must be true, false or null "
                              "(null: when CUDA is available)")


def make_loader(dataset: StreamDataset, workers: int, prefetch_factor: int = 2,
                pin_memory: bool | None = False) -> DataLoader:
    """A DataLoader over a StreamDataset: batches are built in the workers (batch_size=None)."""
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      prefetch_factor=prefetch_factor if workers else None,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=workers > 0)


def shuffled(records: Iterator, size: int, rng: random.Random) -> Iterator:
    """webdataset's `.shuffle(size)`: once `size` records are held, each new one takes the place of a
    random held one, which is yielded; the rest come out shuffled at the end."""
    buffer: list = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = rng.randrange(size)
        buffer[i], record = record, buffer[i]
        yield record
    rng.shuffle(buffer)
    yield from buffer


def consumer_files(n_files: int, consumers: int, consumer: int, seed: int, epoch: int,
                   shuffle: bool) -> list[int] | None:
    """Indices of the files `consumer` reads whole this epoch; None with fewer files than consumers
    (then every consumer reads every row-slice c of every file)."""
    if n_files < consumers:
        return None
    order = list(range(n_files))
    if shuffle:
        random.Random(f"files/{seed}/{epoch}").shuffle(order)  # str seeds hash with sha512: same in every process
    return order[consumer::consumers]


def _resume_states(resume: dict | None) -> tuple[int, dict[int, dict]]:
    """{"step": s, "states": {consumer: state}} (JSON turns the consumer ids into strings) -> (s, states)."""
    if not resume:
        return 0, {}
    return int(resume["step"]), {int(c): dict(s) for c, s in resume.get("states", {}).items()}


class StreamDataset(IterableDataset):
    """Yields one dict per batch of `batch_size` (this rank's share of the global batch):

        pixels    FloatTensor [b, 3, H, W], preprocessed by `processor`
        keys      list[str]
        captions  list[dict[str, str]]: field -> text (short, long and `extra_fields` columns)
        consumer  the consumer id that built it
        state     JSON-able position just after this batch (feed it to StreamPosition)
        skipped   {reason: count} of samples skipped since this consumer's previous batch

    `epochs=None`: endless, each epoch reshuffled (a batch may span two epochs); `epochs=1`: one pass,
    the last partial batch included. `keep`: a picklable filter run in the worker before decoding;
    a sample it drops is counted under `keep.reason` (default 'filtered'), or raises under data.strict.
    `resume`: StreamPosition.state() of an interrupted run with the same settings.
    """

    def __init__(self, data_cfg: DataConfig, batch_size: int, *, path: str | None = None, processor=None,
                 extra_fields: tuple[str, ...] = (), seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, shuffle_buffer: int = 1000, epochs: int | None = None,
                 keep: KeepFilter | None = None, resume: dict | None = None, key: str = "data.path"):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or (epochs is not None and epochs < 1):
            raise ConfigError(f"StreamDataset: batch_size {batch_size} and world_size {world_size} must be >= 1, "
                              f"rank {rank} in [0, world_size), epochs {epochs} None or >= 1")
        if path is not None and path != data_cfg.path:
            data_cfg = replace(data_cfg, path=path, format="auto")
        self.cfg, self.key = data_cfg, key
        self.paths = CaptionReader(data_cfg, key=key).paths  # validates here, before any worker starts
        self.processor = processor or make_image_processor(data_cfg.image_size)
        self.normalizer = PixelNormalizer.of(self.processor)
        self.batch_size, self.extra_fields, self.seed = batch_size, tuple(extra_fields), seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer, self.epochs, self.keep = shuffle, shuffle_buffer, epochs, keep
        self.resume_step, self.resume_states = _resume_states(resume)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # the DataLoader returns torch worker 0's batch first; after `step` batches that must be
        # consumer step % W's, so roles rotate by the resume step
        consumer = self.rank * workers + (worker + self.resume_step) % workers
        consumers = self.world_size * workers
        state = self.resume_states.get(consumer)
        if state is not None and state.get("consumers", consumers) != consumers:
            raise ConfigError(f"stage2.loader: the run being resumed read with {state['consumers']} consumers "
                              f"(ranks x workers), this one with {consumers}; resume with the same world size "
                              "and stage2.loader.workers")
        return self._batches(consumer, consumers, state)

    # -- one consumer ------------------------------------------------------------------------------
    def _records(self, epoch: int, consumer: int, consumers: int, stats: SkipCounter) -> Iterator[Sample]:
        """This consumer's undecoded samples of `epoch`, shuffled; the reader's skips go to `stats`."""
        files = consumer_files(len(self.paths), consumers, consumer, self.seed, epoch, self.shuffle)
        if files is None:
            reader = CaptionReader(self.cfg, shard=(consumer, consumers), key=self.key, decode_images=False,
                                   paths=self.paths)
        else:
            reader = CaptionReader(self.cfg, key=self.key, decode_images=False,
                                   paths=[self.paths[i] for i in files])
        reader.stats = stats
        records = iter(reader)
        if self.shuffle and self.shuffle_buffer > 1:
            records = shuffled(records, self.shuffle_buffer, random.Random(f"buffer/{self.seed}/{epoch}/{consumer}"))
        return records

    def _prepare(self, sample: Sample, post: SkipCounter) -> tuple[str, dict[str, str], torch.Tensor] | None:
        """(key, captions, pixels [3, H, W]) or None when the sample is skipped (counted in `post`)."""
        captions = caption_fields(sample, self.cfg, self.extra_fields)
        if self.keep is not None:  # before decoding: a dropped sample costs no image work
            captions = self.keep(sample.key, captions)
            if captions is None:
                fail(post, self.cfg.strict, getattr(self.keep, "reason", "filtered"), sample.source)
                return None
        try:
            sample = decode_sample(sample, self.cfg.max_image_pixels)
        except ImageSkip as e:
            fail(post, self.cfg.strict, e.reason, sample.source, e.detail)
            return None
        if self.normalizer is not None:  # resize + crop here; the consumer rescales and normalises
            out = self.processor(images=sample.image, do_rescale=False, do_normalize=False, return_tensors="pt")
        else:
            out = self.processor(images=sample.image, return_tensors="pt")
        return sample.key, captions, torch.as_tensor(out["pixel_values"][0])  # [3, H, W]

    def _batches(self, consumer: int, consumers: int, state: dict | None) -> Iterator[dict[str, Any]]:
        reader_stats, post = SkipCounter(), SkipCounter()
        epoch, skip = (int(state["epoch"]), int(state["consumed"])) if state else (0, 0)
        items: list[tuple[str, dict[str, str], torch.Tensor]] = []
        reported: Counter[str] = Counter()  # skip counts already sent with a batch
        consumed = 0

        def emit(reader_counts: Counter, position: int) -> dict[str, Any]:
            nonlocal reported
            now = reader_counts + post.counts
            keys, captions, pixels = zip(*items, strict=True)
            items.clear()
            delta, reported = dict(now - reported), now
            return {"pixels": torch.stack(pixels), "keys": list(keys), "captions": list(captions),  # [b, 3, H, W]
                    "consumer": consumer, "skipped": delta,
                    "state": {"epoch": epoch, "consumed": position, "consumers": consumers}}

        while self.epochs is None or epoch < self.epochs:
            records = self._records(epoch, consumer, consumers, reader_stats)
            for _ in range(skip):  # resume: the same records through the same buffer, not decoded
                if next(records, None) is None:
                    break
            consumed, kept = skip, 0
            if skip:
                reported = reader_stats.counts.copy()  # what the interrupted run had sent up to here
            while True:
                before = reader_stats.counts.copy()  # the reader reads ahead: a batch's counts end here
                sample = next(records, None)
                if sample is None:
                    break
                consumed += 1
                item = self._prepare(sample, post)
                if item is None:
                    continue
                kept += 1
                # a full batch goes out once the next kept sample is known, so its skip counts
                # include every sample dropped after it (a finite stream's last batch gets the tail)
                if len(items) == self.batch_size:
                    yield emit(before, consumed - 1)
                items.append(item)
            if self.epochs is None and kept == 0 and skip == 0:  # endless: would spin without yielding
                raise DataError(one_line(f"{self.cfg.path}: consumer {consumer} of {consumers} (rank x dataloader "
                                         f"worker) got no usable sample in epoch {epoch} ({reader_stats.brief()}; "
                                         f"after reading: {post.brief()}). Fix: fewer workers or more data"))
            epoch, skip = epoch + 1, 0
        if items:
            epoch -= 1  # the position is the end of the last epoch read
            yield emit(reader_stats.counts, consumed)


class PixelNormalizer:
    """The rescale and normalisation of a CLIP/SigLIP image processor, applied by the consumer to the uint8
    batches the workers send: a quarter of the bytes between processes, and on the training device
    rather than in numpy per image (CLIPImageProcessor's own steps cost ~30% of a worker's time; the
    result equals the processor's within 5e-7). uint8 [B, 3, H, W] -> float32 [B, 3, H, W]."""

    def __init__(self, scale: float, mean, std):
        self.scale = scale
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    @classmethod
    def of(cls, processor) -> PixelNormalizer | None:
        """None for a processor whose output is not rescale + normalise of a uint8 image (e.g. NaFlex)."""
        steps = ("do_rescale", "do_normalize", "rescale_factor", "image_mean", "image_std")
        if not all(getattr(processor, a, None) is not None for a in steps) or "NaFlex" in type(processor).__name__:
            return None
        if not (processor.do_rescale and processor.do_normalize) or len(processor.image_mean) != 3:
            return None
        return cls(float(processor.rescale_factor), processor.image_mean, processor.image_std)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            return pixels  # already normalised
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return (pixels.float() * self.scale - mean) / std


class StreamPosition:
    """Where a rank's stream stands: feed it every batch the training loop consumes (`update`), save
    `state()` in the checkpoint (one per rank: it holds that rank's consumers), and pass it back as
    StreamDataset(resume=...). Only batches consumed count: prefetched ones are read again."""

    def __init__(self, resume: dict | None = None):
        self.step, self.states = _resume_states(resume)

    def update(self, batch: dict[str, Any]) -> None:
        self.states[int(batch["consumer"])] = dict(batch["state"])
        self.step += 1

    def state(self) -> dict[str, Any]:
        """JSON-able: {"step": batches consumed, "states": {consumer id: its latest batch's state}}."""
        return {"step": self.step, "states": {str(c): dict(s) for c, s in sorted(self.states.items())}}


def iter_eval_batches(data_cfg: DataConfig, path: str, processor=None, extra_fields: tuple[str, ...] = (),
                      batch_size: int = 64, workers: int = 0, key: str = "data.path") -> Iterator[dict[str, Any]]:
    """One unshuffled pass over `path` in batch dicts (see StreamDataset), so evaluation can encode
    images as they arrive. With workers > 1 the workers' batches interleave; use the keys."""
    dataset = StreamDataset(data_cfg, batch_size, path=path, processor=processor, extra_fields=extra_fields,
                            shuffle=False, epochs=1, key=key)
    for batch in make_loader(dataset, workers):
        if dataset.normalizer is not None:
            batch["pixels"] = dataset.normalizer(batch["pixels"])
        yield batch
