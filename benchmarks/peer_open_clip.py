"""Peer side of the vision-step row: open_clip's ViT-B-16 training step, run inside the open_clip venv.

    runs/bench/peers/open_clip/bin/python benchmarks/peer_open_clip.py BATCH STEPS bf16|fp32

Two steps, both as open_clip's training loop runs them (autocast as on our side, AdamW with betas (0.9, 0.98),
eps 1e-6, ClipLoss, logit-scale clamp):
- `vision`: the image tower against fixed text features, the same work our stage-2 step does
  (our text side is a small adapter over cached LLM vectors);
- `clip`: the full CLIP step (image and text towers), what an open_clip user pays per image.
FLOPs of one step each from torch.utils.flop_counter.FlopCounterMode. Prints one JSON line.
"""

import json
import math
import sys
import time

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.utils.flop_counter import FlopCounterMode


def make_step(model, params, pixels, text_side, bf16: bool):
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            image = F.normalize(model.encode_image(pixels), dim=-1)
            loss = loss_fn(image, text_side(), model.logit_scale.exp())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def measure(step, steps: int) -> dict:
    with FlopCounterMode(display=False) as counter:
        step()  # also the warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # best of `steps`, as on our side (benchmarks/rows.py time_step)
    return {"seconds": min(times), "all_seconds": times, "flops_per_step": counter.get_total_flops()}


def main(batch: int, steps: int, dtype: str) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-16", pretrained=None)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    pixels = torch.randn(batch, 3, 224, 224)
    fixed_text = F.normalize(torch.randn(batch, model.visual.output_dim), dim=-1)
    vision_params = [*model.visual.parameters(), model.logit_scale]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in vision_params:
        p.requires_grad_(True)
    result = {"vision": measure(make_step(model, vision_params, pixels, lambda: fixed_text, dtype == "bf16"), steps)}
    for p in model.parameters():
        p.requires_grad_(True)
    tokens = tokenizer([f"a photo of shape number {i}" for i in range(batch)])
    text = lambda: F.normalize(model.encode_text(tokens), dim=-1)  # noqa: E731
    result["clip"] = measure(make_step(model, list(model.parameters()), pixels, text, dtype == "bf16"), 1)
    result["vision_params"] = sum(p.numel() for p in model.visual.parameters())
    result["versions"] = {"torch": torch.__version__, "open_clip": open_clip.__version__}
    print(json.dumps(result))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
