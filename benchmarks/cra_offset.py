"""How much of a caption embedder's cross-set CRA an offset between the two sets hides (a diagnostic).

    python benchmarks/cra_offset.py EMBEDDER_FOLDER [...] [--data runs/tiny/data/val.jsonl] [--config configs/tiny.yaml]

For the `short_long` and `cross_lingual` CRA views: CRA as reported, CRA after centring each set on its
own mean, the mean cosine within the first set and across the sets, and the largest hub (how many
queries share one nearest neighbour). Prints one JSON line per embedder and view (docs/STAGE1.md).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def offset_report(a: torch.Tensor, b: torch.Tensor) -> dict:
    """a, b [N, D], row i of each captions image i."""
    from llm2clip.stage1.cra import cross_set_accuracy

    na, nb = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    hits = (na @ nb.T).argmax(1)
    return {"cra": round(cross_set_accuracy(a, b), 1),
            "cra_centred": round(cross_set_accuracy(a - a.mean(0), b - b.mean(0)), 1),
            "cos_within": round((na @ na.T).mean().item(), 2), "cos_across": round((na @ nb.T).mean().item(), 2),
            "largest_hub": int(torch.bincount(hits, minlength=len(b)).max()), "queries": len(a)}


def main() -> None:
    from llm2clip.config import load_config
    from llm2clip.embedder import CaptionEmbedder
    from llm2clip.stage1.cra import collect_views

    parser = argparse.ArgumentParser()
    parser.add_argument("embedders", nargs="+", help="CC embedder folders (stage1.cc.out)")
    parser.add_argument("--data", default="runs/tiny/data/val.jsonl")
    parser.add_argument("--config", default="configs/tiny.yaml")
    args = parser.parse_args()
    views, _ = collect_views(args.data, load_config(args.config).data)
    for folder in args.embedders:
        emb = CaptionEmbedder.from_pretrained(folder)
        for name in ("short_long", "cross_lingual"):
            a, b = (emb.encode(texts) for texts in views[name])
            print(json.dumps({"embedder": folder, "view": name, **offset_report(a, b)}))


if __name__ == "__main__":
    main()
