"""Caption retrieval accuracy (CRA), the paper's stage-1 metric.

Two captions of each image form a pool of 2N captions; each caption queries the other 2N - 1 and
scores a hit when its nearest neighbour (cosine) is the other caption of the same image. Top-1, in %.

`en` pools the first two captions of each image from the configured columns (the paper's protocol on
COCO's captions; on the shapes world, the two English long paraphrases).
`cross_lingual` (English vs Chinese long caption) and `short_long` retrieve
across the two sets instead: in one pool, the nearest neighbour of a caption is one of the same
language or length, whatever the embedder, so a pool would not measure meaning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..embedder import CaptionEmbedder
from ..errors import one_line


def caption_retrieval_accuracy(a: torch.Tensor, b: torch.Tensor) -> float:
    """a, b [N, D]: row i of a and row i of b caption the same image -> top-1 accuracy in percent."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [N, D] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    n = a.shape[0]
    pool = F.normalize(torch.cat([a, b]).float(), dim=-1)  # [2N, D]
    sim = pool @ pool.T
    sim.fill_diagonal_(float("-inf"))  # a caption may not retrieve itself
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return 100.0 * (sim.argmax(dim=1) == partner).float().mean().item()


def cross_set_accuracy(a: torch.Tensor, b: torch.Tensor) -> float:
    """Retrieval across two sets (e.g. English and Chinese): mean of top-1 a->b and b->a, in percent.

    Used where a mixed pool would measure the captions' language or length, not their meaning."""
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T  # [N, N]
    target = torch.arange(a.shape[0])
    return 50.0 * ((sim.argmax(1) == target).float().mean() + (sim.argmax(0) == target).float().mean()).item()


# view -> (first caption field, second caption field, metric)
VIEWS = {
    "en": ("long_caption", "long_caption_2", caption_retrieval_accuracy),  # paper protocol: one pool
    "cross_lingual": ("long_caption", "long_caption_zh", cross_set_accuracy),
    "short_long": ("short_caption", "long_caption", cross_set_accuracy),
}


def collect_views(path: str, data_cfg=None, caption_keys: Sequence[str] = (),
                  second_language_key: str | None = "long_caption_zh") -> tuple[dict, dict]:
    """Caption lists per view from any caption file the reader takes (images are not opened).

    `caption_keys`: the columns whose captions are pooled, in order (a list column gives several
    captions); empty = `data_cfg.long_caption_keys`. `en` pairs each image's first two captions,
    `short_long` its short caption (`data_cfg.short_caption_key`) with the first, `cross_lingual` the
    first with `second_language_key`. -> (views, info: images used and each view left out and why)."""
    from ..data.readers import CaptionReader, DataConfig
    from ..errors import DataError

    data_cfg = data_cfg or DataConfig()
    keys = list(caption_keys) or list(data_cfg.long_caption_keys)
    reader = CaptionReader(replace(data_cfg, path=path, format="auto", long_caption_keys=keys), load_images=False,
                          key="stage1.cra_data")
    rows = list(reader)
    samples = [s for s in rows if len(s.long_captions) >= 2]
    if not samples:
        raise DataError(one_line(
            f"stage1.cra_data: no image in '{path}' has two captions in columns {keys} ({reader.stats.brief()}, "
            f"{len(rows)} rows with fewer). Fix: set stage1.cra_caption_keys to the caption columns (a list "
            "column counts each item), or stage1.cra_data=null to skip CRA"))
    first = [s.long_captions[0] for s in samples]
    views = {"en": (first, [s.long_captions[1] for s in samples])}
    info = {"num_images": len(samples), "images_with_fewer_captions": len(rows) - len(samples), "views_skipped": {}}
    pairs = {"short_long": [(s.short_caption, s.long_captions[0]) for s in samples if s.short_caption],
             "cross_lingual": [(s.long_captions[0], s.meta[second_language_key]) for s in samples
                               if second_language_key and isinstance(s.meta.get(second_language_key), str)]}
    reasons = {"short_long": f"fewer than 2 images with a '{data_cfg.short_caption_key}' caption",
               "cross_lingual": f"fewer than 2 images with a '{second_language_key}' caption"
               if second_language_key else "stage1.cra_second_language_key is null"}
    for name in ("cross_lingual", "short_long"):  # one image alone would score 100%
        if len(pairs[name]) >= 2:
            views[name] = ([a for a, _ in pairs[name]], [b for _, b in pairs[name]])
        else:
            info["views_skipped"][name] = reasons[name]
    return views, info


def read_views(path: str, data_cfg=None, caption_keys: Sequence[str] = (),
               second_language_key: str | None = "long_caption_zh") -> dict[str, tuple[list[str], list[str]]]:
    """Caption lists per view (see `collect_views`); defaults read the shapes world's columns."""
    return collect_views(path, data_cfg, caption_keys, second_language_key)[0]


def evaluate_cra(embedder: CaptionEmbedder, views: dict[str, tuple[list[str], list[str]]],
                 progress: bool = False) -> dict[str, float]:
    """CRA per view, in percent. Each distinct caption list is encoded once."""
    cache: dict[int, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:
        if id(texts) not in cache:
            cache[id(texts)] = embedder.encode(texts, progress=progress)
        return cache[id(texts)]

    return {name: round(VIEWS[name][2](encode(a), encode(b)), 2) for name, (a, b) in views.items()}
