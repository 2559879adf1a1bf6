"""Time `llm2clip data synth` and measure caption lengths with the trained tokenizer.

    python benchmarks/bench_synth.py [--num-images 2000] [--image-size 64]

Writes runs/bench/synth.json. Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from llm2clip.data.synth import SynthConfig, synthesize


def caption_stats(root: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    rows = [json.loads(line) for split in ("train", "val", "test")
            for line in (root / f"{split}.jsonl").read_text().splitlines()]
    out = {}
    for column in ("short_caption", "long_caption", "long_caption_2", "short_caption_zh", "long_caption_zh"):
        lengths = [len(tok(r[column], add_special_tokens=False)["input_ids"]) for r in rows]
        out[column] = {"mean_tokens": round(statistics.mean(lengths), 1), "min": min(lengths),
                       "max": max(lengths), "frac_over_77": round(sum(n > 77 for n in lengths) / len(lengths), 3),
                       "frac_under_20": round(sum(n < 20 for n in lengths) / len(lengths), 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--out", default="runs/bench/synth.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthesize(SynthConfig(num_images=args.num_images, image_size=args.image_size), Path(tmp) / "d",
                   progress=False)
        seconds = time.perf_counter() - start
        result = {"num_images": args.num_images, "image_size": args.image_size, "seconds": round(seconds, 2),
                  "images_per_second": round(args.num_images / seconds, 1),
                  "captions": caption_stats(Path(tmp) / "d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
