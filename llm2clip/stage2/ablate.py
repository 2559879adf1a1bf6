"""`llm2clip ablate parts`: what each part of LLM2CLIP adds, a miniature of the paper's ablation table.

Every variant retrains stage 2 only, on the run's own stage-1 embedder and cache, once per seed, and
is evaluated on one caption file: by default `val.jsonl` beside the training data, because settings
are chosen on val and never on test. The
CLIP fine-tune at the same seeds is the baseline row. `raw_llm` embeds the captions with the LLM
before CC fine-tuning, into a cache of its own (built once, reused).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError

# variant -> config overrides on top of the run's config (the run's own values: `llm2clip`)
VARIANTS: dict[str, list[str]] = {
    "clip_finetuned": [],  # the baseline: CLIP's own 77-token text tower, same data, steps and seeds
    "llm2clip": [],
    "raw_llm": [],  # the LLM without CC fine-tuning (stage1.cc.out is skipped; a cache of its own)
    "no_adapter": ["stage2.model.adapter_depth=0"],  # a linear projection on the LLM vectors
    "no_centring": ["stage2.model.center_vectors=false"],
    "no_layer_decay": ["stage2.llm2clip.layer_decay=1.0"],  # one of these two is the run's own recipe
    "layer_decay_0.85": ["stage2.llm2clip.layer_decay=0.85"],  # the official visual layer decay
    "short_only": ["stage2.llm2clip.long_caption_ratio=0.0"],
    "long_only": ["stage2.llm2clip.long_caption_ratio=1.0"],
}
METRICS = ("i2t_r1", "t2i_r1")


def variant_config(config: str | None, overrides: list[str], variant: str, seed: int, out: Path,
                   eval_data: str | None):
    """The run's config with the variant's overrides, its seed, and outputs under `out`."""
    from ..config import load_config, validate

    if variant not in VARIANTS:
        raise ConfigError(f"unknown ablation variant '{variant}'. Fix: choose from {', '.join(VARIANTS)}")
    run_dir = out / variant / f"seed{seed}"
    sets = [*overrides, *VARIANTS[variant], f"run.seed={seed}", f"stage2.llm2clip.out={run_dir}",
            f"stage2.clip_finetune.out={run_dir}"]
    if eval_data:
        sets.append(f"stage2.eval_data={eval_data}")
    if variant == "raw_llm":  # no CC adapter folder: stage 2 reads `embedder` as configured, the raw LLM
        shared = out.parent  # one raw-LLM cache for every evaluation file
        sets += [f"stage1.cc.out={shared / 'raw_llm' / 'no-cc-adapter'}", f"cache.out={shared / 'raw_llm' / 'cache'}"]
    cfg = load_config(config, sets)
    validate(cfg)
    return cfg


def variant_inputs(cfg, variant: str) -> dict:
    """What a finished run was trained from: the pretrained CLIP, the stage-2 settings and, for LLM2CLIP
    variants, the stage-1 embedder's fingerprint. A stored run whose inputs differ (stage 1 retrained, an
    override added) is run again."""
    from ..cache import fingerprint
    from ..cache.base import content_hash
    from .runs import pretrained_clip_folder, stage2_embedder_config

    inputs = {"start": content_hash(pretrained_clip_folder(cfg)), "stage2": asdict(cfg.stage2)}
    if variant != "clip_finetuned":
        inputs["embedder"] = fingerprint(stage2_embedder_config(cfg), cfg.cache.dtype)
    return json.loads(json.dumps(inputs))


def stamp_run_dir(cfg, variant: str) -> None:
    """Checkpoints left in the run's folder resume it only when they were made from these inputs (a
    killed ablation); another setup's (stage 1 retrained, an override changed) are removed first."""
    run_dir = Path(cfg.stage2.llm2clip.out)
    stamp, inputs = run_dir / "inputs.json", variant_inputs(cfg, variant)
    if run_dir.exists() and (not stamp.is_file() or json.loads(stamp.read_text()) != inputs):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(inputs, indent=1) + "\n")


