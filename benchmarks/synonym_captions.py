"""Retrieval with captions in words no training pair uses (a diagnostic): every world word that has an
English synonym (llm2clip.data.lexicon.SYNONYM_EN: 'scarlet' for red, 'big' for large, ...) is swapped.

    python benchmarks/synonym_captions.py [--config configs/tiny.yaml] [--set run.out_dir=runs/tiny] [--split val]

Stage 2 and CC train on the world's own words only, so a model reads the synonyms only if its text side
learned them elsewhere: the LLM from its corpus when the run's data was written with `synth.synonyms` > 0,
the CLIP text tower never. Writes <data>/<split>_synonyms.jsonl (the split with its short and long
captions rewritten), evaluates the fine-tuned CLIP and LLM2CLIP on both files with the live LLM (online:
the cache holds the original captions' vectors under the same keys) and prints JSON: R@1 (mean of I2T
and T2I) per model and caption set, original and with synonyms, and how many synonyms the run's
tokenizer holds as one token (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rewrite_split(src: Path, dst: Path, fields: list[str]) -> int:
    """dst: src's rows with every field in `fields` synonymized (images stay relative to the same folder)."""
    from llm2clip.data.lexicon import synonymize

    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row in rows:
        row.update({f: synonymize(row[f]) for f in fields if f in row})
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def r_at_1(retrieval: dict) -> dict[str, float]:
    """{caption set: mean of image->text and text->image R@1} from one model's evaluate_retrieval block."""
    return {name: round((block["i2t_r1"] + block["t2i_r1"]) / 2, 2) for name, block in retrieval.items()}


def main() -> None:
    from transformers import AutoTokenizer

    from llm2clip.config import load_config
    from llm2clip.data.lexicon import SYNONYM_EN
    from llm2clip.stage2.evaluate import run_eval

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    cfg = load_config(args.config, [*args.overrides, "stage2.online=true"])
    data = Path(cfg.run.out_dir) / "data"
    original, rewritten = data / f"{args.split}.jsonl", data / f"{args.split}_synonyms.jsonl"
    images = rewrite_split(original, rewritten, [cfg.data.short_caption_key, *cfg.data.long_caption_keys])

    report = {"run": cfg.run.out_dir, "split": args.split, "images": images}
    for label, path in (("original", original), ("synonyms", rewritten)):
        cfg.stage2.eval_data = str(path)
        retrieval = run_eval(cfg, progress=False, models=("clip_finetuned", "llm2clip"), plots=False)["retrieval"]
        for model, block in retrieval.items():
            report.setdefault(model, {})[label] = r_at_1(block)
    tokenizer = AutoTokenizer.from_pretrained(data / "tokenizer")
    report["synonyms_one_token"] = sum(len(tokenizer(f" {s}", add_special_tokens=False)["input_ids"]) == 1
                                       for s in SYNONYM_EN.values())
    report["synonyms"] = len(SYNONYM_EN)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
