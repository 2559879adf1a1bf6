"""Stage-2 benchmarks, every figure measured in this one run on the same vision model and inputs.

    python benchmarks/bench_stage2.py            # ViT-B/16 shape at 224 px (~6 min on 2 cores)
    python benchmarks/bench_stage2.py --quick    # a small ViT, for a smoke run
    python benchmarks/bench_stage2.py --cached-only --steps 10   # only item 2, with more timed steps

1. Vision training step (ViT-B/16 shape, 224 px, bf16 autocast): images/s and MFU, FLOPs counted
   with torch.utils.flop_counter.FlopCounterMode on one forward+backward, against the median rate of
   a 2048^3 bf16 matmul measured here.
2. Cached-mode step time with two LLMs 8x apart in size (same width, 4 vs 32 layers): the LLM is
   not in the loop, so the ratio should be 1. Timed round-robin across sizes.
3. Cached vs online at equal batch: online embeds each batch's captions with the live LLM
   (`stage2.online`). Reported for several LLM sizes; the paper's setting (Llama-3-8B with
   ViT-L/14-336) has a caption-embedding to vision-step FLOP ratio of about 2.1, which a ~360M LLM
   matches against ViT-B/16 here.

Writes runs/bench/stage2.json. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import gemm_flops_per_s, time_step


def vision_model(hidden: int, layers: int, heads: int, image: int, patch: int, attn: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image, patch_size=patch)
    config._attn_implementation = attn
    return CLIPVisionModel(config)


def save_llm(folder: Path, tokenizer_dir: Path, hidden: int, layers: int) -> int:
    from transformers import AutoModel, AutoTokenizer

    from llm2clip.tiny import tiny_llm_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    heads = max(1, hidden // 64)
    config = tiny_llm_config("llama", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=layers,
                             num_heads=heads, num_kv_heads=heads, intermediate_size=int(hidden * 8 / 3) // 64 * 64)
    model = AutoModel.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def timed_steps(step, n: int) -> float:
    """Median seconds per call of `step`, after one warm-up call."""
    return time_step(step, n, count_flops=False)["seconds"]


def train_step_fn(model, pixels, text_side, keys, captions):
    from llm2clip.losses import ClipLoss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = ClipLoss()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image, text, scale, _ = model(pixels, text_side(keys, captions))
            loss_fn(image, text, scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/stage2.json")
    parser.add_argument("--cached-only", action="store_true",
                        help="only the cached-step flatness across LLM sizes (use with more --steps)")
    args = parser.parse_args()

    from torch.utils.flop_counter import FlopCounterMode

    from llm2clip.data.synth import SynthConfig, synthesize
    from llm2clip.embedder import CaptionEmbedder, EmbedderConfig
    from llm2clip.model import LLM2CLIP, ModelConfig
    from llm2clip.stage2.data import Caption, LiveVectors

    vit = (256, 4, 4, 64, 16) if args.quick else (768, 12, 12, 224, 16)  # ViT-B/16
    llm_width = 256 if args.quick else 960
    llm_layers = (2, 4, 16) if args.quick else (4, 16, 32)  # 32 layers x 960: SmolLM-360M-like
    torch.manual_seed(0)
    gemm = gemm_flops_per_s(torch.bfloat16)
    result: dict = {"threads": torch.get_num_threads(), "batch": args.batch, "gemm_bf16_tflops": round(gemm / 1e12, 3),
                    "vit": dict(zip(("hidden", "layers", "heads", "image", "patch"), vit, strict=True))}
    pixels = torch.randn(args.batch, 3, vit[3], vit[3])

    # 1. vision step: throughput and MFU, for both attention implementations
    result["vision_step"] = {}
    for attn in () if args.cached_only else ("sdpa", "eager"):
        vision = vision_model(*vit, attn)
        model = LLM2CLIP(vision, llm_width, ModelConfig(embed_dim=512))
        vectors = torch.randn(args.batch, llm_width)
        step = train_step_fn(model, pixels, lambda k, c, v=vectors: v, None, None)
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        seconds = timed_steps(step, args.steps)
        result["vision_step"][attn] = {"seconds": round(seconds, 3), "images_per_s": round(args.batch / seconds, 2),
                                       "flops_per_step": flops, "mfu_vs_bf16_gemm": round(flops / seconds / gemm, 3)}

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synthesize(SynthConfig(num_images=100), data, progress=False)
        rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
        captions = [Caption("long_caption", r["long_caption"]) for r in rows[: args.batch]]
        keys = [r["key"] for r in rows[: args.batch]]
        best = min(result["vision_step"], key=lambda a: result["vision_step"][a]["seconds"], default="eager")
        vision = vision_model(*vit, best)
        result["llms"], cached_steps = [], []
        for layers in llm_layers:
            folder = Path(tmp) / f"llm{layers}"
            n_params = save_llm(folder, data / "tokenizer", llm_width, layers)
            embedder = CaptionEmbedder.load(EmbedderConfig(model=str(folder), device="cpu", max_length=512))
            cache = embedder.encode([c.text for c in captions]).to(torch.bfloat16)  # what the cache stores
            model = LLM2CLIP(vision, llm_width, ModelConfig(embed_dim=512))
            cached_steps.append(train_step_fn(model, pixels, lambda k, c, v=cache: v.float(), keys, captions))
            online = None if args.cached_only else timed_steps(
                train_step_fn(model, pixels, LiveVectors(embedder), keys, captions), args.steps)
            result["llms"].append({"layers": layers, "width": llm_width, "non_embedding_params": n_params,
                                   "online_step_s": online and round(online, 3)})
        # Cached steps of all sizes are timed round-robin, so drift in the machine's speed over the run
        # (a few % per minute here) lands on every size alike rather than on whichever ran first.
        for step in cached_steps:
            step()
        times: list[list[float]] = [[] for _ in cached_steps]
        for _ in range(args.steps):
            for i, step in enumerate(cached_steps):
                start = time.perf_counter()
                step()
                times[i].append(time.perf_counter() - start)
        cached_times = [statistics.median(t) for t in times]
        for row, cached in zip(result["llms"], cached_times, strict=True):
            row.update(cached_step_s=round(cached, 3),
                       online_over_cached=row["online_step_s"] and round(row["online_step_s"] / cached, 2))
    sizes = [r["non_embedding_params"] for r in result["llms"]]
    result["cached_flatness"] = {"llm_size_ratio": round(sizes[-1] / sizes[0], 1),
                                 "slowest_over_fastest_cached_step": round(max(cached_times) / min(cached_times), 3)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
