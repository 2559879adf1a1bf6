"""The main job: data -> stage 1 -> cache -> CLIP baseline -> LLM2CLIP -> evaluation -> export.

Each step is skipped when its output exists and its inputs are unchanged since it ran: the config values
and the files it reads, including earlier steps' outputs (stamps in <run.out_dir>/step_inputs.json,
llm2clip/stamps.py), unless `force`.

    <run.out_dir>/results.json     CRA, retrieval per model and caption set, wall time
    <run.out_dir>/plots/           training_curves.png, top5_long_captions.png
    <run.out_dir>/vision_tower/    standard HF CLIP vision folder (LLaVA-ready)
    <run.out_dir>/llm2clip/        the whole model
    <run.out_dir>/clip_vision_tower/  the fine-tuned CLIP baseline's vision encoder, same format
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

from .stamps import Ledger, stamp


def _log(msg: str) -> None:
    print(f"== {msg}", flush=True)


_RUNTIME = ("device", "batch_size", "compile", "checkpoint_every", "keep_checkpoints", "eval_batch_size")


def _values(**sections) -> dict:
    """Config sections as plain dicts, minus keys that change how a step runs, not what it produces."""
    out = {}
    for name, section in sections.items():
        value = asdict(section) if is_dataclass(section) else section
        out[name] = {k: v for k, v in value.items() if k not in _RUNTIME} if isinstance(value, dict) else value
    return out


def _step_inputs(cfg) -> dict:
    """Per step, its stamp (llm2clip/stamps.py): the config values and files it reads."""
    from .stage1.cli import _cc_base
    from .stage2.runs import embedder_config, pretrained_clip_folder, stage2_embedder_config

    s1, s2 = cfg.stage1, cfg.stage2
    cc_base = _cc_base(cfg)
    inputs = {
        "pretrain": lambda: stamp(_values(pretrain=s1.pretrain, seed=cfg.run.seed),
                                  {"corpus": s1.pretrain.corpus, "tokenizer": s1.pretrain.tokenizer}),
        "mntp": lambda: stamp(_values(mntp=s1.mntp, embedder=cfg.embedder, seed=cfg.run.seed),
                              {"text": s1.mntp.text, "model": cfg.embedder.model, "adapters": cfg.embedder.adapters}),
        "cc": lambda: stamp(_values(cc=s1.cc, embedder=cc_base, data=cfg.data, seed=cfg.run.seed),
                            {"data": s1.cc.data, "text_pairs": s1.cc.text_pairs, "model": cc_base.model,
                             "adapters": cc_base.adapters, "deepspeed": s1.cc.deepspeed}),
        "cra": lambda: stamp(_values(keys=[s1.cra_caption_keys, s1.cra_second_language_key], data=cfg.data,
                                     embedder=cfg.embedder),
                             {"cra_data": s1.cra_data, "model": cfg.embedder.model, "cc": s1.cc.out}),
        "cache": lambda: stamp(_values(cache=cfg.cache, data=cfg.data, embedder=stage2_embedder_config(cfg)),
                               {"data": cfg.cache.data, "embedder": s1.cc.out, "model": embedder_config(cfg).model,
                                "adapters": embedder_config(cfg).adapters}),
    }
    for name in ("clip_pretrain", "clip_finetune", "llm2clip"):
        def train(name=name):
            run = getattr(s2, name)
            paths = {"train_data": s2.train_data, "deepspeed": run.deepspeed}
            if name != "clip_pretrain":
                paths["clip"] = pretrained_clip_folder(cfg)
            if name == "llm2clip":
                paths["cache"] = None if s2.online else cfg.cache.out
                paths.update(embedder=s1.cc.out, model=embedder_config(cfg).model,
                             adapters=embedder_config(cfg).adapters)
            embedder = stage2_embedder_config(cfg) if name == "llm2clip" else None  # cache.instruction too
            return stamp(_values(run=run, model=s2.model, text=s2.text, vision=cfg.vision, data=cfg.data,
                                 embedder=embedder, online=s2.online, seed=cfg.run.seed), paths)
        inputs[name] = train
    return inputs


def _stage1(cfg, ledger, inputs, force: bool, progress: bool, timed=None) -> dict:
    """Stage 1's steps that are due; `timed(name, fn)` wraps each one that runs (seconds, FLOPs)."""
    from .stage1 import cli as s1

    out = {}

    def due(step: str, output: Path) -> bool:
        return force or not output.exists() or not ledger.current(step, inputs[step]())

    def run(step: str, fn, partial: str | None = None):
        _begin(ledger, step, inputs[step](), force, partial)
        result = timed(f"stage1.{step}", lambda: fn(cfg, progress)) if timed else fn(cfg, progress)
        ledger.record(step, inputs[step]())
        return result

    if cfg.stage1.pretrain.enabled and due("pretrain", Path(cfg.stage1.pretrain.out) / "config.json"):
        _log("stage 1: pretrain the tiny LM")
        out["pretrain"] = run("pretrain", s1.run_pretrain)
    if cfg.stage1.mntp.enabled and due("mntp", Path(cfg.stage1.mntp.out) / "adapter_config.json"):
        _log("stage 1: MNTP")
        out["mntp"] = run("mntp", s1.run_mntp)
    if due("cc", Path(cfg.stage1.cc.out) / "embedder_config.json"):
        _log("stage 1: caption-contrastive fine-tuning")
        out["cc"] = run("cc", s1.run_cc, cfg.stage1.cc.checkpoint_dir)
    if cfg.stage1.cra_data is None:
        out["cra"] = "skipped (stage1.cra_data: null)"
    elif due("cra", Path(cfg.stage1.cra_out)):
        _log("stage 1: caption retrieval accuracy")
        out["cra"] = run("cra", s1.run_eval_cra)
    return out


