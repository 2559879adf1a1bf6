"""Stage-1 benchmarks: encode throughput and MFU against a naive loop, QLoRA vs bf16-LoRA memory.

    python benchmarks/bench_stage1.py                      # full size (~100M-parameter Llama)
    python benchmarks/bench_stage1.py --hidden 256 --layers 2 --texts 64   # smoke run

Everything is measured in this one run, on the same randomly initialised model (built from a
LlamaConfig, saved with save_pretrained and loaded through CaptionEmbedder.load, the real code path)
and the same shapes-world captions. Writes runs/bench/stage1.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from memory import proc_status_mib, settle  # benchmarks/memory.py (this folder is on sys.path)
from models import save_random_llama
from rows import gemm_flops_per_s


def build_model(folder: Path, tokenizer_dir: Path, hidden: int, layers: int) -> int:
    """Save a random Llama of the given size with the shapes-world tokenizer; return non-embedding params."""
    model = save_random_llama(folder, tokenizer_dir, hidden, layers)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def captions(data_dir: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    pool = [r[k] for r in rows for k in ("short_caption", "long_caption", "short_caption_zh", "long_caption_zh")]
    return random.Random(0).sample(pool, min(n, len(pool)))


@torch.no_grad()
def naive_encode(embedder, texts: list[str], batch_size: int) -> float:
    """What a first implementation does: input order, fp32, every batch padded to max_length."""
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        batch = embedder.tokenizer(texts[i:i + batch_size], padding="max_length", truncation=True,
                                   max_length=embedder.cfg.max_length, return_tensors="pt")
        hidden = embedder.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        (hidden * mask).sum(1) / mask.sum(1)
    return time.perf_counter() - start


def bench_encode(folder: Path, texts: list[str], batch_size: int, max_length: int, n_params: int) -> dict:
    from llm2clip.embedder import CaptionEmbedder, EmbedderConfig

    ours = CaptionEmbedder.load(EmbedderConfig(model=str(folder), device="cpu", max_length=max_length,
                                               instruction=""))
    naive = CaptionEmbedder.load(EmbedderConfig(model=str(folder), device="cpu", max_length=max_length,
                                                instruction="", autocast=False))
    real_tokens = sum(len(ids) for ids, _ in ours.tokenize_texts(texts))
    ours.encode(texts[:batch_size], batch_size=batch_size)  # warm-up both paths
    naive_encode(naive, texts[:batch_size], batch_size)
    start = time.perf_counter()
    ours.encode(texts, batch_size=batch_size)
    t_ours = time.perf_counter() - start
    t_naive = naive_encode(naive, texts, batch_size)
    bf16_peak, fp32_peak = gemm_flops_per_s(torch.bfloat16), gemm_flops_per_s(torch.float32)
    achieved = 2 * n_params * real_tokens / t_ours  # 2N FLOPs per token (attention scores not counted)
    return {"texts": len(texts), "real_tokens": real_tokens, "batch_size": batch_size,
            "ours_tokens_per_s": round(real_tokens / t_ours, 1), "naive_tokens_per_s": round(real_tokens / t_naive, 1),
            "speedup": round(t_naive / t_ours, 2), "flops_per_token": f"2*N, N={n_params} non-embedding parameters",
            "bf16_gemm_tflops": round(bf16_peak / 1e12, 3), "fp32_gemm_tflops": round(fp32_peak / 1e12, 3),
            "achieved_tflops": round(achieved / 1e12, 3), "mfu_vs_bf16_gemm": round(achieved / bf16_peak, 3)}


def memory_child(variant: str, folder: str, texts: list[str], batch: int, steps: int = 2) -> dict:
    """CC training steps in this (fresh) process; RSS above the post-import baseline, in MiB."""
    import bitsandbytes  # noqa: F401  (imports are the baseline, not the model's cost)
    import peft  # noqa: F401
    from transformers import AutoModel  # noqa: F401

    from llm2clip.embedder import CaptionEmbedder, EmbedderConfig, load_backbone
    from llm2clip.losses import caption_contrastive_loss
    from llm2clip.stage1.lora import LoraSettings, add_lora

    base = settle()
    quantized = variant == "qlora"
    # what `stage1 cc` does: dtype auto (fp32 on CPU) under 4-bit, LoRA on all projections, checkpointing
    cfg = EmbedderConfig(model=folder, device="cpu", max_length=128, load_in_4bit=quantized,
                         dtype="float32" if quantized else "bfloat16")
    backbone, tokenizer = load_backbone(cfg)
    backbone = add_lora(backbone, LoraSettings(), quantized=quantized, gradient_checkpointing=True)
    emb = CaptionEmbedder(backbone, tokenizer, cfg)
    emb.train()
    optimizer = torch.optim.AdamW([p for p in emb.parameters() if p.requires_grad], lr=1e-4)
    # Loading converts (and for QLoRA quantises) the checkpoint: transient copies that are not the
    # step's cost, so the peak is reset after loading.
    loaded = settle()
    queries, docs = emb.batch(texts[:batch]), emb.batch(texts[batch:3 * batch])
    for _ in range(steps):  # from the second step on, AdamW's state is resident too
        p, n = emb(**docs).split(batch)
        caption_contrastive_loss(emb(**queries), p, n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = proc_status_mib("VmHWM")
    return {"variant": variant, "baseline_mib": round(base), "model_resident_mib": round(loaded - base),
            "step_peak_mib": round(peak - base),
            "tokens_per_step": int(queries["attention_mask"].sum() + docs["attention_mask"].sum())}


def bench_memory(folder: Path, texts: list[str], batch: int) -> dict:
    """QLoRA vs bf16 LoRA, each in a fresh subprocess. glibc's mmap threshold is pinned there so freed
    tensors go back to the OS: otherwise RSS reports what the allocator hoards, not what the step uses."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = {}
    for variant in ("lora_bf16", "qlora"):
        cmd = [sys.executable, __file__, "--memory-child", variant, "--folder", str(folder), "--batch", str(batch)]
        done = subprocess.run(cmd, input=json.dumps(texts), capture_output=True, text=True, check=True, env=env)
        out[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("model_resident_mib", "step_peak_mib"):
        out[f"qlora_over_lora_{key}"] = round(out["qlora"][key] / out["lora_bf16"][key], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=14)  # 14 x 768 -> ~100M non-embedding parameters
    parser.add_argument("--texts", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--memory-batch", type=int, default=4, help="pairs in the measured CC step")
    parser.add_argument("--memory-sizes", default="768x14,2048x22",
                        help="hidden x layers of each model whose QLoRA/LoRA memory is compared")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default="runs/bench/stage1.json")
    parser.add_argument("--memory-only", action="store_true", help="skip the encode benchmark")
    parser.add_argument("--memory-child")
    parser.add_argument("--folder")
    args = parser.parse_args()
    if args.memory_child:  # subprocess mode: texts arrive on stdin, --batch carries the memory batch
        print(json.dumps(memory_child(args.memory_child, args.folder, json.loads(sys.stdin.read()), args.batch)))
        return

    from llm2clip.data.synth import SynthConfig, synthesize

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synthesize(SynthConfig(num_images=400), data, progress=False)
        texts = captions(data, args.texts)
        result = {"threads": torch.get_num_threads()}
        if not args.memory_only:
            folder = Path(tmp) / "llm"
            n_params = build_model(folder, data / "tokenizer", args.hidden, args.layers)
            result["encode"] = {"model": {"hidden": args.hidden, "layers": args.layers,
                                          "non_embedding_params": n_params},
                                **bench_encode(folder, texts, args.batch, args.max_length, n_params)}
        result["memory"] = []
        for size in args.memory_sizes.split(","):
            hidden, layers = map(int, size.split("x"))
            folder = Path(tmp) / f"llm-{size}"
            n_params = build_model(folder, data / "tokenizer", hidden, layers)
            result["memory"].append({"model": {"hidden": hidden, "layers": layers, "non_embedding_params": n_params},
                                     **bench_memory(folder, texts, args.memory_batch)})
            shutil.rmtree(folder)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
