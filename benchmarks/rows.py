"""Our side of each benchmark row (the driver is benchmarks/__main__.py; peers run in their own venvs).

Every function here measures one figure on inputs the driver built, in this process, and returns a dict
of plain numbers. FLOPs: 2*N per real token for LLM encoding (N = non-embedding parameters, attention
scores not counted), FlopCounterMode on one step for training steps.
"""

from __future__ import annotations

import io
import random
import time
from pathlib import Path

import torch

# Caption-like texts: words of the shapes world plus filler, so the tokenizer sees realistic pieces.
_WORD_TEXT = """a the small large red green blue yellow purple orange circle square triangle star hexagon
left right top bottom corner center near beside above below striped dotted shiny matte image shows
there is one two three with and of on in at its pale dark bright outline"""
WORDS = _WORD_TEXT.split()


def caption_texts(n: int = 512, low: int = 10, high: int = 200, seed: int = 0) -> list[str]:
    """n seeded caption-like texts of low..high words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + "." for _ in range(n)]


def gemm_flops_per_s(dtype: torch.dtype = torch.bfloat16, n: int = 2048, repeats: int = 7) -> float:
    """Best rate of an n x n x n matmul over `repeats`: this machine's practical peak for `dtype` (steps
    count at their best of N too, so MFU compares best with best)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def non_embedding_params(folder: Path) -> int:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(folder)
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)


def load_embedder(folder: Path, **changes):
    from llm2clip.embedder import CaptionEmbedder, EmbedderConfig

    return CaptionEmbedder.load(EmbedderConfig(model=str(folder), device="cpu", max_length=512, instruction="",
                                               **changes))


def encode_round(embedder, texts: list[str], batch: int) -> float:
    start = time.perf_counter()
    embedder.encode(texts, batch_size=batch)
    return time.perf_counter() - start


def padding_waste(embedder, texts: list[str], batch: int) -> dict:
    """Pad tokens as a percent of all tokens processed, with our length-sorted batches and with batches
    in input order (what an encoder without bucketing pays)."""
    lengths = [len(ids) for ids, _ in embedder.tokenize_texts(texts)]

    def waste(order: list[int]) -> float:
        padded = sum(max(lengths[i] for i in order[s:s + batch]) * len(order[s:s + batch])
                     for s in range(0, len(order), batch))
        return 100 * (padded - sum(lengths)) / padded

    bucketed = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # what CaptionEmbedder.encode does
    return {"bucketed_percent": round(waste(bucketed), 2), "input_order_percent": round(waste(list(range(len(texts))))),
            "real_tokens": sum(lengths)}


def cost_by_length(embedder, n_params: int, gemm: float, batch: int, lengths=(32, 128, 512)) -> dict:
    """Encode `batch` captions of exactly L tokens each: seconds per caption and MFU, per L."""
    vocab = [t for t in embedder.tokenizer.get_vocab().values() if t not in embedder.tokenizer.all_special_ids]
    rng = random.Random(0)
    out = {}
    for length in lengths:
        items = [([embedder.tokenizer.bos_token_id] + [rng.choice(vocab) for _ in range(length - 1)], length - 1)
                 for _ in range(batch)]
        batch_inputs = embedder.collate(items)
        with torch.inference_mode():
            embedder(**batch_inputs)  # warm-up
            start = time.perf_counter()
            embedder(**batch_inputs)
            seconds = time.perf_counter() - start
        out[str(length)] = {"seconds_per_caption": round(seconds / batch, 4),
                            "mfu_percent": round(100 * 2 * n_params * length * batch / seconds / gemm, 1)}
    return out


def vision_model(hidden=768, layers=12, heads=12, image=224, patch=16, attn="sdpa", act="gelu"):
    """ViT-B/16 as an HF CLIPVisionModel, with open_clip's ViT-B-16 activation (nn.GELU). HF's CLIP
    default is OpenAI's quick_gelu (x*sigmoid(1.702x)), which open_clip names ViT-B-16-quickgelu: its
    elementwise passes took 13.5% of our step's time against GELU's 2.2% (benchmarks/profile_vision.py)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image, patch_size=patch, hidden_act=act)
    config._attn_implementation = attn
    return CLIPVisionModel(config)


def stage2_step(model, pixels: torch.Tensor, text_side):
    """One training step as llm2clip.stage2.train runs it: bf16 autocast where it pays (else fp32),
    ClipLoss, fused AdamW with
    open_clip's groups, logit-scale clamp. `text_side()` returns the batch's LLM vectors [B, D]."""
    from llm2clip.losses import ClipLoss
    from llm2clip.precision import bf16_autocast
    from llm2clip.stage2.train import TrainConfig, _optimizer

    optimizer, _ = _optimizer(model, TrainConfig(steps=10, lr=1e-5, warmup_steps=0))
    loss_fn = ClipLoss()

    def step():
        with bf16_autocast("cpu"):
            image, text, scale, _ = model(pixels, text_side())
            loss = loss_fn(image, text, scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale()

    return step


def time_step(step, steps: int, count_flops: bool = True) -> dict:
    """Best (minimum) seconds of `steps` calls after one warm-up call (which also counts the FLOPs):
    on a shared machine interference only adds time, so the minimum is the step's own cost."""
    from torch.utils.flop_counter import FlopCounterMode

    if count_flops:
        with FlopCounterMode(display=False) as counter:
            step()
    else:
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "all_seconds": [round(t, 3) for t in times],
            "flops_per_step": counter.get_total_flops() if count_flops else None}


def data_pipeline(n: int = 64, size: int = 256, image_size: int = 224) -> dict:
    """Images/s one data worker decodes (JPEG bytes -> PIL) and preprocesses (CLIPImageProcessor) into
    the [3, 224, 224] tensor the step takes: the rate a DataLoader worker sustains."""
    from PIL import Image

    from llm2clip.data.images import load_image, make_image_processor

    rng = random.Random(0)
    blobs = []
    for _ in range(n):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size * size // 64)] * 64)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    processor = make_image_processor(image_size)
    processor(images=[load_image(blobs[0], 10**8)], return_tensors="pt")  # warm-up
    start = time.perf_counter()
    for blob in blobs:
        processor(images=[load_image(blob, 10**8)], return_tensors="pt")["pixel_values"]
    seconds = time.perf_counter() - start
    return {"images_per_s_per_worker": round(n / seconds, 1), "source": f"{size}px JPEG", "threads": 1}
