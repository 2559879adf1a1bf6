"""How fast could the main job be on this machine? Its FLOPs per step against this host's GEMM rates.

    python benchmarks/main_job_floor.py [--config configs/tiny.yaml] [--scale 10] [--seconds SUMMARY]

1. Runs the main job (`run_main(..., count_flops=True)`) into `--out` with every training step count
   divided by `--scale` (stage 1's LM, MNTP and CC with CC's phase boundaries, stage 2's three runs),
   counting each step's FLOPs with FlopCounterMode: matmuls and attention, forward and backward;
   elementwise ops, tokenisation and image decoding count nothing. Training FLOPs are multiplied by
   `--scale` (a step's shapes do not depend on how many steps there are; CC's batches keep their mix of
   kinds per phase, so its count is a sample); encoding steps (CRA, cache, evaluation) run in full.
2. Divides them by two fp32 GEMM rates measured here and now:
   - `peak`: a 2048^3 matmul, the practical peak of this CPU;
   - `shapes`: the GEMMs the preset's layers run (`--rows` tokens against its widths: the Llama
     layer's q/k/v/o and gate/up/down projections, the CLIP layer's q/k/v/o and fc1/fc2), forward and
     both backward products. Narrow matrices run well below peak.
A step's floor is the time it would take if every FLOP ran at that rate and nothing else cost time;
the data step has no FLOPs and counts at its measured seconds. `--seconds` (the run_summary.json of
a full run without counting, every step run) adds each step's achieved rate. Prints JSON; not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

BUDGET_S = 600  # issue #20: the main job in 10 minutes on 2 cores


def layer_gemms(config: dict, rows: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of one training step's GEMMs for a Llama and a CLIP layer of the preset's widths:
    each projection's forward x[M,K] @ w[K,N], grad-input g[M,N] @ w^T[N,K], grad-weight x^T[K,M] @ g[M,N]."""
    llm = config["llm"]
    h, inter, head = llm["hidden_size"], llm["intermediate_size"], llm["head_dim"]
    kv = llm["num_key_value_heads"] * head
    clip = config["clip"]["hidden_size"]
    projections = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h),  # Llama
                   (clip, clip), (clip, clip), (clip, clip), (clip, clip), (clip, 4 * clip), (4 * clip, clip)]
    out = []
    for k, n in projections:
        out += [(rows, k, n), (rows, n, k), (k, rows, n)]
    return out


def gemm_rate(shapes: list[tuple[int, int, int]], repeats: int = 15) -> float:
    """FLOP/s of the shapes run one after another, best of `repeats` for the whole set."""
    mats = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    best = float("inf")
    for _ in range(repeats + 2):  # two warm-up rounds
        start = time.perf_counter()
        for a, b in mats:
            torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return flops / best


def preset_widths(config_path: str, out: Path) -> dict:
    """The LLM's and the vision tower's widths, from the counted run's LM folder and the config."""
    from llm2clip.config import load_config

    cfg = load_config(config_path, [f"run.out_dir={out}"])
    llm = json.loads((Path(cfg.embedder.model) / "config.json").read_text())
    return {"llm": llm, "clip": {"hidden_size": cfg.vision.hidden_size}}


TRAINING = ("stage1.pretrain", "stage1.mntp", "stage1.cc", "clip_pretrain", "clip_finetune", "llm2clip")


def scaled_overrides(cfg, scale: int) -> list[str]:
    """Every training step count divided by `scale` (at least 1), CC's phase boundaries with it."""
    def div(value: int) -> int:
        return max(1, round(value / scale))

    s1, s2 = cfg.stage1, cfg.stage2
    out = [f"stage1.pretrain.steps={div(s1.pretrain.steps)}", f"stage1.mntp.steps={div(s1.mntp.steps)}",
           f"stage1.cc.steps={div(s1.cc.steps)}", f"stage1.cc.mixed_from_step={round(s1.cc.mixed_from_step / scale)}",
           f"stage1.cc.warmup_steps={round(s1.cc.warmup_steps / scale)}"]
    if s1.cc.short_long_from_step is not None:
        out.append(f"stage1.cc.short_long_from_step={round(s1.cc.short_long_from_step / scale)}")
    return out + [f"stage2.{run}.steps={div(getattr(s2, run).steps)}"
                  for run in ("clip_pretrain", "clip_finetune", "llm2clip")]


def count_flops(config: str, out: Path, scale: int) -> tuple[dict, dict]:
    """(FLOPs, counted seconds) per step of the full-length job, from a run at 1/scale of its steps."""
    from llm2clip.config import load_config
    from llm2clip.pipeline import run_main

    cfg = load_config(config, [f"run.out_dir={out}"])
    cfg = load_config(config, [f"run.out_dir={out}", *scaled_overrides(cfg, scale)])
    for child in out.glob("*"):  # every step runs (and counts); the generated data is kept
        if child.name != "data":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_main(cfg, progress=False, count_flops=True)
    summary = json.loads((out / "run_summary.json").read_text())
    flops = {name: n * (scale if name in TRAINING else 1) for name, n in summary["flops"].items()}
    return flops, summary["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--scale", type=int, default=10, help="run 1/scale of every training step count")
    parser.add_argument("--out", type=Path, default=Path("runs/flops"))
    parser.add_argument("--seconds", help="run_summary.json of a full run without counting, every step run")
    parser.add_argument("--rows", type=int, default=2048, help="tokens per GEMM (a CC step has ~2,400)")
    args = parser.parse_args()

    flops, counted_s = count_flops(args.config, args.out, args.scale)
    measured = json.loads(Path(args.seconds).read_text())["seconds"] if args.seconds else {}
    rates = {"peak": gemm_rate([(2048, 2048, 2048)], repeats=7),
             "shapes": gemm_rate(layer_gemms(preset_widths(args.config, args.out), args.rows))}
    steps, floors = {}, dict.fromkeys(rates, 0.0)
    for name, n in flops.items():
        row = {"tflop": round(n / 1e12, 2), "counted_run_s": counted_s[name]}
        for rate_name, rate in rates.items():
            # no FLOPs (the data step): its measured time is the floor
            seconds = n / rate if n else measured.get(name, counted_s[name])
            row[f"floor_{rate_name}_s"] = round(seconds, 1)
            floors[rate_name] += seconds
        if n and name in measured:
            row["measured_s"] = measured[name]
            row["achieved_gflop_per_s"] = round(n / measured[name] / 1e9, 1)
        steps[name] = row
    report = {
        "threads": torch.get_num_threads(), "scale": args.scale,
        "gemm_gflop_per_s": {k: round(v / 1e9, 1) for k, v in rates.items()},
        "total_tflop": round(sum(flops.values()) / 1e12, 2),
        "floor_s": {k: round(v, 1) for k, v in floors.items()},
        "budget_s": BUDGET_S,
        "steps": steps,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