def run_variant(cfg, variant: str, data, progress: bool) -> dict:
    """Train one variant at cfg.run.seed and evaluate it on cfg.stage2.eval_data."""
    from .evaluate import run_eval
    from .runs import embedder_config, run_clip_finetune, run_llm2clip

    if variant == "raw_llm" and not (Path(cfg.cache.out) / "index.json").is_file():
        from ..cache import build_cache

        build_cache(cfg.cache, embedder_config(cfg), cfg.data, progress=progress)
    model = "clip_finetuned" if variant == "clip_finetuned" else "llm2clip"
    stamp_run_dir(cfg, variant)
    start = time.perf_counter()
    (run_clip_finetune if model == "clip_finetuned" else run_llm2clip)(cfg, data, progress)
    seconds = round(time.perf_counter() - start, 1)
    result = run_eval(cfg, progress=False, models=(model,), plots=False)
    return {"train_seconds": seconds, "retrieval": result["retrieval"][model], "inputs": variant_inputs(cfg, variant)}


def summarise(rows: dict[str, dict[int, dict]]) -> dict:
    """Per variant and caption set: R@1 (mean of I2T and T2I) as the mean over seeds, with min and max."""
    table = {}
    for variant, seeds in rows.items():
        sets = next(iter(seeds.values()))["retrieval"]
        table[variant] = {}
        for name in sets:
            r1 = [statistics.fmean(seeds[s]["retrieval"][name][m] for m in METRICS) for s in sorted(seeds)]
            table[variant][name] = {"mean": round(statistics.fmean(r1), 2), "min": round(min(r1), 2),
                                    "max": round(max(r1), 2), "seeds": [round(x, 2) for x in r1]}
    return table


def ablate_parts(config: str | None, overrides: list[str], variants: list[str], seeds: list[int],
                 eval_data: str | None = None, progress: bool = True) -> dict:
    """Run every (variant, seed) not already in <run.out_dir>/ablation/<eval file's stem>/parts.json;
    returns the table."""
    from .runs import train_data

    base = variant_config(config, overrides, "llm2clip", seeds[0], Path("."), None)
    eval_data = eval_data or str(Path(base.data.path).parent / "val.jsonl")
    if not Path(eval_data).is_file():
        raise ConfigError(f"ablation evaluation data '{eval_data}' does not exist. Fix: pass --eval-data with a "
                          "held-out caption file that is not the test set (settings are chosen on val)")
    out = Path(base.run.out_dir) / "ablation" / Path(eval_data).stem
    path = out / "parts.json"
    done = json.loads(path.read_text()) if path.is_file() else {"eval_data": eval_data, "runs": {}}
    if done.get("eval_data") != eval_data:
        raise ConfigError(f"{path} holds an ablation evaluated on '{done.get('eval_data')}', not '{eval_data}'. "
                          "Fix: move it away, or pass the same --eval-data")
    data = train_data(base, progress)  # the training split is the same for every variant and seed
    for variant in variants:
        for seed in seeds:
            cfg = variant_config(config, overrides, variant, seed, out, eval_data)
            stored = done["runs"].get(variant, {}).get(str(seed))
            if stored is not None and stored.get("inputs") == variant_inputs(cfg, variant):
                continue
            if stored is not None and progress:
                print(f"[ablate] {variant} seed {seed}: stored run has other inputs (stage 1, the pretrained CLIP "
                      "or the stage-2 settings changed), running it again", flush=True)
            result = run_variant(cfg, variant, data, progress)
            # re-read before writing: another invocation on other variants may have added its runs
            done = json.loads(path.read_text()) if path.is_file() else done
            done["runs"].setdefault(variant, {})[str(seed)] = result
            out.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(done, indent=1) + "\n")
            tmp.replace(path)  # a killed ablation keeps every finished run
    done = json.loads(path.read_text())
    runs = {v: {int(s): r for s, r in done["runs"][v].items() if int(s) in seeds} for v in variants}
    return {"eval_data": eval_data, "seeds": seeds, "r1": summarise(runs), "written": str(path)}
