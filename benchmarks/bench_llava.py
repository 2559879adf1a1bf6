"""LLaVA instruction-tuning benchmarks: tokens/s of full / LoRA / QLoRA steps, QLoRA vs bf16-LoRA memory.

    python benchmarks/bench_llava.py                       # ~100M-parameter Llama (768 x 14), ~10 min on 2 cores
    python benchmarks/bench_llava.py --smoke               # 256 x 2 model, one step each: a minute
    python benchmarks/bench_llava.py --memory-only --memory-sizes 2048x22 --batch 1 \
        --out runs/bench/llava_1b.json                     # ~1.1B-parameter Llama, memory only: ~10 min

Every step goes through the real code path: `llava_integration.arguments.parse` on LLaVA's flags,
`train.build_model` (k-bit loading, prepare_model_for_kbit_training, peft LoRA on every LLM Linear,
LLaVA's casts), `data.LlavaDataset` + `DataCollator` on the main job's shapes-world instruction data
and its LLM2CLIP tower (runs/tiny), then forward/backward/AdamW under bf16 autocast as HF Trainer
runs it on CPU. The LLM is a randomly initialised Llama (llm2clip.tiny.tiny_llm_config with the run's
tokenizer, saved with save_pretrained), the same weights for every variant. Each variant runs in a
fresh subprocess; memory is peak RSS (VmHWM, reset after loading) above the post-import baseline.
Tokens count image tokens, not padding; each child records the 1-minute load average, as timings on a
shared machine move with it. Writes runs/bench/llava.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from memory import proc_status_mib, settle  # benchmarks/memory.py (this folder is on sys.path)
from models import save_random_llama

VARIANTS = {"full": [], "lora_bf16": ["--lora_enable", "True"], "qlora": ["--lora_enable", "True", "--bits", "4"]}


def build_llm(folder: Path, tokenizer_dir: Path, hidden: int, layers: int) -> dict:
    """Save a random Llama of the given size with the run's tokenizer; return its parameter counts."""
    model = save_random_llama(folder, tokenizer_dir, hidden, layers, causal_lm=True)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings count once
    embed = sum({id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(),
                                                           model.get_output_embeddings())}.values())
    return {"hidden": hidden, "layers": layers, "params": total, "non_embedding_params": total - embed}


def llava_argv(folder: Path, variant: str, args: argparse.Namespace, samples: int, out: str,
               checkpointing: str) -> list[str]:
    run = Path(args.run_dir)
    return ["--model_name_or_path", str(folder), "--version", "v1", "--vision_tower", "llm2clip",
            "--llm2clip_run_dir", str(run), "--data_path", str(run / "data/llava/train_instruct.json"),
            "--image_folder", str(run / "data"), "--output_dir", out, "--bf16", "True", "--use_cpu", "True",
            "--per_device_train_batch_size", str(args.batch), "--model_max_length", str(args.max_length),
            "--max_samples", str(samples), "--learning_rate", "2e-5", "--weight_decay", "0",
            "--gradient_checkpointing", checkpointing, "--lora_r", str(args.lora_r),
            "--lora_alpha", str(2 * args.lora_r), *VARIANTS[variant], *shlex.split(args.llava_flags)]


