"""Does torch.compile pay for stage-1 CC training on the tiny preset? Eager vs compiled step time.

    python benchmarks/cc_step_compile.py [--config configs/tiny.yaml] [--steps 20] [--skip 700]

Builds the preset's CC model (the tiny LM from stage1.pretrain with its LoRA), draws the batches the
preset draws after `--skip` batches (the mixed short<->long phase), and times `--steps` training steps
eagerly, then compiles the LM (`dynamic=True`, as `embedder.compile` does for encoding) and reports
the compile-and-warm-up time and the compiled step time. Needs a finished `stage1/lm`. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip", type=int, default=700)
    args = parser.parse_args()

    from llm2clip.config import load_config
    from llm2clip.embedder import CaptionEmbedder, load_backbone
    from llm2clip.losses import caption_contrastive_loss
    from llm2clip.stage1.cc import _embed_pairs
    from llm2clip.stage1.lora import add_lora
    from llm2clip.stage1.pairs import PairSampler, read_caption_groups, read_text_pairs

    cfg = load_config(args.config, args.overrides)
    cc = cfg.stage1.cc
    sampler = PairSampler(read_caption_groups(cc.data, cfg.data), read_text_pairs(cc.text_pairs),
                          long_long_fraction=cc.long_long_fraction, translation_fraction=cc.translation_fraction,
                          seed=0, task_seed=0, mixed_directions=cc.mixed_directions,
                          mixed_from_batch=cc.mixed_from_step, short_long_from_batch=cc.short_long_from_step)
    for _ in range(args.skip):
        sampler.batch(cc.batch_size)
    batches = [sampler.batch(cc.batch_size) for _ in range(2 * (args.warmup + args.steps))]

    emb_cfg = replace(cfg.embedder, attn_implementation=cc.attn_implementation or cfg.embedder.attn_implementation)
    backbone, tokenizer = load_backbone(emb_cfg, torch.device("cpu"))
    backbone = add_lora(backbone, cc.lora, quantized=False, gradient_checkpointing=False)
    embedder = CaptionEmbedder(backbone, tokenizer, cfg.embedder).train()
    optimizer = torch.optim.AdamW([p for p in embedder.parameters() if p.requires_grad], lr=cc.lr)

    def run(chunk) -> float:
        start = time.perf_counter()
        for pairs in chunk:
            queries, positives = _embed_pairs(embedder, embedder, pairs, False)  # [B, D] each
            caption_contrastive_loss(queries, positives, None, scale=cc.scale).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    w, n = args.warmup, args.steps
    run(batches[:w])
    eager = run(batches[w:w + n]) / n
    embedder.model = torch.compile(embedder.model, dynamic=True)
    compile_and_warmup = run(batches[w + n:2 * w + n])
    compiled = run(batches[2 * w + n:]) / n
    print(json.dumps({"threads": torch.get_num_threads(), "eager_s_per_step": round(eager, 3),
                      "compiled_s_per_step": round(compiled, 3), "speedup": round(eager / compiled, 2),
                      "compile_and_warmup_s": round(compile_and_warmup, 1),
                      "break_even_steps": round(compile_and_warmup / max(eager - compiled, 1e-9)),
                      "cc_steps": cc.steps}, indent=1))


if __name__ == "__main__":
    main()