def _begin(ledger, step: str, expected: dict, force: bool, partial: str | None) -> None:
    """Before a step runs: it no longer counts as current (a kill midway must not look finished), and
    `partial` (its checkpoints) is removed unless they were made from these same inputs, which an
    interrupted run then resumes from."""
    started = f"{step} (started)"
    if partial is not None and (force or ledger.steps.get(started) != expected):
        shutil.rmtree(partial, ignore_errors=True)
    ledger.forget(step)
    ledger.record(started, expected)


def _cache(cfg, ledger, inputs, force: bool, progress: bool) -> dict:
    from .cache import INDEX, build_cache
    from .stage2.runs import stage2_embedder_config

    expected = inputs["cache"]()
    # a complete cache, or parts of a build begun on other inputs, that no longer fit: rebuilt (parts of
    # an interrupted build on these inputs are resumed by build_cache)
    complete = (Path(cfg.cache.out) / INDEX).is_file()
    stale = not ledger.current("cache", expected) and (complete or ledger.steps.get("cache (started)") != expected)
    _log("embedding cache" + (" (its inputs changed: rebuilding)" if stale and complete else ""))
    _begin(ledger, "cache", expected, force, None)
    result = build_cache(cfg.cache, stage2_embedder_config(cfg), cfg.data, force=force or stale, progress=progress)
    ledger.record("cache", inputs["cache"]())
    return result


def _train_step(name: str, cfg, ledger, inputs, force: bool, fn) -> dict | None:
    from .stage2.runs import model_folder

    run = getattr(cfg.stage2, name)
    if not run.enabled:
        return None
    expected = inputs[name]()
    if not force and ledger.current(name, expected) and (model_folder(run) / "config.json").is_file():
        return {"reused": str(model_folder(run))}
    _begin(ledger, name, expected, force, run.out)  # a run on other inputs: its model and checkpoints go
    result = fn()
    ledger.record(name, inputs[name]())
    return result


def check_inputs(cfg) -> None:
    """Every data path the run reads exists, checked before any work (the shapes world's are made first)."""
    from .data.readers import expand_paths, missing_path

    made = str(Path(cfg.run.out_dir) / "data") if cfg.synth.enabled else None
    s1, s2 = cfg.stage1, cfg.stage2
    paths = [("stage1.cc.data", s1.cc.data), ("stage1.cc.text_pairs", s1.cc.text_pairs),
             ("stage1.cra_data", s1.cra_data), *(("cache.data", p) for p in cfg.cache.data),
             ("stage2.train_data", s2.train_data), ("stage2.eval_data", s2.eval_data)]
    for key, path in paths:
        if path is not None and not (made and str(path).startswith(made)) and not expand_paths(path):
            raise missing_path(key, path)


def _flop_counter(enabled: bool):
    """FlopCounterMode (matmuls, convolutions and attention, forward and backward) or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def run_main(cfg, *, force: bool = False, progress: bool = True, count_flops: bool = False) -> dict:
    """`count_flops` adds each step's FLOPs to run_summary.json (`flops`); counting costs wall time, so a
    budget's seconds come from a run without it (benchmarks/main_job_floor.py reads both)."""
    from .report import print_results
    from .stage2 import runs
    from .stage2.evaluate import run_eval

    check_inputs(cfg)
    start = time.perf_counter()
    out = Path(cfg.run.out_dir)
    summary, seconds, flops = {}, {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        with _flop_counter(count_flops) as counter:
            result = fn()
        seconds[name] = round(time.perf_counter() - t0, 1)
        if counter is not None:
            flops[name] = counter.get_total_flops()
        return result

    if cfg.synth.enabled:
        from .data.synth import synthesize

        _log("data: the shapes world")
        summary["data"] = timed("data", lambda: synthesize(cfg.synth, out / "data", overwrite=force,
                                                           progress=progress)["splits"])
    ledger, inputs = Ledger(out), _step_inputs(cfg)
    summary["stage1"] = _stage1(cfg, ledger, inputs, force, progress, timed)  # timed per step that runs
    summary["cache"] = timed("cache", lambda: _cache(cfg, ledger, inputs, force, progress))
    train_data = None

    def images():  # the training split, in memory or streamed; read once for the three runs
        nonlocal train_data
        if train_data is None:
            train_data = runs.train_data(cfg, progress)
        return train_data

    stage2 = cfg.stage2
    summary["clip_pretrain"] = timed("clip_pretrain", lambda: _train_step(
        "clip_pretrain", cfg, ledger, inputs, force, lambda: runs.run_clip_pretrain(cfg, images(), progress)))
    summary["clip_finetune"] = timed("clip_finetune", lambda: _train_step(
        "clip_finetune", cfg, ledger, inputs, force, lambda: runs.run_clip_finetune(cfg, images(), progress)))
    summary["llm2clip"] = timed("llm2clip", lambda: _train_step(
        "llm2clip", cfg, ledger, inputs, force, lambda: runs.run_llm2clip(cfg, images(), progress)))
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
    if count_flops:
        summary["flops"] = flops  # per step; reused steps count 0 (stage 1's are not listed)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "run_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print_results(results)
    print(f"wall time {results['wall_seconds']:.0f} s; results in {out / 'results.json'}, plots in {out / 'plots'}")
    return results
