"""Stage-2 batches: images with one caption each, as what the model's text side reads.

`ImageSet` decodes and preprocesses a split once (CLIPImageProcessor) and keeps it in memory: the
shapes world and evaluation sets are small, and fixed tensors make every step a pure function of
(seed, step), so a resumed run draws exactly the batches it would have drawn.

Each sample's caption is drawn per step: a long caption with probability `long_caption_ratio`, else
the short one (LLM2CLIP mixes real and dense captions 1:1). The text side turns that choice into
model input: cached LLM vectors, live LLM vectors (online mode) or CLIP tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from ..data.images import make_image_processor
from ..data.readers import CaptionReader, DataConfig, SkipCounter, caption_fields


@dataclass
class Caption:
    field: str  # the data column it came from (cache field name)
    text: str


class ImageSet:
    """Keys, pixels [N, 3, H, W] and captions of one data file; bad samples skipped and counted."""

    def __init__(self, keys: list[str], pixels: torch.Tensor, captions: list[dict[str, str]], stats: SkipCounter):
        self.keys, self.pixels, self.captions, self.stats = keys, pixels, captions, stats

    @classmethod
    def load(cls, data_cfg: DataConfig, path: str, processor=None, extra_fields: tuple[str, ...] = (),
             progress: bool = False, key: str = "data.path") -> ImageSet:
        """`extra_fields`: text columns kept besides the short/long captions (e.g. second-language ones);
        `key`: the config key that named `path`, for error messages."""
        cfg = replace(data_cfg, path=path, format="auto" if path != data_cfg.path else data_cfg.format)
        processor = processor or make_image_processor(cfg.image_size)
        reader = CaptionReader(cfg, key=key)
        keys, pixels, captions = [], [], []
        for sample in tqdm(reader, desc=f"images {path}", unit="img", disable=not progress):
            fields = caption_fields(sample, cfg, extra_fields)
            keys.append(sample.key)
            pixels.append(processor(images=sample.image, return_tensors="pt")["pixel_values"][0])
            captions.append(fields)
        if not keys:
            raise ValueError(f"{path}: no usable sample ({reader.stats.summary()})")
        return cls(keys, torch.stack(pixels), captions, reader.stats)

    def __len__(self) -> int:
        return len(self.keys)

    def batches(self, batch_size: int):
        """The split in order, as evaluation reads it (llm2clip.eval)."""
        for i in range(0, len(self.keys), batch_size):
            yield {"pixels": self.pixels[i:i + batch_size], "keys": self.keys[i:i + batch_size],
                   "captions": self.captions[i:i + batch_size]}

    def pixels_at(self, indices: list[int]) -> torch.Tensor:
        return self.pixels[torch.tensor(indices, dtype=torch.long)]  # [n, 3, H, W]

    def keep_cached(self, cache, strict: bool, fields: list[str]) -> int:
        """Drop the `fields` captions the cache lacks (and samples left with no caption to train on);
        strict: raise instead. Returns how many samples were dropped, each counted as 'missing cache
        entry'."""
        from ..cache import MissingEmbedding

        keep = []
        for i, (key, caps) in enumerate(zip(self.keys, self.captions, strict=True)):
            missing = [f for f in caps if f in fields and not cache.has(key, f)]
            if missing and strict:
                raise MissingEmbedding(f"cache {cache.folder} has no '{missing[0]}' embedding for sample key '{key}'. "
                                       "Fix: rebuild the cache over this data (llm2clip cache build), or set "
                                       "data.strict=false to skip such samples")
            for f in missing:
                del caps[f]
            if any(f in caps for f in fields):
                keep.append(i)
            elif self.stats is not None:
                self.stats.skip("missing cache entry", key)
        dropped = len(self.keys) - len(keep)
        if dropped:
            self.keys = [self.keys[i] for i in keep]
            self.captions = [self.captions[i] for i in keep]
            self.pixels = self.pixels[torch.tensor(keep, dtype=torch.long)]
        return dropped


class CaptionSampler:
    """Which caption each sample of a step's batch trains with; a pure function of (seed, step)."""

    def __init__(self, short_field: str, long_fields: list[str], long_ratio: float, seed: int):
        self.short_field, self.long_fields, self.long_ratio, self.seed = short_field, long_fields, long_ratio, seed

    def choose(self, captions: list[dict[str, str]], step: int, salt: int = 0) -> list[Caption]:
        """`salt`: tells apart draws that share a step (each rank's own streamed samples)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + (salt << 40))
        draws = torch.rand(len(captions), generator=g).tolist()
        picks = torch.randint(0, 1 << 30, (len(captions),), generator=g).tolist()
        out = []
        for fields, draw, pick in zip(captions, draws, picks, strict=True):
            longs = [f for f in self.long_fields if f in fields]
            use_long = longs and (draw < self.long_ratio or self.short_field not in fields)
            name = longs[pick % len(longs)] if use_long else self.short_field
            out.append(Caption(name, fields[name]))
        return out


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Epoch-wise shuffling without a sampler state: the step alone fixes its batch. [batch_size]"""
    per_epoch = max(1, n // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[position * batch_size:(position + 1) * batch_size]


# -- text sides ------------------------------------------------------------------------------------------
class CachedVectors:
    """Cached LLM vectors, looked up by sample key and caption field. [B, D]"""

    def __init__(self, cache):
        self.cache = cache

    def __call__(self, keys: list[str], captions: list[Caption]) -> torch.Tensor:
        out = torch.empty(len(keys), self.cache.dim, dtype=torch.float32)
        for name in {c.field for c in captions}:
            rows = [i for i, c in enumerate(captions) if c.field == name]
            out[rows] = self.cache.lookup([keys[i] for i in rows], name).float()
        return out


class LiveVectors:
    """Online mode: the frozen LLM embeds each batch's captions as training goes. [B, D]"""

    def __init__(self, embedder):
        self.embedder = embedder

    def __call__(self, keys: list[str], captions: list[Caption]) -> torch.Tensor:
        return self.embedder.encode([c.text for c in captions])


class Tokens:
    """The baseline CLIP's own tokenizer, truncating at its 77-token window."""

    def __init__(self, model):
        self.model = model

    def __call__(self, keys: list[str], captions: list[Caption]) -> dict[str, torch.Tensor]:
        return self.model.tokenize([c.text for c in captions])
