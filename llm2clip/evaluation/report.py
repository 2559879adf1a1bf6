"""Benchmark results as CLIP_benchmark records, and as one table (terminal, markdown, CSV).

A record is what CLIP_benchmark's `eval` dumps per (dataset, model, language, task): `dataset`,
`model`, `pretrained`, `task`, `metrics` (its keys: `image_retrieval_recall@k` is text->image,
`text_retrieval_recall@k` image->text; `acc1`, `acc5`, `mean_per_class_recall`; fractions), `language`.
We add `samples` (read / skipped counts), which its readers ignore.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..files import atomic_write_text
from .base import CLASSIFICATION, EvalSet

# the columns of the combined table: (heading, metric key), per task
COLUMNS = {
    "zeroshot_retrieval": [("I2T R@1", "text_retrieval_recall@1"), ("T2I R@1", "image_retrieval_recall@1"),
                           ("I2T R@5", "text_retrieval_recall@5"), ("T2I R@5", "image_retrieval_recall@5")],
    CLASSIFICATION: [("top-1", "acc1"), ("top-5", "acc5"), ("mean/class", "mean_per_class_recall")],
}


def records_for(model, evalset: EvalSet, result: dict[str, dict[str, float]]) -> list[dict]:
    """result: {"": metrics} plus {"1k": metrics} for COCO's fold mean (dataset '<name>_1k')."""
    samples = {"read": evalset.stats.read, "skipped": evalset.stats.skipped, **dict(evalset.stats.counts)}
    return [{"dataset": evalset.name + (f"_{part}" if part else ""), "model": model.name,
             "pretrained": str(model.pretrained), "task": evalset.task, "metrics": metrics,
             "language": evalset.language, "samples": samples} for part, metrics in result.items()]


def language_means(records: list[dict]) -> list[dict]:
    """For a dataset scored in several languages (XM3600), one more record per model: language 'mean'."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["model"], r["pretrained"], r["task"]), []).append(r)
    out = []
    for (dataset, model, pretrained, task), rows in groups.items():
        if len({r["language"] for r in rows}) < 2:
            continue
        keys = set.intersection(*(set(r["metrics"]) for r in rows))
        metrics = {k: sum(r["metrics"][k] for r in rows) / len(rows) for k in sorted(keys)}
        out.append({"dataset": dataset, "model": model, "pretrained": pretrained, "task": task,
                    "metrics": metrics, "language": "mean", "samples": {"languages": len(rows)}})
    return out


def _slug(text: str) -> str:
    return text.strip("/").replace("/", "_")


def write_records(records: list[dict], output: str) -> list[Path]:
    """`output` with '{...}' fields is CLIP_benchmark's template: one JSON file per record, e.g.
    '{dataset}_{pretrained}_{model}_{language}_{task}.json'. Otherwise one JSON list at `output`, with
    the table beside it as .md and .csv. Every file is written atomically."""
    if "{" in output:
        paths = []
        for r in records:
            path = Path(output.format(dataset=_slug(r["dataset"]), pretrained=_slug(r["pretrained"]),
                                      model=_slug(r["model"]), language=r["language"], task=r["task"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(r, indent=1) + "\n")
            paths.append(path)
        return paths
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    atomic_write_text(path.with_suffix(".md"), markdown_table(records) + "\n")
    atomic_write_text(path.with_suffix(".csv"), csv_table(records))
    return [path, path.with_suffix(".md"), path.with_suffix(".csv")]


def _rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per (dataset, language, model): its task's columns in percent."""
    headings = ["dataset", "language", "model"]
    for task in COLUMNS:
        headings += [h for h, _ in COLUMNS[task] if h not in headings]
    rows = []
    for r in records:
        cells = {h: f"{100 * r['metrics'][k]:.2f}" for h, k in COLUMNS.get(r["task"], []) if k in r["metrics"]}
        rows.append([r["dataset"], r["language"], r["model"], *[cells.get(h, "") for h in headings[3:]]])
    used = [i for i, h in enumerate(headings) if i < 3 or any(row[i] for row in rows)]
    return [headings[i] for i in used], [[row[i] for i in used] for row in rows]


def text_table(records: list[dict]) -> str:
    headings, rows = _rows(records)
    widths = [max(len(x) for x in col) for col in zip(headings, *rows, strict=True)]
    line = "  ".join
    return "\n".join([line(h.ljust(w) for h, w in zip(headings, widths, strict=True)).rstrip(),
                      line("-" * w for w in widths),
                      *(line(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)])


def markdown_table(records: list[dict]) -> str:
    headings, rows = _rows(records)
    return "\n".join(["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def csv_table(records: list[dict]) -> str:
    """Every metric of every record, one row each (fractions, as in the JSON)."""
    keys = sorted({k for r in records for k in r["metrics"]})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["dataset", "language", "model", "pretrained", "task", *keys])
    for r in records:
        writer.writerow([r["dataset"], r["language"], r["model"], r["pretrained"], r["task"],
                         *(f"{r['metrics'][k]:.6f}" if k in r["metrics"] else "" for k in keys)])
    return buffer.getvalue()
