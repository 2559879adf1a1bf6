"""`llm2clip stage1 ...` subcommands, driven by the config system.

    pretrain-lm   tiny world only: pretrain a causal LM on the corpus   -> stage1.pretrain.out
    mntp          masked next-token prediction LoRA                      -> stage1.mntp.out
    cc            caption-contrastive LoRA/QLoRA fine-tuning            -> stage1.cc.out
    eval-cra      CRA of the raw LLM and of the CC embedder              -> stage1.cra_out (cra.json)
    merge         adapters merged into a standard HF folder             -> --out
    all           the enabled steps in order
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def _cc_base(cfg):
    """The embedder CC starts from: the configured one plus the MNTP adapter when MNTP is enabled."""
    adapters = list(cfg.embedder.adapters) + ([cfg.stage1.mntp.out] if cfg.stage1.mntp.enabled else [])
    return replace(cfg.embedder, adapters=adapters)


def run_pretrain(cfg, progress=True) -> dict:
    from .pretrain_lm import pretrain_lm

    return pretrain_lm(cfg.stage1.pretrain, seed=cfg.run.seed, progress=progress)


def run_mntp(cfg, progress=True) -> dict:
    from .mntp import train_mntp

    return train_mntp(cfg.stage1.mntp, cfg.embedder, seed=cfg.run.seed, progress=progress)


def run_cc(cfg, progress=True) -> dict:
    from .cc import train_cc

    return train_cc(cfg.stage1.cc, _cc_base(cfg), seed=cfg.run.seed, progress=progress, data_cfg=cfg.data)


def run_eval_cra(cfg, progress=True) -> dict:
    from ..embedder import CaptionEmbedder
    from ..errors import ConfigError
    from .cra import collect_views, evaluate_cra

    s1 = cfg.stage1
    if s1.cra_data is None:
        raise ConfigError("stage1.cra_data is null, so there is nothing to evaluate. Fix: point it at a caption "
                          "file with two or more captions per image")
    views, info = collect_views(s1.cra_data, cfg.data, s1.cra_caption_keys, s1.cra_second_language_key)
    raw = evaluate_cra(CaptionEmbedder.load(replace(cfg.embedder, adapters=[])), views, progress)
    cc = evaluate_cra(CaptionEmbedder.from_pretrained(s1.cc.out, device=cfg.embedder.device), views, progress)
    result = {"raw": raw, "cc": cc, **info, "data": s1.cra_data}
    Path(s1.cra_out).parent.mkdir(parents=True, exist_ok=True)
    Path(s1.cra_out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_all(cfg, progress=True) -> dict:
    out = {}
    if cfg.stage1.pretrain.enabled:
        out["pretrain"] = run_pretrain(cfg, progress)
    if cfg.stage1.mntp.enabled:
        out["mntp"] = run_mntp(cfg, progress)
    out["cc"] = run_cc(cfg, progress)
    out["cra"] = run_eval_cra(cfg, progress) if cfg.stage1.cra_data is not None else "skipped (stage1.cra_data: null)"
    return out


COMMANDS = {"pretrain-lm": run_pretrain, "mntp": run_mntp, "cc": run_cc, "eval-cra": run_eval_cra,
            "all": run_all}


def add_parser(groups, add_config_args) -> None:
    stage1 = groups.add_parser("stage1", help="LLM -> caption embedder", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = stage1.add_subparsers(dest="cmd", required=True)
    for name in COMMANDS:
        p = sub.add_parser(name)
        add_config_args(p)
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(func=_run, step=name)
    merge = sub.add_parser("merge", help="merge adapters into a standard HF folder")
    add_config_args(merge)
    merge.add_argument("--embedder", help="embedder folder (default: stage1.cc.out)")
    merge.add_argument("--out", help="default: <run.out_dir>/stage1/merged")
    merge.set_defaults(func=_merge)


def _run(args) -> int:
    from ..config import load_config
    from ..distributed import world

    cfg = load_config(args.config, args.overrides)
    result = COMMANDS[args.step](cfg, progress=not args.no_progress)
    if world()[0] == 0:
        print(json.dumps(result, indent=1))
    return 0


def _merge(args) -> int:
    from ..config import load_config
    from .merge import merge_embedder

    cfg = load_config(args.config, args.overrides)
    out = merge_embedder(args.embedder or cfg.stage1.cc.out, args.out or f"{cfg.run.out_dir}/stage1/merged")
    print(f"merged embedder written to {out}")
    return 0
