"""Torch side of the readers: an IterableDataset of CLIP-preprocessed images with their captions."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .images import make_image_processor
from .readers import CaptionReader, DataConfig


class ImageCaptionDataset(IterableDataset):
    """Yields {'key', 'pixel_values' [3, H, W] float32, 'short_caption', 'long_captions', 'meta'}.

    Rows are split across ranks and dataloader workers before images are decoded.
    """

    def __init__(self, cfg: DataConfig, processor=None, rank: int = 0, world_size: int = 1):
        self.cfg = cfg
        self.processor = processor or make_image_processor(cfg.image_size)
        self.rank, self.world_size = rank, world_size
        self.last_reader: CaptionReader | None = None  # its .stats hold this iterator's skip counts

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        reader = CaptionReader(self.cfg, shard=(self.rank * workers + worker, self.world_size * workers))
        self.last_reader = reader
        for sample in reader:
            pixels = self.processor(images=sample.image, return_tensors="pt")["pixel_values"][0]
            yield {"key": sample.key, "pixel_values": pixels, "short_caption": sample.short_caption,
                   "long_captions": sample.long_captions, "meta": sample.meta}


def collate(batch: list[dict]) -> dict:
    """Stack pixels to [B, 3, H, W]; keep text fields as lists."""
    out = {k: [b[k] for b in batch] for k in batch[0] if k != "pixel_values"}
    out["pixel_values"] = torch.stack([b["pixel_values"] for b in batch])
    return out