def train_child(argv: list[str], warmup: int, steps: int) -> dict:
    """Build through build_model, then warmup + timed training steps in this (fresh) process."""
    import bitsandbytes  # noqa: F401  (imports are the baseline, not the model's cost)
    import peft  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import llm2clip.model  # noqa: F401  (the tower's loader)
    from llava_integration.arguments import parse, validate
    from llava_integration.data import DataCollator, LlavaDataset
    from llava_integration.train import build_model, compute_dtype

    model_args, data_args, training_args = parse(argv)
    validate(model_args, data_args, training_args)
    base = settle()
    torch.manual_seed(0)
    model, tokenizer = build_model(model_args, training_args)
    if training_args.gradient_checkpointing:  # what Trainer does (k-bit models got it in build_model already)
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    tower = model.get_vision_tower()
    dataset = LlavaDataset(data_args, tokenizer, tower.image_processor, model_args.version,
                           training_args.model_max_length, tower.num_patches, progress=False)
    collate = DataCollator(tokenizer.pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training_args.learning_rate, weight_decay=training_args.weight_decay)
    dtype, size = compute_dtype(training_args), training_args.per_device_train_batch_size
    # Loading converts (and for QLoRA quantises) the checkpoint: transient copies that are not the
    # step's cost, so the peak is reset after loading.
    loaded, load_before = settle(), os.getloadavg()[0]
    timed_tokens, timed_seconds, losses = 0, 0.0, []
    for step in range(warmup + steps):  # from the second step on, AdamW's state is resident too
        index = [(step * size + k) % len(dataset) for k in range(size)]
        start = time.perf_counter()
        batch = collate([dataset[i] for i in index])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        losses.append(round(loss.item(), 3))
        if step >= warmup:  # spliced length: text + image tokens, truncated like the model does
            timed_tokens += sum(min(dataset.samples[i]["length"], training_args.model_max_length) for i in index)
            timed_seconds += seconds
    peak = proc_status_mib("VmHWM")
    return {"baseline_mib": round(base), "model_resident_mib": round(loaded - base),
            "step_peak_mib": round(peak - base), "tokens_per_step": round(timed_tokens / max(steps, 1)),
            "seconds_per_step": round(timed_seconds / max(steps, 1), 2),
            "tokens_per_s": round(timed_tokens / timed_seconds, 1) if timed_seconds else None,
            "losses": losses, "trainable_params": sum(p.numel() for p in trainable),
            "image_tokens_per_sample": tower.num_patches,
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def run_child(argv: list[str], warmup: int, steps: int, pin_malloc: bool) -> dict:
    """train_child in a fresh subprocess. For memory runs glibc's mmap threshold is pinned so freed
    tensors go back to the OS: otherwise RSS reports what the allocator hoards, not what the step uses.
    Throughput runs keep the default allocator. A failing variant is recorded, not fatal."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    if pin_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    spec = json.dumps({"argv": argv, "warmup": warmup, "steps": steps})
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child"], input=spec, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit {done.returncode}"}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768, help="throughput model width")
    parser.add_argument("--layers", type=int, default=14, help="throughput model depth (768 x 14: ~100M)")
    parser.add_argument("--variants", default="full,lora_bf16,qlora")
    parser.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size")
    parser.add_argument("--max-length", type=int, default=768, help="model_max_length")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    parser.add_argument("--memory-sizes", default="768x14",
                        help="hidden x layers of each model whose QLoRA/LoRA step memory is compared, "
                             "e.g. 768x14,2048x22 (the 1.1B one takes many minutes per QLoRA step on 2 cores)")
    parser.add_argument("--memory-steps", type=int, default=2, help="steps in each memory run (2: AdamW state too)")
    parser.add_argument("--lora-r", type=int, default=128, help="LoRA rank (alpha = 2r, LLaVA-1.5's 128/256)")
    parser.add_argument("--gradient-checkpointing", default="False", choices=["True", "False"],
                        help="throughput runs (the tiny preset trains without it)")
    parser.add_argument("--memory-gradient-checkpointing", default="True", choices=["True", "False"],
                        help="memory runs (LLaVA-1.5's finetune.sh trains with it)")
    parser.add_argument("--llava-flags", default="", help="extra LLaVA flags for every variant, one string")
    parser.add_argument("--run-dir", default="runs/tiny", help="the main job's run (tower and data)")
    parser.add_argument("--out", default="runs/bench/llava.json")
    parser.add_argument("--smoke", action="store_true", help="256 x 2 model, batch 2, one untimed + one timed step")
    parser.add_argument("--memory-only", action="store_true", help="skip the throughput runs")
    parser.add_argument("--throughput-only", action="store_true", help="skip the memory runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # subprocess mode: the spec arrives on stdin
        spec = json.loads(sys.stdin.read())
        print(json.dumps(train_child(spec["argv"], spec["warmup"], spec["steps"])))
        return
    if args.smoke:
        args.hidden, args.layers, args.memory_sizes = 256, 2, "256x2"
        args.batch, args.steps, args.memory_steps = 2, 1, 1

    result = {"threads": torch.get_num_threads(), "batch": args.batch, "model_max_length": args.max_length,
              "lora_r": args.lora_r, "llava_flags": args.llava_flags, "loadavg_1min_at_start": os.getloadavg()[0]}
    tokenizer_dir = Path(args.run_dir) / "data/tokenizer"
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = str(Path(tmp) / "out")
        folders: dict[str, tuple[Path, dict]] = {}

        def llm(hidden: int, layers: int) -> tuple[Path, dict]:
            key = f"{hidden}x{layers}"
            if key not in folders:
                for old, _ in folders.values():  # keep one model on disk at a time
                    shutil.rmtree(old, ignore_errors=True)
                folders.clear()
                folder = Path(tmp) / f"llm-{key}"
                folders[key] = (folder, build_llm(folder, tokenizer_dir, hidden, layers))
            return folders[key]

        if not args.memory_only:
            folder, info = llm(args.hidden, args.layers)
            samples = args.batch * (args.warmup + args.steps)
            result["throughput"] = {"model": info, "warmup": args.warmup, "steps": args.steps,
                                    "gradient_checkpointing": args.gradient_checkpointing}
            for variant in args.variants.split(","):
                argv = llava_argv(folder, variant, args, samples, out_dir, args.gradient_checkpointing)
                run = run_child(argv, args.warmup, args.steps, False)
                result["throughput"][variant] = run
                print(f"throughput {variant}: {run.get('tokens_per_s', run.get('error'))} tokens/s", flush=True)
        if not args.throughput_only:
            result["memory"] = []
            for size in args.memory_sizes.split(","):
                folder, info = llm(*map(int, size.split("x")))
                entry = {"model": info, "steps": args.memory_steps,
                         "gradient_checkpointing": args.memory_gradient_checkpointing}
                for variant in ("lora_bf16", "qlora"):
                    argv = llava_argv(folder, variant, args, args.batch * args.memory_steps, out_dir,
                                      args.memory_gradient_checkpointing)
                    entry[variant] = run_child(argv, 0, args.memory_steps, True)
                    print(f"memory {size} {variant}: {entry[variant].get('step_peak_mib', entry[variant].get('error'))}"
                          " MiB step peak", flush=True)
                if "error" not in entry["lora_bf16"] and "error" not in entry["qlora"]:
                    for key in ("model_resident_mib", "step_peak_mib"):
                        entry[f"qlora_over_lora_{key}"] = round(entry["qlora"][key] / entry["lora_bf16"][key], 3)
                result["memory"].append(entry)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    summary(result, args.out)


def summary(result: dict, out: str) -> None:
    if "throughput" in result:
        t = result["throughput"]
        print(f"\nthroughput ({t['model']['params'] / 1e6:.0f}M-parameter Llama, batch {result['batch']}, "
              f"gradient checkpointing {t['gradient_checkpointing']}):")
        for variant in VARIANTS:
            if variant in t:
                r = t[variant]
                print(f"  {variant:<10} " + (f"{r['tokens_per_s']:>8} tokens/s  {r['seconds_per_step']:>7} s/step  "
                                             f"{r['tokens_per_step']} tokens/step" if "error" not in r else r["error"]))
    for entry in result.get("memory", []):
        lora, qlora = entry["lora_bf16"], entry["qlora"]
        name = f"{entry['model']['hidden']}x{entry['model']['layers']} ({entry['model']['params'] / 1e6:.0f}M)"
        if "qlora_over_lora_step_peak_mib" not in entry:
            print(f"memory {name}: lora {lora.get('error', 'ok')}; qlora {qlora.get('error', 'ok')}")
            continue
        print(f"memory {name}: step peak QLoRA {qlora['step_peak_mib']} MiB vs LoRA {lora['step_peak_mib']} MiB "
              f"= {entry['qlora_over_lora_step_peak_mib']}x; resident {qlora['model_resident_mib']} vs "
              f"{lora['model_resident_mib']} MiB = {entry['qlora_over_lora_model_resident_mib']}x "
              f"(gradient checkpointing {entry['gradient_checkpointing']})")
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
