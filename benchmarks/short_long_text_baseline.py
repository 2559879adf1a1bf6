"""How much short↔long retrieval the words alone allow (a diagnostic for stage 1's short↔long CRA).

    python benchmarks/short_long_text_baseline.py [--data runs/tiny/data/val.jsonl] [--embedder FOLDER]

TF-IDF vectors (scikit-learn, fitted on the split's own short and long captions) of unigrams and of
uni+bigrams, scored as `llm2clip stage1 eval-cra` scores `short_long`: the mean of short→long and
long→short top-1 over the split, in %. `short_to_long_by_position`: uni+bigram short→long top-1 by
where the long caption first describes the short caption's first object (character offset; "not
found" when worded otherwise). With `--embedder` (a stage-1 folder) its CRA on the same captions is
printed beside them. Prints JSON (docs/STAGE1.md, tiny study).
"""

from __future__ import annotations

import argparse
import json
import re

import torch

BUCKETS = (("chars 0-299", 300), ("chars 300-599", 600), ("chars 600+", float("inf")))


def main() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    from llm2clip.stage1.cra import cross_set_accuracy

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="runs/tiny/data/val.jsonl")
    parser.add_argument("--embedder", default=None)
    args = parser.parse_args()
    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    shorts, longs = [r["short_caption"] for r in rows], [r["long_caption"] for r in rows]
    out = {"images": len(rows)}
    for name, ngrams in (("tfidf_unigrams", (1, 1)), ("tfidf_uni_bigrams", (1, 2))):
        vectorizer = TfidfVectorizer(ngram_range=ngrams).fit(shorts + longs)
        s, lg = (torch.tensor(vectorizer.transform(x).toarray(), dtype=torch.float32) for x in (shorts, longs))
        out[name] = round(cross_set_accuracy(s, lg), 2)
    hits = (s @ lg.T).argmax(1) == torch.arange(len(rows))  # uni+bigrams, short -> long
    buckets: dict[str, list[bool]] = {}
    for short, long, hit in zip(shorts, longs, hits.tolist(), strict=True):
        first = re.match(r"an? (\w+) (\w+) (\w+)", short)
        found = first and re.search(rf"{first[1]} (\w+ )?(\w+ )?{first[2]} {first[3]}", long)
        bucket = "not found" if not found else next(b for b, end in BUCKETS if found.start() < end)
        buckets.setdefault(bucket, []).append(hit)
    out["short_to_long_by_position"] = {b: {"images": len(v), "top1": round(100 * sum(v) / len(v), 1)}
                                        for b, v in sorted(buckets.items())}
    if args.embedder:
        from llm2clip.embedder import CaptionEmbedder

        embedder = CaptionEmbedder.from_pretrained(args.embedder)
        out["embedder"] = round(cross_set_accuracy(embedder.encode(shorts), embedder.encode(longs)), 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
