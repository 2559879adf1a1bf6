"""The benchmark suite: every figure against its peer or reference, measured in this one run.

    bash scripts/bench.sh                 # = python -m benchmarks; peers' venvs are made on first use
    python -m benchmarks --quick          # small models and few texts: a smoke run of every row

Rows: caption embedding vs llm2vec 0.2.3's LLM2Vec.encode; the stage-2 vision step vs open_clip 3.3.0's
step (ViT-B-16); cached vs online stage 2; cached step time across LLM sizes; padding waste and cost by
caption length; QLoRA vs bf16-LoRA memory (CC and LLaVA); data-pipeline images/s per worker. Writes
runs/bench/bench.json (keys fixed by issue #8), runs/bench/bench_detail.json and PNG plots. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the benchmark scripts import each other by module name

import rows  # noqa: E402
import torch  # noqa: E402
from peers import ROOT, ensure  # noqa: E402

COMPUTE = {"dtype": "bf16"}  # set in main(): both sides of every pair run in this precision


def run_peer(name: str, script: str, *args) -> dict:
    python = ensure(name)
    args = (*args, COMPUTE["dtype"])
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ""}
    done = subprocess.run([str(python), str(HERE / script), *map(str, args)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{name} peer failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def encode_row(folder: Path, texts: list[str], batch: int, gemm: float, out: dict, notes: dict) -> None:
    """One timed round of all texts per side (ours eager, ours with embedder.compile, then llm2vec's), after
    a warm-up batch, on the same saved model, texts, batch, threads and precision. The headline is the
    compiled encoder (what a cache build of many captions runs); its one-off compile time is reported."""
    n_params = rows.non_embedding_params(folder)
    eager = rows.load_embedder(folder, batch_size=batch)
    eager.encode(texts[:batch], batch_size=batch)  # warm-up
    eager_time = rows.encode_round(eager, texts, batch)
    ours = rows.load_embedder(folder, batch_size=batch, compile=True)
    compile_s = rows.encode_round(ours, texts[:batch], batch)  # warm-up: compiles
    our_times = [rows.encode_round(ours, texts, batch)]
    skip = notes.get("skip")
    peer = None if skip else run_peer("llm2vec", "peer_llm2vec.py", folder, out["texts_file"], batch, 1)
    real_tokens = sum(len(ids) for ids, _ in ours.tokenize_texts(texts))
    t_ours = min(our_times)
    detail = {"model_non_embedding_params": n_params, "texts": len(texts), "batch": batch, "real_tokens": real_tokens,
              "ours_seconds": our_times, "ours_tokens_per_s": round(real_tokens / t_ours, 1),
              "ours_eager_seconds": eager_time, "ours_eager_tokens_per_s": round(real_tokens / eager_time, 1),
              "compile_and_first_batch_seconds": round(compile_s, 1),
              "flops": "2*N per real token, N = non-embedding parameters"}
    out["encode_mfu"] = round(100 * 2 * n_params * real_tokens / t_ours / gemm, 1)
    if peer is None:
        out["encode_vs_llm2vec"] = None
    else:
        t_peer = min(peer["seconds"])
        ours_rows = ours.encode(texts[:4], batch_size=4)
        cosine = torch.nn.functional.cosine_similarity(ours_rows, torch.tensor(peer["first_rows"]), dim=-1)
        detail.update(llm2vec_seconds=peer["seconds"], llm2vec_real_tokens=peer["real_tokens"],
                      llm2vec_tokens_per_s=round(peer["real_tokens"] / t_peer, 1),
                      llm2vec_mfu=round(100 * 2 * n_params * peer["real_tokens"] / t_peer / gemm, 1),
                      same_model_min_cosine=round(float(cosine.min()), 4))
        out["encode_vs_llm2vec"] = round(detail["ours_tokens_per_s"] / detail["llm2vec_tokens_per_s"], 3)
        detail["eager_vs_llm2vec"] = round(detail["ours_eager_tokens_per_s"] / detail["llm2vec_tokens_per_s"], 3)
    out["detail"]["encode"] = detail
    out["detail"]["padding"] = {**rows.padding_waste(eager, texts, batch),
                                "cost_by_length": rows.cost_by_length(eager, n_params, gemm, batch)}
    out["padding_waste"] = out["detail"]["padding"]["bucketed_percent"]


def vision_row(quick: bool, batch: int, steps: int, gemm: float, out: dict, skip_peer: bool, attn: str) -> None:
    from llm2clip.model import LLM2CLIP, ModelConfig

    torch.manual_seed(0)
    vit = dict(hidden=256, layers=4, heads=4, image=64) if quick else {}
    model = LLM2CLIP(rows.vision_model(**vit, attn=attn), 768, ModelConfig(embed_dim=512))
    pixels, vectors = torch.randn(batch, 3, model.vision.config.image_size, model.vision.config.image_size), \
        torch.randn(batch, 768)
    step = rows.stage2_step(model, pixels, lambda: vectors)
    ours = rows.time_step(step, steps)
    peer = None if skip_peer or quick else run_peer("open_clip", "peer_open_clip.py", batch, steps)
    t_ours = ours["seconds"]
    detail = {"batch": batch, "attn_implementation": attn, "ours_seconds": ours["all_seconds"],
              "ours_images_per_s": round(batch / t_ours, 2), "ours_flops_per_step": ours["flops_per_step"],
              "flops": "torch.utils.flop_counter.FlopCounterMode, one step (forward + backward)"}
    out["vision_step_mfu"] = round(100 * ours["flops_per_step"] / t_ours / gemm, 1)
    out["vision_step_vs_open_clip"] = None
    if peer:
        for kind in ("vision", "clip"):
            detail[f"open_clip_{kind}_images_per_s"] = round(batch / peer[kind]["seconds"], 2)
            detail[f"open_clip_{kind}_seconds"] = peer[kind]["all_seconds"]
            rate = peer[kind]["flops_per_step"] / peer[kind]["seconds"]
            detail[f"open_clip_{kind}_mfu"] = round(100 * rate / gemm, 1)
        detail["open_clip_versions"] = peer["versions"]
        out["vision_step_vs_open_clip"] = round(peer["vision"]["seconds"] / t_ours, 3)
        detail["vs_open_clip_full_clip_step"] = round(peer["clip"]["seconds"] / t_ours, 3)
    out["detail"]["vision_step"] = detail


def stage2_llm_rows(tmp: Path, tokenizer_dir: Path, quick: bool, batch: int, steps: int, out: dict,
                    words: tuple[int, int] = (180, 220)) -> None:
    """Cached step time across LLM sizes (the LLM is not in the loop: flat) and online vs cached at
    the largest, whose caption-embedding FLOPs are ~2x the vision step's, as in the paper's setting."""
    from models import save_random_llama

    from llm2clip.model import LLM2CLIP, ModelConfig
    from llm2clip.stage2.data import Caption, LiveVectors

    width, layer_counts = (256, (1, 2, 4)) if quick else (960, (4, 16, 32))
    texts = rows.caption_texts(batch, *words, seed=1)  # long captions: the ones LLM2CLIP adds
    captions = [Caption("long_caption", t) for t in texts]
    vision = rows.vision_model(**(dict(hidden=256, layers=4, heads=4, image=64) if quick else {}))
    pixels = torch.randn(batch, 3, vision.config.image_size, vision.config.image_size)
    cached_steps, sizes, online = [], [], None
    for layers in layer_counts:
        folder = tmp / f"llm{layers}"
        llm = save_random_llama(folder, tokenizer_dir, width, layers)
        sizes.append(sum(p.numel() for n, p in llm.named_parameters() if "embed_tokens" not in n))
        del llm
        embedder = rows.load_embedder(folder)
        cache = embedder.encode(texts).to(torch.bfloat16)  # what the cache stores
        model = LLM2CLIP(vision, width, ModelConfig(embed_dim=512))
        cached_steps.append(rows.stage2_step(model, pixels, lambda v=cache: v.float()))
        if layers == layer_counts[-1]:
            live = LiveVectors(embedder)
            online_step = rows.stage2_step(model, pixels, lambda live=live: live(None, captions))
            online = rows.time_step(online_step, 2, count_flops=False)["seconds"]
    from torch.utils.flop_counter import FlopCounterMode

    cached_flops = []
    for step in cached_steps:  # warm-up, counting each size's FLOPs: the LLM's size must not show
        with FlopCounterMode(display=False) as counter:
            step()
        cached_flops.append(counter.get_total_flops())
    times: list[list[float]] = [[] for _ in cached_steps]
    for _ in range(steps):  # round-robin, so drift over the run lands on every size alike
        for i, step in enumerate(cached_steps):
            start = time.perf_counter()
            step()
            times[i].append(time.perf_counter() - start)
    cached = [min(t) for t in times]  # best of `steps`, as time_step
    out["cached_vs_online"] = round(online / cached[-1], 3)
    out["llm_size_flatness"] = round(max(cached) / min(cached), 3)
    tokens = sum(len(ids) for ids, _ in embedder.tokenize_texts(texts)) / len(texts)
    out["detail"]["stage2_llm"] = {"llm_width": width, "llm_layers": list(layer_counts), "non_embedding_params": sizes,
                                   "cached_step_s": [round(c, 3) for c in cached],
                                   "cached_all_s": [[round(x, 3) for x in t] for t in times],
                                   "cached_flops_per_step": cached_flops,
                                   "online_step_s": round(online, 3),
                                   "online_llm_params": sizes[-1], "batch": batch,
                                   "caption_tokens_mean": round(tokens, 1), "caption_words": f"{words[0]}-{words[1]}"}


def memory_rows(tmp: Path, texts: list[str], quick: bool, size: str, out: dict) -> None:
    """QLoRA over bf16-LoRA peak step memory, CC fine-tuning and LLaVA fine-tuning, each variant in a
    fresh subprocess (benchmarks/bench_stage1.py and bench_llava.py)."""
    import bench_stage1
    from models import save_random_llama

    hidden, layers = map(int, size.split("x"))
    folder = tmp / f"mem-{size}"
    save_random_llama(folder, tmp / "data/tokenizer", hidden, layers)
    cc = bench_stage1.bench_memory(folder, texts, 1)  # one pair: weights, not activations, set the peak
    out["qlora_memory_ratio_cc"] = cc["qlora_over_lora_step_peak_mib"]
    out["detail"]["memory_cc"] = {"model": size, **cc}
    import shutil

    shutil.rmtree(folder)  # a 1.1B checkpoint is 4.4 GB
    if not (ROOT / "runs/tiny/vision_tower/config.json").is_file():
        out["qlora_memory_ratio_llava"] = None
        out["notes"]["qlora_memory_ratio_llava"] = "needs the main job's run: bash scripts/train_llm2clip.sh"
        return
    llava_json = tmp / "llava.json"
    cmd = [sys.executable, str(HERE / "bench_llava.py"), "--memory-only", "--memory-sizes", size, "--batch", "1",
           "--memory-steps", "1", "--out", str(llava_json)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0 or "qlora_over_lora_step_peak_mib" not in json.loads(llava_json.read_text())["memory"][0]:
        out["qlora_memory_ratio_llava"] = None
        out["notes"]["qlora_memory_ratio_llava"] = f"LLaVA memory run failed: {done.stderr.strip()[-300:]}"
        return
    entry = json.loads(llava_json.read_text())["memory"][0]
    out["qlora_memory_ratio_llava"] = entry["qlora_over_lora_step_peak_mib"]
    out["detail"]["memory_llava"] = entry


def data_rows(tmp: Path, quick: bool, skip_peer: bool, out: dict) -> None:
    """Issue #19's rows (benchmarks/bench_data.py): each figure, or null with the reason."""
    import bench_data

    rows_ = {"cache": (("cache_lookups_per_s", "cache_first_step_s", "cache_index_bytes_per_key"),
                       lambda: bench_data.cache_rows(tmp, n=100_000 if quick else 1_000_000)),
             "loader": (("loader_vs_open_clip",),
                        lambda: bench_data.loader_vs_open_clip(tmp, None if skip_peer else ensure("open_clip"))),
             "memory_vs_dataset_size": (("data_rss_ratio",), lambda: bench_data.rss_ratio(
                 tmp, sizes=(1_000, 20_000) if quick else (10_000, 200_000), steps=10 if quick else 60))}
    for name, (keys, measure) in rows_.items():
        try:
            row = measure()
        except Exception as e:  # one row failing leaves the others' figures
            for key in keys:
                out[key] = None
                out["notes"][key] = f"{type(e).__name__}: {str(e)[:300]}"
            continue
        out["detail"][name] = row.pop("detail")
        out.update(row)
        if row.get("loader_vs_open_clip", 0) is None:
            out["notes"]["loader_vs_open_clip"] = "peer skipped (--no-peers)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models, 64 texts: a smoke run of every row")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4, help="timed vision steps per side (the best counts)")
    parser.add_argument("--stage2-batch", type=int, default=8, help="batch of the cached/online and LLM-size rows")
    parser.add_argument("--vision-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="our vision step's attention (stage2.vision.attn_implementation)")
    parser.add_argument("--stage2-steps", type=int, default=8, help="timed cached steps per LLM size (best counts)")
    # 180-220 words (~283 tokens): the 354M LLM's forward is then ~2x the ViT-B/16 step's FLOPs, the
    # paper's ratio (Llama-3-8B against ViT-L/14-336)
    parser.add_argument("--stage2-caption-words", default="180-220", help="caption length range of the online row")
    parser.add_argument("--memory-size", default="2048x22", help="hidden x layers of the QLoRA/LoRA memory model")
    parser.add_argument("--no-peers", action="store_true", help="skip llm2vec/open_clip (their ratios become null)")
    parser.add_argument("--rows", default="encode,vision,stage2,memory,data")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.steps, args.stage2_steps, args.memory_size = 64, 1, 1, "256x2"
    torch.set_num_threads(2)
    from plots import plot, print_table

    from llm2clip.data.synth import SynthConfig, synthesize

    out_dir = ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"notes": {}, "detail": {"threads": torch.get_num_threads(), "torch": torch.__version__}}
    from llm2clip.precision import bf16_pays

    # bf16 autocast where this CPU runs it natively (AVX512-BF16/AMX); on an AVX2-only CPU PyTorch emulates
    # bf16 far below fp32, so both sides of every pair run fp32 and MFU is against the fp32 GEMM
    COMPUTE["dtype"] = "bf16" if bf16_pays("cpu") else "fp32"
    # emulated bf16 runs ~0.3 GFLOP/s: a 2048^3 probe would take a minute per repeat, 512^3 tells the same rate
    bf16_n = 2048 if COMPUTE["dtype"] == "bf16" else 512
    result["gemm_bf16_gflops"] = round(rows.gemm_flops_per_s(torch.bfloat16, n=bf16_n, repeats=3) / 1e9, 1)
    fp32_gflops = round(rows.gemm_flops_per_s(torch.float32, repeats=15) / 1e9, 1)
    gemm = (result["gemm_bf16_gflops"] if COMPUTE["dtype"] == "bf16" else fp32_gflops) * 1e9
    result["detail"].update(compute_dtype=COMPUTE["dtype"], gemm_fp32_gflops=fp32_gflops,
                            cpu_capability=torch.backends.cpu.get_cpu_capability(),
                            mfu_reference=f"best of 2048^3 {COMPUTE['dtype']} torch.matmul in this run")
    if COMPUTE["dtype"] == "fp32":
        result["notes"]["compute_dtype"] = (f"no native bf16 on this CPU ({result['detail']['cpu_capability']}; bf16 "
                                            f"GEMM {result['gemm_bf16_gflops']} GFLOP/s at 512^3 vs fp32 "
                                            f"{fp32_gflops} at 2048^3): "
                                            "both sides of every pair ran fp32, MFU is against the fp32 GEMM")
    wanted = set(args.rows.split(","))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        synthesize(SynthConfig(num_images=40), tmp / "data", progress=False)  # the shapes-world tokenizer
        texts = rows.caption_texts(args.texts)
        result["texts_file"] = str(tmp / "texts.json")
        Path(result["texts_file"]).write_text(json.dumps(texts))
        if "encode" in wanted:
            from models import save_random_llama

            hidden, layers = (256, 2) if args.quick else (768, 12)  # 768 x 12: ~85M non-embedding parameters
            save_random_llama(tmp / "llm", tmp / "data/tokenizer", hidden, layers)
            encode_row(tmp / "llm", texts, args.batch, gemm, result, {"skip": args.no_peers})
            print(f"[bench] encode done at {time.perf_counter() - started:.0f} s", flush=True)
        if "vision" in wanted:
            vision_row(args.quick, args.batch, args.steps, gemm, result, args.no_peers, args.vision_attn)
            print(f"[bench] vision done at {time.perf_counter() - started:.0f} s", flush=True)
        if "stage2" in wanted:
            words = tuple(map(int, args.stage2_caption_words.split("-")))
            stage2_llm_rows(tmp, tmp / "data/tokenizer", args.quick, args.stage2_batch, args.stage2_steps, result,
                            words)
            print(f"[bench] stage 2 done at {time.perf_counter() - started:.0f} s", flush=True)
        if "memory" in wanted and COMPUTE["dtype"] == "fp32" and not args.quick:
            # the bf16-LoRA baseline computes in bf16, which this CPU emulates (its backward mm ran at
            # 0.28 GFLOP/s): one 1.1B step would outlast the whole suite
            why = "bf16-LoRA baseline needs bf16 compute, which this CPU emulates; run on an AVX512-BF16/AMX CPU or GPU"
            result.update(qlora_memory_ratio_cc=None, qlora_memory_ratio_llava=None)
            result["notes"].update(qlora_memory_ratio_cc=why, qlora_memory_ratio_llava=why)
        elif "memory" in wanted:
            memory_rows(tmp, texts, args.quick, args.memory_size, result)
            print(f"[bench] memory done at {time.perf_counter() - started:.0f} s", flush=True)
        if "data" in wanted:
            result["detail"]["data_pipeline"] = rows.data_pipeline()
            data_rows(tmp, args.quick, args.no_peers, result)
            print(f"[bench] data done at {time.perf_counter() - started:.0f} s", flush=True)
    del result["texts_file"]
    for key in ("encode_vs_llm2vec", "vision_step_vs_open_clip"):
        if key in result and result[key] is None:  # --quick compares no open_clip step: its ViT is smaller
            result["notes"].setdefault(key, "peer skipped (--no-peers, or --quick for the vision step)")
    result["detail"]["wall_s"] = round(time.perf_counter() - started)
    detail = result.pop("detail")
    (out_dir / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "bench_detail.json").write_text(json.dumps(detail, indent=1) + "\n")
    print_table(result, detail)
    plot(result, detail, out_dir)


if __name__ == "__main__":
    main()
