"""The shapes world's long-caption premise, measured (a diagnostic): how much of each long caption's
detail lies past CLIP's 77-token window.

    python benchmarks/world_premises.py [--data runs/tiny/data/val.jsonl] [--tokenizer runs/tiny/data/tokenizer]

Per object of each scene: is its "<colour> <shape>" named inside the first 75 text tokens (77 with
BOS/EOS) of the first long caption? Prints JSON (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    from transformers import AutoTokenizer

    from llm2clip.data.world import Scene

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="runs/tiny/data/val.jsonl")
    parser.add_argument("--tokenizer", default="runs/tiny/data/tokenizer")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    objects = past = every_one_inside = 0
    for row in rows:
        scene = Scene.from_dict(row["attributes"])
        head = tokenizer.decode(tokenizer(row["long_caption"], add_special_tokens=False)["input_ids"][:75])
        missing = [o for o in scene.objects if f"{o.color} {o.shape}" not in head]
        objects, past = objects + len(scene.objects), past + len(missing)
        every_one_inside += not missing
    print(json.dumps({"images": len(rows), "objects": objects, "objects_first_named_past_77_tokens_pct":
                      round(100 * past / objects, 1), "captions_naming_every_object_inside_pct":
                      round(100 * every_one_inside / len(rows), 1)}))


if __name__ == "__main__":
    main()
