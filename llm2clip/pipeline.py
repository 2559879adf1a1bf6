"""The main job: data -> stage 1 -> cache -> CLIP baseline -> LLM2CLIP -> evaluation -> export.

Each step is skipped when its output already exists and is current (a stage-1 embedder the cache and
the LLM2CLIP model were built from, a config the dataset was made with), unless `force`.

    <run.out_dir>/results.json     CRA, retrieval per model and caption set, wall time
    <run.out_dir>/plots/           training_curves.png, top5_long_captions.png
    <run.out_dir>/vision_tower/    standard HF CLIP vision folder (LLaVA-ready)
    <run.out_dir>/llm2clip/        the whole model
    <run.out_dir>/clip_vision_tower/  the fine-tuned CLIP baseline's vision encoder, same format
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .errors import ConfigError


def _log(msg: str) -> None:
    print(f"== {msg}", flush=True)


def _stage1(cfg, force: bool, progress: bool) -> dict:
    from .stage1 import cli as s1

    out = {}
    if cfg.stage1.pretrain.enabled and (force or not (Path(cfg.stage1.pretrain.out) / "config.json").is_file()):
        _log("stage 1: pretrain the tiny LM")
        out["pretrain"] = s1.run_pretrain(cfg, progress)
    if cfg.stage1.mntp.enabled and (force or not (Path(cfg.stage1.mntp.out) / "adapter_config.json").is_file()):
        _log("stage 1: MNTP")
        out["mntp"] = s1.run_mntp(cfg, progress)
    if force or out or not (Path(cfg.stage1.cc.out) / "embedder_config.json").is_file():
        _log("stage 1: caption-contrastive fine-tuning")
        if force or out:  # a new LM (or --force): checkpoints of an earlier CC run do not apply
            shutil.rmtree(cfg.stage1.cc.checkpoint_dir, ignore_errors=True)
        out["cc"] = s1.run_cc(cfg, progress)
    if force or out or not Path(cfg.stage1.cra_out).is_file():
        _log("stage 1: caption retrieval accuracy")
        s1.run_eval_cra(cfg, progress)
    return out


def _cache(cfg, force: bool, progress: bool) -> dict:
    from .cache import INDEX, build_cache, check_fingerprint, fingerprint
    from .stage2.runs import embedder_config

    emb_cfg = embedder_config(cfg)
    index = Path(cfg.cache.out) / INDEX
    stale = False
    if index.is_file():
        try:
            check_fingerprint(json.loads(index.read_text())["fingerprint"], fingerprint(emb_cfg, cfg.cache.dtype), "")
        except ConfigError:
            stale = True
    _log("embedding cache" + (" (the embedder changed: rebuilding)" if stale else ""))
    return build_cache(cfg.cache, emb_cfg, cfg.data, force=force or stale, progress=progress)


def _train_step(name: str, run, force: bool, fn, *args) -> dict | None:
    from .stage2.runs import model_folder

    if not run.enabled:
        return None
    if force:
        shutil.rmtree(run.out, ignore_errors=True)
    elif (model_folder(run) / "config.json").is_file():
        return {"reused": str(model_folder(run))}
    _log(f"stage 2: {name}")
    return fn(*args)


def _llm2clip_is_current(cfg) -> bool:
    from .cache import fingerprint
    from .stage2.runs import embedder_config, model_folder

    config = model_folder(cfg.stage2.llm2clip) / "config.json"
    if not config.is_file():
        return False
    saved = (json.loads(config.read_text()).get("embedder") or {}).get("fingerprint")
    return saved == fingerprint(embedder_config(cfg), cfg.cache.dtype)


def run_main(cfg, *, force: bool = False, progress: bool = True) -> dict:
    from .report import print_results
    from .stage2 import runs
    from .stage2.evaluate import run_eval

    start = time.perf_counter()
    out = Path(cfg.run.out_dir)
    summary, seconds = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return result

    if cfg.synth.enabled:
        from .data.synth import synthesize

        _log("data: the shapes world")
        summary["data"] = timed("data", lambda: synthesize(cfg.synth, out / "data", overwrite=force,
                                                           progress=progress)["splits"])
    summary["stage1"] = timed("stage1", lambda: _stage1(cfg, force, progress))
    summary["cache"] = timed("cache", lambda: _cache(cfg, force, progress))
    train_images = None

    def images():
        nonlocal train_images
        if train_images is None:
            train_images = runs.load_images(cfg, cfg.stage2.train_data, progress)
        return train_images

    stage2 = cfg.stage2
    summary["clip_pretrain"] = timed("clip_pretrain", lambda: _train_step(
        "pretrain CLIP on short captions", stage2.clip_pretrain, force,
        lambda: runs.run_clip_pretrain(cfg, images(), progress)))
    pretrained_now = summary["clip_pretrain"] is not None and "reused" not in summary["clip_pretrain"]
    summary["clip_finetune"] = timed("clip_finetune", lambda: _train_step(
        "fine-tune CLIP (77-token text encoder)", stage2.clip_finetune, force or pretrained_now,
        lambda: runs.run_clip_finetune(cfg, images(), progress)))
    summary["llm2clip"] = timed("llm2clip", lambda: _train_step(
        "LLM2CLIP (vision encoder + adapter on cached LLM embeddings)", stage2.llm2clip,
        force or pretrained_now or not _llm2clip_is_current(cfg), lambda: runs.run_llm2clip(cfg, images(), progress)))
    _log("evaluation and export")
    results = timed("eval", lambda: run_eval(cfg, progress=progress))
    if (runs.model_folder(stage2.llm2clip) / "config.json").is_file():
        from .export import export_model, export_vision_tower

        export_vision_tower(runs.model_folder(stage2.llm2clip), out / "vision_tower")
        export_model(runs.model_folder(stage2.llm2clip), out / "llm2clip")
    if (runs.model_folder(stage2.clip_finetune) / "config.json").is_file():
        from .export import export_vision_tower

        export_vision_tower(runs.model_folder(stage2.clip_finetune), out / "clip_vision_tower")
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    summary["seconds"] = seconds  # per step, for the 10-minute budget of the tiny preset
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "run_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print_results(results)
    print(f"wall time {results['wall_seconds']:.0f} s; results in {out / 'results.json'}, plots in {out / 'plots'}")
    return results
