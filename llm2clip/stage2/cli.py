"""`llm2clip cache ...`, `llm2clip stage2 ...`, `llm2clip run` and `llm2clip export`.

    cache build      embed every caption of cache.data with the stage-1 embedder  -> cache.out
    cache verify     check the sha256 of every part of cache.out and its key index
    stage2 pretrain-clip | finetune-clip | train | eval | all
    run              the main job: data, stage 1, cache, stage 2, evaluation, export (reuses what exists)
    export           vision tower (HF CLIP vision folder) and whole model from a trained LLM2CLIP, and the
                     CLIP baseline's vision tower (clip_vision_tower/) when it was trained
    ablate online    LLM2CLIP trained on live LLM embeddings vs the cache, same steps and seed
    ablate parts     what each part adds (CC, adapter, centring, layer decay, caption mix), over seeds
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def _cfg(args):
    from ..config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    validate(cfg)
    return cfg


def _print(result) -> None:
    from ..distributed import world

    if world()[0] == 0:
        print(json.dumps(result, indent=1, default=str))


def _cache_build(args) -> int:
    from ..cache import build_cache
    from .runs import stage2_embedder_config

    cfg = _cfg(args)
    _print(build_cache(cfg.cache, stage2_embedder_config(cfg), cfg.data, force=args.force,
                       progress=not args.no_progress))
    return 0


def _cache_verify(args) -> int:
    from ..cache import EmbeddingCache

    cfg = _cfg(args)
    summary = EmbeddingCache.open(cfg.cache.out, verify=True).verify_all()  # DataError: a non-zero exit
    print(f"cache {cfg.cache.out}: ok ({summary['parts']} parts, {summary['keys']} keys, "
          f"{summary['bytes'] / 2**20:.1f} MiB checked)")
    return 0


def _stage2(args) -> int:
    from ..report import print_results
    from . import runs
    from .evaluate import run_eval

    cfg = _cfg(args)
    progress = not args.no_progress
    if args.step == "eval":
        # --results elsewhere (e.g. a variant run): leave the main run's results.json and plots alone
        path = Path(args.results) if args.results else Path(cfg.run.out_dir) / "results.json"
        result = run_eval(cfg, progress, plots=not args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print_results(result)
        return 0
    images = runs.train_data(cfg, progress)
    steps = {"pretrain-clip": runs.run_clip_pretrain, "finetune-clip": runs.run_clip_finetune,
             "train": runs.run_llm2clip}
    names = list(steps) if args.step == "all" else [args.step]
    if args.step == "all" and not cfg.stage2.clip_pretrain.enabled:
        names.remove("pretrain-clip")
    _print({name: steps[name](cfg, images, progress) for name in names})
    return 0


def _run(args) -> int:
    from ..pipeline import run_main

    run_main(_cfg(args), force=args.force, progress=not args.no_progress, count_flops=args.count_flops)
    return 0


def _export(args) -> int:
    from ..export import export_model, export_vision_tower
    from .runs import model_folder

    cfg = _cfg(args)
    source = args.model or model_folder(cfg.stage2.llm2clip)
    out = Path(args.out or cfg.run.out_dir)
    print(f"vision tower: {export_vision_tower(source, out / 'vision_tower')}")
    print(f"whole model:  {export_model(source, out / 'llm2clip')}")
    baseline = model_folder(cfg.stage2.clip_finetune)  # the CLIP baseline's tower, as `llm2clip run` writes it
    if (baseline / "config.json").is_file():
        print(f"CLIP baseline vision tower: {export_vision_tower(baseline, out / 'clip_vision_tower')}")
    else:
        print(f"CLIP baseline vision tower: not written ({baseline} holds no model; train it with "
              "`llm2clip stage2 finetune-clip`)")
    return 0


def _ablate_online(args) -> int:
    """Offline (cached) vs online (live LLM) LLM2CLIP, same recipe; reports R@1 per caption set."""
    from .ablate import stamp_run_dir
    from .evaluate import run_eval
    from .runs import run_llm2clip, train_data

    cfg = _cfg(args)
    progress = not args.no_progress
    images = train_data(cfg, progress)
    out = {}
    for mode in ("offline", "online"):
        run_dir = str(Path(cfg.run.out_dir) / "ablation" / mode)
        run_cfg = replace(cfg, stage2=replace(cfg.stage2, online=mode == "online",
                                              llm2clip=replace(cfg.stage2.llm2clip, out=run_dir)))
        stamp_run_dir(run_cfg, "llm2clip")  # an earlier setup's checkpoints are removed, not resumed
        train = run_llm2clip(run_cfg, images, progress)
        result = run_eval(run_cfg, progress=False, models=("llm2clip",), plots=False)
        out[mode] = {"train": train, "retrieval": result["retrieval"]["llm2clip"]}
    out["r1_gap_points"] = _gaps(out)
    path = Path(cfg.run.out_dir) / "ablation" / "online_vs_offline.json"
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    _print({"gaps": out["r1_gap_points"], "written": str(path)})
    return 0


def _ablate_parts(args) -> int:
    from .ablate import VARIANTS, ablate_parts

    variants = args.variants.split(",") if args.variants else list(VARIANTS)
    seeds = [int(s) for s in args.seeds.split(",")]
    _print(ablate_parts(args.config, args.overrides, variants, seeds, args.eval_data, progress=not args.no_progress))
    return 0


def _gaps(out: dict) -> dict:
    off, on = out["offline"]["retrieval"], out["online"]["retrieval"]
    return {f"{s}.{k}": round(abs(off[s][k] - on[s][k]), 2) for s in off if s in on for k in ("i2t_r1", "t2i_r1")}


def add_parsers(groups, add_config_args) -> None:
    def common(p, func, **defaults):
        add_config_args(p)
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=func, **defaults)
        return p

    cache = groups.add_parser("cache", help="the embedding cache").add_subparsers(dest="cmd", required=True)
    build = common(cache.add_parser("build", help="embed every caption once (resumable, rank-sharded)"),
                   _cache_build)
    build.add_argument("--force", action="store_true", help="rebuild even if a complete cache exists")
    common(cache.add_parser("verify", help="check every part and the key index against index.json"), _cache_verify)

    stage2 = groups.add_parser("stage2", help="CLIP training against the frozen LLM, and the CLIP baseline",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = stage2.add_subparsers(dest="cmd", required=True)
    for name in ("pretrain-clip", "finetune-clip", "train", "eval", "all"):
        step = common(sub.add_parser(name), _stage2, step=name, results=None)
        if name == "eval":
            step.add_argument("--results", help="write here instead of <run.out_dir>/results.json, no plots")

    run = common(groups.add_parser("run", help="the main job, end to end (reuses finished steps)"), _run)
    run.add_argument("--force", action="store_true", help="redo every step")
    run.add_argument("--count-flops", action="store_true",
                     help="record each step's FLOPs (torch.utils.flop_counter) in run_summary.json; slower")

    export = common(groups.add_parser("export", help="export a trained LLM2CLIP model"), _export)
    export.add_argument("--model", help="LLM2CLIP model folder (default: stage2.llm2clip.out/model)")
    export.add_argument("--out", help="parent folder of vision_tower/ and llm2clip/ (default: run.out_dir)")

    ablate = groups.add_parser("ablate", help="ablations").add_subparsers(dest="cmd", required=True)
    common(ablate.add_parser("online", help="offline (cached) vs online (live LLM) embeddings"), _ablate_online)
    parts = common(ablate.add_parser("parts", help="what each part adds, stage 2 retrained per variant and seed"),
                   _ablate_parts)
    parts.add_argument("--variants", help="comma-separated (default: all of llm2clip.stage2.ablate.VARIANTS)")
    parts.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parts.add_argument("--eval-data", help="caption file to evaluate on (default: val.jsonl beside data.path; "
                       "settings are chosen on val, never on test)")
