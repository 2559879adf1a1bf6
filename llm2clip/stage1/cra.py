"""Caption retrieval accuracy (CRA), the paper's stage-1 metric.

Two captions of each image form a pool of 2N captions; each caption queries the other 2N - 1 and
scores a hit when its nearest neighbour (cosine) is the other caption of the same image. Top-1, in %.

On the shapes world: `en` pools the two English long paraphrases of each image (the paper's protocol
on COCO's two captions). `cross_lingual` (English vs Chinese long caption) and `short_long` retrieve
across the two sets instead: in one pool, the nearest neighbour of a caption is one of the same
language or length, whatever the embedder, so a pool would not measure meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..embedder import CaptionEmbedder


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


def read_views(path: str) -> dict[str, tuple[list[str], list[str]]]:
    """Caption lists per view from a shapes-world JSONL/CSV (images are not opened)."""
    from ..data.readers import CaptionReader, DataConfig

    reader = CaptionReader(DataConfig(path=path, long_caption_keys=["long_caption", "long_caption_2"]),
                           load_images=False)
    samples = [s for s in reader if s.short_caption and len(s.long_captions) >= 2 and s.meta.get("long_caption_zh")]
    fields = {"short_caption": [s.short_caption for s in samples],
              "long_caption": [s.long_captions[0] for s in samples],
              "long_caption_2": [s.long_captions[1] for s in samples],
              "long_caption_zh": [s.meta["long_caption_zh"] for s in samples]}
    return {name: (fields[a], fields[b]) for name, (a, b, _) in VIEWS.items()}


def evaluate_cra(embedder: CaptionEmbedder, views: dict[str, tuple[list[str], list[str]]],
                 progress: bool = False) -> dict[str, float]:
    """CRA per view, in percent. Each distinct caption list is encoded once."""
    cache: dict[int, torch.Tensor] = {}

    def encode(texts: list[str]) -> torch.Tensor:
        if id(texts) not in cache:
            cache[id(texts)] = embedder.encode(texts, progress=progress)
        return cache[id(texts)]

    return {name: round(VIEWS[name][2](encode(a), encode(b)), 2) for name, (a, b) in views.items()}
