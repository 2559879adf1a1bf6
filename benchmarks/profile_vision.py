"""Where a ViT-B/16 training step spends its time, ours against open_clip's (torch.profiler, by op).

    .venv/bin/python benchmarks/profile_vision.py ours [gelu|quick_gelu]
    runs/bench/peers/open_clip/bin/python benchmarks/profile_vision.py open_clip

One warm-up step, then one profiled step (batch 8, fp32 unless LLM2CLIP_CPU_BF16=1 on our side). Prints
one JSON line: the step's seconds and the top ops by self CPU time, grouped as GEMM / attention /
elementwise+norm / optimizer / other. Not a test.
"""

import json
import sys
import time

import torch
import torch.nn.functional as F

GROUPS = {"gemm": ("addmm", "mm", "bmm", "matmul", "linear"), "attention": ("attention", "softmax", "baddbmm"),
          "optimizer": ("adam", "_foreach", "fused"),
          "elementwise+norm": ("gelu", "sigmoid", "mul", "add", "layer_norm", "native_layer_norm", "copy_", "clone",
                               "div", "sub", "where", "neg", "cat", "contiguous", "transpose", "permute")}


def group(name: str) -> str:
    low = name.lower()
    for key, parts in GROUPS.items():
        if any(p in low for p in parts):
            return key
    return "other"


def ours_step(batch: int, act: str):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import rows

    from llm2clip.model import LLM2CLIP, ModelConfig

    model = LLM2CLIP(rows.vision_model(act=act), 768, ModelConfig(embed_dim=512))
    vectors = torch.randn(batch, 768)
    return rows.stage2_step(model, torch.randn(batch, 3, 224, 224), lambda: vectors)


def open_clip_step(batch: int):
    import open_clip
    from open_clip.loss import ClipLoss

    model = open_clip.create_model("ViT-B-16", pretrained=None)
    params = [*model.visual.parameters(), model.logit_scale]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer, loss_fn = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6), ClipLoss()
    pixels, text = torch.randn(batch, 3, 224, 224), F.normalize(torch.randn(batch, 512), dim=-1)

    def step():
        loss_fn(F.normalize(model.encode_image(pixels), dim=-1), text, model.logit_scale.exp()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(side: str, act: str = "gelu", batch: int = 8) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    step = ours_step(batch, act) if side == "ours" else open_clip_step(batch)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    groups: dict[str, float] = {}
    for e in ops:
        groups[group(e.key)] = groups.get(group(e.key), 0) + e.self_cpu_time_total
    print(json.dumps({"side": side, "act": act if side == "ours" else "gelu", "batch": batch,
                      "seconds": round(seconds, 2),
                      "share_by_group": {k: round(v / total, 3) for k, v in sorted(groups.items())},
                      "top_ops": [[e.key, e.count, round(e.self_cpu_time_total / total, 3)] for e in ops[:12]]}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
