"""How much short↔long retrieval the words alone allow (a diagnostic for stage 1's short↔long CRA).

    python benchmarks/short_long_text_baseline.py [--data runs/tiny/data/val.jsonl] [--embedder FOLDER]
        [--fit-data runs/tiny/data/stage1_train.jsonl]

Every figure is scored as `llm2clip stage1 eval-cra` scores `short_long`: the mean of short→long and
long→short top-1 over the split, in %.
- `scene_matcher`: a reader that knows the world's grammar. It parses the short caption (each
  "[size] colour shape" it names, and the background if named), and picks uniformly among the split's
  scenes that fit (an object per mention, the background); long→short picks uniformly among the short
  captions that fit the scene. `attributes` is that rule; `attributes_and_salience` also asks the named
  objects to be the scene's most salient, in order, as the generator picks them (llm2clip/data/captions.py).
  Expected top-1, exact: 1 / (number of candidates that fit). The ceiling falls with the candidate
  count, so a split of 200 and one of 1,000 have different ceilings.
- `tfidf_*`: TF-IDF vectors (scikit-learn) of unigrams and of uni+bigrams, fitted on `--fit-data`'s
  short and long captions; `lsa_*_128`: the same projected to 128 dimensions (TruncatedSVD), the tiny
  LM's width: what a 128-wide linear summary of the words keeps.
- `short_to_long_by_position`: uni+bigram short→long top-1 by where the long caption first describes
  the short caption's first object (character offset; "not found" when worded otherwise).
With `--embedder` (a stage-1 folder) its CRA on the same captions is printed beside them. Prints JSON
(docs/STAGE1.md, tiny study).
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from llm2clip.data.world import BACKGROUNDS, COLORS, SHAPES, SIZES, Scene

BUCKETS = (("chars 0-299", 300), ("chars 300-599", 600), ("chars 600+", float("inf")))
MENTION = re.compile(rf"(?:({'|'.join(SIZES)}) )?({'|'.join(COLORS)}) ({'|'.join(SHAPES)})")
BACKGROUND = re.compile(rf"on (?:a )?({'|'.join(BACKGROUNDS)})(?: background)?$")


def parse_short(caption: str) -> tuple[list[tuple[str | None, str, str]], str | None]:
    """'a large red star on a white background' -> ([('large', 'red', 'star')], 'white')."""
    background = BACKGROUND.search(caption)
    return [(m[1], m[2], m[3]) for m in MENTION.finditer(caption)], background[1] if background else None


def fits(scene: Scene, mentions: list, background: str | None, salience: bool) -> bool:
    """Does `scene` fit a short caption's mentions (distinct objects) and background?"""
    if background and scene.background != background:
        return False
    objects = scene.by_salience()

    def same(o, mention) -> bool:
        size, color, shape = mention
        return (size is None or o.size == size) and o.color == color and o.shape == shape

    if salience:  # the named objects are the most salient, in that order
        return len(mentions) <= len(objects) and all(same(o, m) for o, m in zip(objects, mentions, strict=False))
    used: set[int] = set()
    for mention in mentions:  # at most two mentions: first fit is exact unless both name one object
        match = next((i for i, o in enumerate(objects) if i not in used and same(o, mention)), None)
        if match is None:
            return False
        used.add(match)
    return True


def scene_matcher(rows: list[dict], salience: bool = False) -> dict[str, float]:
    """Expected top-1 (%) of the uniform pick among fitting candidates, per direction and their mean."""
    scenes = [Scene.from_dict(r["attributes"]) for r in rows]
    parsed = [parse_short(r["short_caption"]) for r in rows]
    fit = torch.tensor([[fits(scene, *p, salience) for scene in scenes] for p in parsed])  # [short, scene]
    if not bool(fit.diagonal().all()):
        bad = [rows[i]["short_caption"] for i in (~fit.diagonal()).nonzero().flatten().tolist()[:3]]
        raise ValueError(f"the parser misreads short captions of their own scene: {bad}")
    short_to_long = (1 / fit.sum(1)).mean().item()
    long_to_short = (1 / fit.sum(0)).mean().item()
    return {"short_to_long": round(100 * short_to_long, 2), "long_to_short": round(100 * long_to_short, 2),
            "mean": round(50 * (short_to_long + long_to_short), 2)}


def read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main() -> None:
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    from llm2clip.stage1.cra import cross_set_accuracy

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="runs/tiny/data/val.jsonl")
    parser.add_argument("--fit-data", default=None, help="captions TF-IDF and LSA are fitted on (default: --data)")
    parser.add_argument("--embedder", default=None)
    args = parser.parse_args()
    rows = read_rows(args.data)
    fit_rows = read_rows(args.fit_data) if args.fit_data else rows
    shorts, longs = [r["short_caption"] for r in rows], [r["long_caption"] for r in rows]
    out = {"images": len(rows), "fitted_on": args.fit_data or args.data,
           "scene_matcher": {"attributes": scene_matcher(rows),
                             "attributes_and_salience": scene_matcher(rows, salience=True)}}
    corpus = [r["short_caption"] for r in fit_rows] + [r["long_caption"] for r in fit_rows]
    for name, ngrams in (("unigrams", (1, 1)), ("uni_bigrams", (1, 2))):
        vectorizer = TfidfVectorizer(ngram_range=ngrams).fit(corpus)
        sparse = [vectorizer.transform(x) for x in (shorts, longs)]
        s, lg = (torch.tensor(x.toarray(), dtype=torch.float32) for x in sparse)
        out[f"tfidf_{name}"] = round(cross_set_accuracy(s, lg), 2)
        if len(vectorizer.vocabulary_) > 128:
            svd = TruncatedSVD(128, random_state=0).fit(vectorizer.transform(corpus))
            out[f"lsa_{name}_128"] = round(cross_set_accuracy(
                *(torch.tensor(svd.transform(x), dtype=torch.float32) for x in sparse)), 2)
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
