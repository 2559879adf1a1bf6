"""Merge an embedder's adapters into full weights: a standard HF folder that `AutoModel` loads."""

from __future__ import annotations

from pathlib import Path

from ..embedder import CaptionEmbedder, read_embedder_config
from ..files import atomic_dir


def merge_embedder(folder: str | Path, out: str | Path) -> Path:
    """Write base + adapters (merged), the tokenizer and embedder_config.json (model '.', no adapters).

    The saved config keeps `is_causal: false` when the embedder is bidirectional, so `AutoModel`
    alone reproduces the embedder's attention.
    """
    cfg = read_embedder_config(folder, device="cpu")
    embedder = CaptionEmbedder.load(cfg)
    with atomic_dir(out) as tmp:
        embedder.model.save_pretrained(tmp)
        embedder.tokenizer.save_pretrained(tmp)
        embedder.save_config(tmp, model=".", adapters=[])
    return Path(out)
