"""The LLaVA towers over seeds: VQA per tower and seed, its spread, and the paired margin.

    python benchmarks/vqa_seeds.py runs/vqa_study

Reads DIR/<tower>_s<seed>/llava-<tower>-finetune/vqa_predictions.json, as `python -m llava_integration
eval --model_path ...` writes them (the commands are in docs/LLAVA.md), and scores them again: overall
is exact match over all questions, per type over that type's. Per tower: mean, min-max and sample std
over seeds. Paired by seed (same seed = same projector initialisation and data order for both towers):
the differences, their mean, and a paired t-test. Prints JSON; not a test.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

TYPES = ("color", "count", "position", "existence")


def score(predictions: list[dict]) -> dict[str, float]:
    per_type = defaultdict(list)
    for p in predictions:
        per_type[p["type"]].append(bool(p["correct"]))
    out = {"overall": 100 * sum(map(sum, per_type.values())) / sum(map(len, per_type.values()))}
    out.update({t: 100 * sum(per_type[t]) / len(per_type[t]) for t in TYPES if per_type[t]})
    return {k: round(v, 2) for k, v in out.items()}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 2), "min": min(values), "max": max(values),
            "range": round(max(values) - min(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--towers", default="llm2clip,clip", help="first minus second in the paired margin")
    args = parser.parse_args()

    first, second = args.towers.split(",")
    scores: dict[str, dict[int, dict]] = {first: {}, second: {}}
    for path in sorted(args.folder.glob("*_s*/llava-*-finetune/vqa_predictions.json")):
        match = re.fullmatch(r"(.+)_s(\d+)", path.parent.parent.name)
        if match and match[1] in scores:
            scores[match[1]][int(match[2])] = score(json.loads(path.read_text()))
    paired = sorted(set(scores[first]) & set(scores[second]))
    if len(paired) < 2:
        raise SystemExit(f"{args.folder}: fewer than 2 seeds with both towers evaluated ({paired})")

    report = {"seeds": paired, "per_seed": {t: {s: scores[t][s] for s in paired} for t in scores}}
    report["towers"] = {t: {k: spread([scores[t][s][k] for s in paired]) for k in ("overall", *TYPES)}
                        for t in scores}
    diffs = [round(scores[first][s]["overall"] - scores[second][s]["overall"], 2) for s in paired]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    from scipy.stats import ttest_rel

    test = ttest_rel([scores[first][s]["overall"] for s in paired], [scores[second][s]["overall"] for s in paired],
                     alternative="greater")
    widest = max(report["towers"][t]["overall"]["range"] for t in scores)
    report["paired"] = {
        "differences": diffs, "mean": round(mean, 2), "std": round(sd, 2),
        "t": round(float(test.statistic), 2), "p_one_sided": round(float(test.pvalue), 4),
        "wins": sum(d > 0 for d in diffs),
        "margin_beyond_widest_range": mean > widest,
        "margin_beyond_each_std": all(mean > report["towers"][t]["overall"]["std"] for t in scores),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
