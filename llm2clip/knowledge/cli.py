"""`llm2clip knowledge ...`: the Knowledge-CLIP recipe (arXiv 2412.03513) beside LLM2CLIP.

    concepts   k-means over the training captions' cached LLM embeddings (offline)
    train      CLIP fine-tuning with α·L_clip + β·L_emb + γ·L_concept
    eval       attribute probes, zero-shot attributes, CRA and retrieval vs CLIP and LLM2CLIP
    all        the three above; finished steps are reused (the main job's outputs must exist)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def _require_main_job(cfg) -> None:
    from ..cache import INDEX
    from ..errors import ConfigError
    from ..stage2.runs import pretrained_clip_folder

    if not (Path(cfg.cache.out) / INDEX).is_file():
        raise ConfigError(f"no embedding cache at {cfg.cache.out}. Fix: run the main job first "
                          "(bash scripts/train_llm2clip.sh), or `llm2clip cache build`")
    pretrained_clip_folder(cfg)  # raises with the fix when the pretrained CLIP is missing


def _run(args) -> int:
    from ..config import load_config
    from ..stage2.batches import MemoryBatches
    from ..stage2.runs import train_data
    from .evaluate import format_table, run_knowledge_eval
    from .train import model_is_current, run_concepts, run_knowledge_clip

    cfg = load_config(args.config, args.overrides)  # validated before any work
    progress = not args.no_progress
    kc = cfg.knowledge_clip
    _require_main_job(cfg)
    out, seconds, images = {}, {}, None
    start = time.perf_counter()
    if args.step in ("concepts", "all"):
        t0 = time.perf_counter()
        out["concepts"] = run_concepts(cfg, force=args.force)
        seconds["concepts"] = round(time.perf_counter() - t0, 1)
    if args.step in ("train", "all"):
        t0 = time.perf_counter()
        model_dir = Path(kc.train.out) / "model"
        if args.step == "train" or args.force or not model_is_current(cfg):
            # a finished model that is stale (or --force): its checkpoints are too; a killed run's resume
            if args.force or model_dir.is_dir():
                shutil.rmtree(Path(kc.train.out) / "checkpoints", ignore_errors=True)
            data = train_data(cfg, progress)
            out["train"] = run_knowledge_clip(cfg, data, progress)
            images = data.images if isinstance(data, MemoryBatches) else None  # decoded once, probed again
        else:
            out["train"] = {"reused": str(model_dir)}
        seconds["train"] = round(time.perf_counter() - t0, 1)
    if args.step in ("eval", "all"):
        t0 = time.perf_counter()
        results = run_knowledge_eval(cfg, progress, train_images=images)
        seconds["eval"] = round(time.perf_counter() - t0, 1)
        print(format_table(results))
        print(f"results: {kc.results}")
    seconds["total"] = round(time.perf_counter() - start, 1)
    out["seconds"] = seconds
    summary = Path(kc.train.out) / "run_summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(json.dumps(seconds))
    return 0


def add_parsers(groups, add_config_args) -> None:
    knowledge = groups.add_parser("knowledge", help="the Knowledge-CLIP recipe (LLM-distilled CLIP text encoder, "
                                  "k-means concepts)", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = knowledge.add_subparsers(dest="cmd", required=True)
    for name in ("concepts", "train", "eval", "all"):
        p = sub.add_parser(name)
        add_config_args(p)
        p.add_argument("--no-progress", action="store_true")
        if name != "eval":
            p.add_argument("--force", action="store_true", help="redo the step even if its output is current")
        p.set_defaults(func=_run, step=name, force=False)
