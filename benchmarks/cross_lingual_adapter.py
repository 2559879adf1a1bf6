"""How much English<->second-language alignment survives LLM2CLIP's text adapter (a diagnostic, not a test).

    python benchmarks/cross_lingual_adapter.py [--config configs/tiny.yaml] [--set key=value ...]

On the test split of a finished run: top-1 retrieval from each English caption to its translation
among all test translations, on the raw LLM vectors, after centring (on the adapter's English centre,
and on each language's own mean: is the miss a language offset?), and after the trained adapter;
plus the mean cosine of translation pairs against unrelated pairs, and the distance between the two
languages' mean unit vectors. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def alignment(a: torch.Tensor, b: torch.Tensor) -> dict:
    """a, b [N, D], row i of each captions image i -> top-1 a->b (%), mean cosine of pairs and of all."""
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T  # [N, N]
    hits = (sim.argmax(1) == torch.arange(len(a))).float().mean().item()
    return {"top1": round(100 * hits, 1), "pair_cos": round(sim.diag().mean().item(), 3),
            "all_cos": round(sim.mean().item(), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    from llm2clip.config import load_config
    from llm2clip.model import LLM2CLIP
    from llm2clip.stage2.data import Caption
    from llm2clip.stage2.evaluate import llm2clip_text_side
    from llm2clip.stage2.runs import load_images, model_folder

    cfg = load_config(args.config, args.overrides)
    model = LLM2CLIP.from_pretrained(model_folder(cfg.stage2.llm2clip)).eval()
    images = load_images(cfg, cfg.stage2.eval_data, progress=False)
    text_side = llm2clip_text_side(cfg, model)
    english = [cfg.data.short_caption_key, cfg.data.long_caption_keys[0]]
    report = {}
    with torch.inference_mode():
        for en, other in zip(english, cfg.stage2.second_language_fields, strict=False):
            keys = [k for k, caps in zip(images.keys, images.captions, strict=True) if en in caps and other in caps]
            caps = {k: c for k, c in zip(images.keys, images.captions, strict=True)}
            a = text_side(keys, [Caption(en, caps[k][en]) for k in keys])  # [N, D]
            b = text_side(keys, [Caption(other, caps[k][other]) for k in keys])
            center = model.text_adapter.center
            offset = F.normalize(a.float(), dim=-1).mean(0) - F.normalize(b.float(), dim=-1).mean(0)  # [D]
            report[f"{en} -> {other}"] = {
                "images": len(keys), "raw": alignment(a, b), "centred": alignment(a - center, b - center),
                "centred_per_language": alignment(a - a.mean(0), b - b.mean(0)),
                "language_offset": round(offset.norm().item(), 4),
                "after_adapter": alignment(model.encode_text(a), model.encode_text(b))}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
