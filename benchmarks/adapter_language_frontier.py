"""Why second-language R@1 stays low: the English-trained adapter against the LLM's own alignment.

    python benchmarks/adapter_language_frontier.py [--config configs/tiny.yaml] [--variants SPEC ...]

On a finished run (the main job's folders), with its LLM2CLIP vision tower frozen:
1. where English and Chinese vectors of the same caption differ: the share of the (centred, unit)
   translation difference that lies in the top-k principal directions of the English training
   vectors, against the share of English variance there;
2. a fresh text adapter (the run's shape, its centre) trained on the English training vectors
   against the frozen image features, once per variant, then R@1 (mean of I2T and T2I) on val and
   test for short, long and second-language captions (both Chinese fields, and each alone).

Variants are comma-separated key=value specs: `depth`, `steps`, `noise` (Gaussian noise added to the
adapter's unit input, as a norm), `pca` (keep the top-k English principal directions only), `seed`.
An empty spec is the run's recipe. A diagnostic, not a test: prints JSON; image and LLM features are
cached in <run>/bench/adapter_language_features.pt for reruns.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

ENGLISH = ("short_caption", "long_caption", "long_caption_2")
CHINESE = ("short_caption_zh", "long_caption_zh")
SETS = {"short": ["short_caption"], "long": ["long_caption", "long_caption_2"], "2nd": list(CHINESE),
        "2nd_short": ["short_caption_zh"], "2nd_long": ["long_caption_zh"]}


def split_features(cfg, model, text_side, path: str) -> dict:
    """{'images': [N, E] unit image features, field: [N, D] LLM vectors} for one split."""
    from llm2clip.stage2.data import Caption
    from llm2clip.stage2.runs import load_images

    images = load_images(cfg, path, progress=False)
    out = {}
    with torch.inference_mode():
        out["images"] = torch.cat([model.encode_image(images.pixels[i:i + 256])
                                   for i in range(0, len(images.keys), 256)])  # [N, E]
        for name in ENGLISH + CHINESE:
            out[name] = text_side(images.keys, [Caption(name, caps[name]) for caps in images.captions]).float()
    return out


def principal_shares(train: dict, center: torch.Tensor, ks=(8, 16, 32, 64)) -> dict:
    """Share of English variance vs of the en->zh difference inside the top-k English directions."""
    english = F.normalize(torch.cat([train[f] for f in ENGLISH]) - center, dim=-1)  # [3N, D], as the adapter reads
    basis = torch.linalg.svd(english, full_matrices=False)[2]  # [D, D], rows by falling variance
    variance = (english @ basis.T).pow(2).sum(0)  # [D]
    report = {}
    for en, zh in (("short_caption", "short_caption_zh"), ("long_caption", "long_caption_zh")):
        diff = F.normalize(train[zh] - center, dim=-1) - F.normalize(train[en] - center, dim=-1)  # [N, D]
        energy = (diff @ basis.T).pow(2).sum(0)  # [D]
        share = lambda x, k: round((x[:k].sum() / x.sum()).item(), 3)  # noqa: E731
        report[f"{en} -> {zh}"] = {f"top{k}": {"english_variance": share(variance, k),
                                               "translation_difference": share(energy, k)} for k in ks}
    return report


def train_adapter(train: dict, center: torch.Tensor, model, long_ratio: float, depth: int = 1, steps: int = 1000,
                  noise: float = 0.0, pca: int = 0, seed: int = 0, lr: float = 1e-3, batch: int = 128):
    """A fresh TextAdapter on frozen image features, CLIP loss at the run's logit scale; returns a
    function LLM vectors [B, D] -> unit text features [B, E]."""
    from llm2clip.model import TextAdapter

    torch.manual_seed(seed)
    dim, embed = train["short_caption"].shape[1], train["images"].shape[1]
    adapter = TextAdapter(dim, embed, depth, model.cfg.adapter_expansion)
    adapter.center.copy_(center)
    keep = None
    if pca:
        english = torch.cat([train[f] for f in ENGLISH]) - center
        basis = torch.linalg.svd(english, full_matrices=False)[2][:pca]  # [k, D]
        keep = basis.T @ basis  # [D, D] projector onto the top-k English directions

    def unit_input(vectors):
        x = vectors - center
        return F.normalize(x @ keep if keep is not None else x, dim=-1)  # [B, D]

    def features(vectors, train_noise: float = 0.0):
        x = unit_input(vectors)
        if train_noise:
            x = x + train_noise * torch.randn_like(x) / math.sqrt(x.shape[1])
        return F.normalize(adapter.proj(adapter.norm(adapter.blocks(x))), dim=-1)

    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scale, n = model.logit_scale.exp().item(), len(train["images"])
    labels = torch.arange(batch)
    for step in range(steps):
        for group in optimizer.param_groups:  # warmup then cosine, as stage 2
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randint(0, n, (batch,))
        long_rows = torch.rand(batch) < long_ratio
        second = torch.randint(0, 2, (batch,)).bool()
        longs = torch.where(second[:, None], train["long_caption_2"][rows], train["long_caption"][rows])
        vectors = torch.where(long_rows[:, None], longs, train["short_caption"][rows])  # [B, D]
        logits = scale * train["images"][rows] @ features(vectors, noise).T  # [B, B]
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    adapter.eval()
    return lambda vectors: features(vectors).detach()


def r1(encode, split: dict) -> dict:
    from llm2clip.eval import retrieval_metrics

    out = {}
    with torch.inference_mode():
        for name, fields in SETS.items():
            texts = torch.cat([encode(split[f]) for f in fields])  # [F*N, E]
            owner = torch.arange(len(split["images"])).repeat(len(fields))
            m = retrieval_metrics(split["images"], texts, owner)
            out[name] = round(50 * (m["image_retrieval_recall@1"] + m["text_retrieval_recall@1"]), 2)
    return out


def parse_variant(spec: str) -> dict:
    kinds = {"depth": int, "steps": int, "pca": int, "seed": int, "noise": float}
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"unknown variant key {key!r}; use {sorted(kinds)}")
        out[key] = kinds[key](value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variants", nargs="*",
                        default=["", "depth=0", "steps=3000", "noise=0.15", "noise=0.3", "steps=3000,noise=0.3",
                                 "pca=16", "pca=64"])
    args = parser.parse_args()

    from llm2clip.config import load_config
    from llm2clip.model import LLM2CLIP
    from llm2clip.stage2.evaluate import llm2clip_text_side
    from llm2clip.stage2.runs import model_folder

    cfg = load_config(args.config, args.overrides)
    model = LLM2CLIP.from_pretrained(model_folder(cfg.stage2.llm2clip)).eval()
    stored = Path(cfg.run.out_dir) / "bench" / "adapter_language_features.pt"
    if stored.is_file():
        splits = torch.load(stored, weights_only=True)
    else:
        text_side = llm2clip_text_side(cfg, model)
        data = Path(cfg.stage2.train_data).parent
        splits = {s: split_features(cfg, model, text_side, str(data / f"{s}.jsonl")) for s in ("train", "val", "test")}
        stored.parent.mkdir(parents=True, exist_ok=True)
        torch.save(splits, stored)
    center = model.text_adapter.center.float()
    report = {"principal_directions": principal_shares(splits["train"], center),
              "trained_adapter": {s: r1(lambda v: model.encode_text(v), splits[s]) for s in ("val", "test")},
              "variants": {}}
    for spec in args.variants:
        encode = train_adapter(splits["train"], center, model, cfg.stage2.llm2clip.long_caption_ratio,
                               **{"depth": cfg.stage2.model.adapter_depth, **parse_variant(spec)})
        report["variants"][spec or "recipe"] = {s: r1(encode, splits[s]) for s in ("val", "test")}
        print(spec or "recipe", report["variants"][spec or "recipe"], flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
