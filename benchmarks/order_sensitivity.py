"""How much a caption embedder depends on sentence order (issue #20, docs/STAGE1.md part 5).

    python benchmarks/order_sensitivity.py --data runs/tiny/data/val.jsonl NAME=CC_FOLDER [NAME=CC_FOLDER ...]

Per embedder, over the split's first `--images` rows: each long caption against the same sentences
in a shuffled order (top-1 among all images' shuffled captions, and the mean cosine), against its
paraphrase (`long_caption_2`), the mean cosine between different images' captions (how crowded the
space is), and short->long top-1. Paraphrases and the short caption's object move through a long
caption, so an embedder that ignores order where order carries nothing matches them more easily.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F


def shuffled(text: str, rng: random.Random) -> str:
    sentences = [s.strip().rstrip(".") for s in text.split(". ") if s.strip()]
    rng.shuffle(sentences)
    return ". ".join(sentences) + "."


def top1(queries: torch.Tensor, keys: torch.Tensor) -> float:
    """Unit rows: % of queries whose nearest key is their own row."""
    return 100.0 * ((queries @ keys.T).argmax(1) == torch.arange(len(queries))).float().mean().item()


def main() -> None:
    from llm2clip.embedder import CaptionEmbedder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/tiny/data/val.jsonl")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("embedders", nargs="+", help="NAME=FOLDER of a CC embedder (or any embedder folder)")
    args = parser.parse_args()

    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(args.images), strict=False)]
    rng = random.Random(0)
    texts = {"long": [r["long_caption"] for r in rows], "paraphrase": [r["long_caption_2"] for r in rows],
             "short": [r["short_caption"] for r in rows]}
    texts["shuffled"] = [shuffled(t, rng) for t in texts["long"]]
    n = len(rows)
    for spec in args.embedders:
        name, folder = spec.split("=", 1)
        embedder = CaptionEmbedder.from_pretrained(folder, device="cpu")
        v = {k: F.normalize(embedder.encode(t).float(), dim=-1) for k, t in texts.items()}  # [N, D] each
        sim = v["long"] @ v["paraphrase"].T  # [N, N]
        print(json.dumps({
            "embedder": name,
            "shuffled_top1": round(top1(v["long"], v["shuffled"]), 2),
            "shuffled_cos": round((v["long"] * v["shuffled"]).sum(1).mean().item(), 4),
            "paraphrase_top1": round(top1(v["long"], v["paraphrase"]), 2),
            "other_images_cos": round(((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))).item(), 4),
            "short_to_long_top1": round(top1(v["short"], v["long"]), 2)}), flush=True)


if __name__ == "__main__":
    main()
