"""`llm2clip eval`: score model folders on standard benchmarks by local path (docs/EVALUATION.md).

    llm2clip eval --model FOLDER [--model FOLDER ...] --dataset NAME [--dataset NAME ...]
                  --data-root PATH [--output results.json]

Several datasets take one --data-root each, in order, or one template such as 'data/{dataset}'
(CLIP_benchmark's convention; '{dataset_cleaned}' replaces '/' with '-').
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ConfigError

MULTILINGUAL = ("xm3600", "crossmodal3600")  # the sets --language picks from


def data_roots(datasets: list[str], roots: list[str]) -> list[str]:
    if len(roots) == len(datasets):
        return [r.format(dataset=d, dataset_cleaned=d.replace("/", "-")) for r, d in zip(roots, datasets, strict=True)]
    if len(roots) == 1:
        if len(datasets) > 1 and "{dataset" not in roots[0]:
            raise ConfigError(f"{len(datasets)} datasets share one --data-root. Fix: give one --data-root per "
                              "--dataset, in order, or a template such as 'data/{dataset}'")
        return [roots[0].format(dataset=d, dataset_cleaned=d.replace("/", "-")) for d in datasets]
    raise ConfigError(f"{len(datasets)} --dataset but {len(roots)} --data-root. Fix: one --data-root per --dataset, "
                      "or one template such as 'data/{dataset}'")


def model_labels(folders: list[str]) -> list[str]:
    """The shortest path tails that tell the folders apart: 'llm2clip/model', 'clip_finetune/model', ..."""
    parts = [Path(f).resolve().parts for f in folders]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(Path(f).resolve()) for f in folders]


def parse_options(pairs: list[str]) -> dict:
    """--option KEY=VALUE (e.g. captions=all for XM3600, limit=0 for all of ShareGPT4V); ints stay ints."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option '{pair}' is not KEY=VALUE. Fix: e.g. --option captions=all")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def run_benchmarks(args: argparse.Namespace) -> list[dict]:
    from ..embedder import resolve_device
    from ..precision import bf16_autocast
    from .base import open_dataset
    from .models import load_eval_model
    from .protocols import EvalOptions, evaluate_set
    from .report import language_means, records_for

    options = EvalOptions(batch_size=args.batch_size, recall_k=tuple(args.recall_k), strict=args.strict,
                          progress=not args.no_progress)
    languages = args.language.split(",") if args.language else None
    # every dataset's layout is checked before any model is loaded: a typo fails in seconds
    sets = []
    for name, root in zip(args.dataset, data_roots(args.dataset, args.data_root), strict=True):
        extra = {"split": args.split} if args.split else {}
        extra.update(parse_options(args.option))
        if languages and name in MULTILINGUAL:
            extra["languages"] = languages
        sets += open_dataset(name, root, strict=args.strict, **extra)
    device = resolve_device(args.device)
    records = []
    for folder, label in zip(args.model, model_labels(args.model), strict=True):
        model = load_eval_model(folder, embedder=args.embedder, device=device, text_cache=args.text_cache,
                                batch_size=args.batch_size, instruction=args.instruction)
        model.name = label
        with bf16_autocast(device):
            for evalset in sets:
                records += records_for(model, evalset, evaluate_set(model, evalset, options))
                if evalset.stats.skipped and not args.no_progress:
                    print(f"{evalset.name}: {evalset.stats.summary()}", file=sys.stderr)
    return records + language_means(records)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .report import text_table, write_records

    records = run_benchmarks(args)
    print(text_table(records))
    if args.output:
        for path in write_records(records, args.output):
            print(f"wrote {path}")
    return 0


def add_parser(groups) -> None:
    p = groups.add_parser("eval", help="score model folders on standard benchmarks (retrieval, classification)",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="FOLDER",
                   help="an LLM2CLIP, Knowledge-CLIP, HF CLIP or SigLIP folder (repeatable)")
    p.add_argument("--embedder", help="the stage-1 caption embedder for LLM2CLIP folders (default: the one the "
                                      "folder records; required for converted released checkpoints)")
    p.add_argument("--instruction", help="the LLM's caption instruction for LLM2CLIP folders (default: the one the "
                                         "model was trained with; '' for none, as the released checkpoints use)")
    p.add_argument("--dataset", action="append", required=True, metavar="NAME",
                   help="flickr30k, mscoco_captions, wds/<name>, urban1k, docci, sharegpt4v, dci, xm3600, "
                        "flickr30k-cn, coco-cn, imagenet1k, imagefolder, shapes (repeatable)")
    p.add_argument("--data-root", action="append", required=True, metavar="PATH")
    p.add_argument("--split", help="the dataset's split (each dataset has its standard default)")
    p.add_argument("--language", help="comma-separated languages for multilingual sets (xm3600), default all")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a dataset reader option, e.g. captions=all (XM3600), limit=0 (ShareGPT4V: all entries)")
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--text-cache", help="folder for cached LLM caption vectors (default: none)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of counting it")
    p.add_argument("--output", help="results JSON (CLIP_benchmark records; .md and .csv tables beside it), or a "
                                    "template like '{dataset}_{pretrained}_{model}_{language}_{task}.json'")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)
