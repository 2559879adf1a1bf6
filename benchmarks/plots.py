"""The benchmark's table (stdout) and PNG plots (runs/bench/*.png)."""

from __future__ import annotations

from pathlib import Path

# key -> (row label, goal as text, predicate on the figure)
GOALS = {
    "encode_vs_llm2vec": ("caption embedding (compiled) vs llm2vec", ">= 1.2x", lambda v: v >= 1.2),
    "encode_mfu": ("caption embedding MFU %", "", None),
    "vision_step_vs_open_clip": ("vision step vs open_clip (image tower)", ">= 1.1x", lambda v: v >= 1.1),
    "vision_step_mfu": ("vision step MFU %", "", None),
    "cached_vs_online": ("cached vs online stage 2", ">= 3x", lambda v: v >= 3.0),
    "llm_size_flatness": ("cached step, slowest/fastest LLM size", "<= 1.05", lambda v: v <= 1.05),
    "padding_waste": ("padding waste % (length-bucketed)", "< 10%", lambda v: v < 10),
    "qlora_memory_ratio_cc": ("QLoRA/LoRA step memory, CC", "<= 0.45x", lambda v: v <= 0.45),
    "qlora_memory_ratio_llava": ("QLoRA/LoRA step memory, LLaVA", "<= 0.45x", lambda v: v <= 0.45),
    "gemm_bf16_gflops": ("bf16 GEMM GFLOP/s (MFU reference where native)", "", None),
    # issue #19: stage 2 at real scale
    "data_rss_ratio": ("peak RSS, 200k over 10k samples (streamed)", "<= 1.10", lambda v: v <= 1.10),
    "loader_vs_open_clip": ("data loader images/s vs open_clip's wds", ">= 1.0x", lambda v: v >= 1.0),
    "cache_lookups_per_s": ("cache lookups/s, 1M keys, batches of 256", ">= 100k", lambda v: v >= 100_000),
    "cache_first_step_s": ("cache open to first batch, s", "<= 10", lambda v: v <= 10),
    "cache_index_bytes_per_key": ("cache key index bytes per key", "", None),
}


def verdict(key: str, value) -> str:
    check = GOALS[key][2]
    if value is None:
        return "not measured"
    return "" if check is None else ("met" if check(value) else "NOT met")


def print_table(result: dict, detail: dict) -> None:
    print(f"\n{'figure':<44} {'value':>10}  {'goal':<9} verdict")
    for key, (label, goal, _) in GOALS.items():
        if key in result:
            value = result[key]
            print(f"{label:<44} {'null' if value is None else value:>10}  {goal:<9} {verdict(key, value)}")
    if "eager_vs_llm2vec" in detail.get("encode", {}):
        e = detail["encode"]
        print(f"{'  eager (embedder.compile=false) vs llm2vec':<44} {e['eager_vs_llm2vec']:>10}  (compile + first "
              f"batch: {e['compile_and_first_batch_seconds']} s, once)")
    if "data_pipeline" in detail:
        d, v = detail["data_pipeline"], detail.get("vision_step", {}).get("ours_images_per_s")
        print(f"{'data pipeline images/s per worker':<44} {d['images_per_s_per_worker']:>10}  "
              f"{'> step':<9} {'' if v is None else ('met' if d['images_per_s_per_worker'] > v else 'NOT met')}")
    for key, why in result.get("notes", {}).items():
        print(f"  note {key}: {why}")
    print(f"(wall {detail.get('wall_s')} s; details in bench_detail.json)")


def plot(result: dict, detail: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pairs = []
    if "encode" in detail and "llm2vec_tokens_per_s" in detail["encode"]:
        e = detail["encode"]
        pairs.append(("caption embedding\n(tokens/s)", e["ours_tokens_per_s"], e["llm2vec_tokens_per_s"], "llm2vec"))
    if "vision_step" in detail and "open_clip_vision_images_per_s" in detail["vision_step"]:
        v = detail["vision_step"]
        pairs.append(("vision step\n(images/s)", v["ours_images_per_s"], v["open_clip_vision_images_per_s"],
                      "open_clip"))
    if pairs:
        fig, axes = plt.subplots(1, len(pairs), figsize=(4 * len(pairs), 3.5))
        for ax, (label, ours, peer, name) in zip(list(getattr(axes, "flat", [axes])), pairs, strict=True):
            ax.bar(["llm2clip", name], [ours, peer], color=["tab:blue", "tab:gray"])
            ax.set_title(f"{label}: {ours / peer:.2f}x")
        fig.tight_layout()
        written.append(out_dir / "peers.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if "stage2_llm" in detail:
        s = detail["stage2_llm"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        millions = [p / 1e6 for p in s["non_embedding_params"]]
        ax.plot(millions, s["cached_step_s"], "o-", label="cached (LLM not in the loop)")
        ax.plot([millions[-1]], [s["online_step_s"]], "s", color="tab:red", label="online (LLM in the loop)")
        ax.set_xlabel("LLM non-embedding parameters (M)")
        ax.set_ylabel("stage-2 step (s)")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / "stage2_llm_size.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    if "padding" in detail:
        cost = detail["padding"]["cost_by_length"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        lengths = [int(k) for k in cost]
        ax.plot(lengths, [cost[k]["seconds_per_caption"] * 1000 for k in cost], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("caption length (tokens)")
        ax.set_ylabel("ms per caption")
        ax.set_title(f"padding waste, bucketed: {detail['padding']['bucketed_percent']}%")
        fig.tight_layout()
        written.append(out_dir / "cost_by_length.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
