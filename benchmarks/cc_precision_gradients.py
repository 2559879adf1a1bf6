"""One CC step's LoRA gradients under bf16 autocast against fp32: same weights, same batch (issue #20,
docs/STAGE1.md part 4). It asks whether bf16 training steps are right, not whether they pay.

    python benchmarks/cc_precision_gradients.py [--run-dir runs/tiny] [--adapter runs/tiny/stage1/cc] [--batches 6]

Without `--adapter` LoRA starts as `stage1.cc` starts it, except B drawn at random (B = 0 would give A
no gradient); with it, the trained adapter is loaded trainable. Batches come from the preset's pair
sampler in its last phase (per-row directions, short<->long, text pairs). Per batch: both losses, the
smallest cosine between the two precisions' pooled vectors, and per LoRA tensor the gradients' cosine
(min, median) and relative error (median). bf16 runs even on a CPU without native bf16 (emulated, slow).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
import torch.nn.functional as F


def main() -> None:
    from llm2clip.config import load_config
    from llm2clip.embedder import CaptionEmbedder, load_backbone
    from llm2clip.losses import caption_contrastive_loss
    from llm2clip.stage1.cc import _embed_pairs
    from llm2clip.stage1.lora import add_lora
    from llm2clip.stage1.pairs import PairSampler, read_caption_groups, read_text_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--run-dir", default="runs/tiny")
    parser.add_argument("--adapter", default=None, help="a trained CC folder, loaded trainable")
    parser.add_argument("--batches", type=int, default=6)
    args = parser.parse_args()

    cfg = load_config(args.config, [f"run.out_dir={args.run_dir}"])
    cc = cfg.stage1.cc
    torch.manual_seed(0)
    backbone, tokenizer = load_backbone(replace(cfg.embedder, adapters=[], device="cpu",
                                                attn_implementation=cc.attn_implementation
                                                or cfg.embedder.attn_implementation))
    if args.adapter:
        from peft import PeftModel

        backbone = PeftModel.from_pretrained(backbone, args.adapter, is_trainable=True)
    else:
        backbone = add_lora(backbone, cc.lora, quantized=False, gradient_checkpointing=False)
        with torch.no_grad():
            for name, p in backbone.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    text_pairs = read_text_pairs(cc.text_pairs) if cc.text_pairs else []
    sampler = PairSampler(read_caption_groups(cc.data, cfg.data), text_pairs, long_long_fraction=cc.long_long_fraction,
                          translation_fraction=cc.translation_fraction, seed=0, task_seed=0, mixed_directions=True,
                          mixed_from_batch=0, short_long_from_batch=0, translation_instruction=None)
    rows = []
    for _ in range(args.batches):
        pairs = sampler.batch(cc.batch_size)
        out = {}
        for autocast in (False, True):
            embedder = CaptionEmbedder(backbone, tokenizer, replace(cfg.embedder, autocast=autocast, device="cpu"))
            embedder.train()
            backbone.zero_grad(set_to_none=True)
            queries, positives = _embed_pairs(embedder, embedder, pairs, False)  # [B, D] each
            loss = caption_contrastive_loss(queries, positives, None, scale=cc.scale)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None}
            out[autocast] = (loss.item(), grads, torch.cat([queries, positives]).detach())
        (loss32, g32, v32), (loss16, g16, v16) = out[False], out[True]
        cos = torch.tensor([F.cosine_similarity(g32[n].flatten(), g16[n].flatten(), dim=0).item() for n in g32])
        rel = torch.tensor([((g16[n] - g32[n]).norm() / g32[n].norm()).item() for n in g32])
        rows.append({"kind": pairs[0].kind, "loss_fp32": round(loss32, 4), "loss_bf16": round(loss16, 4),
                     "vector_cos_min": round(F.cosine_similarity(v32, v16).min().item(), 5),
                     "grad_cos_min": round(cos.min().item(), 4), "grad_cos_median": round(cos.median().item(), 4),
                     "grad_rel_err_median": round(rel.median().item(), 4)})
    print(json.dumps({"adapter": args.adapter, "cpu": torch.backends.cpu.get_cpu_capability(), "batches": rows},
                     indent=1))


if __name__ == "__main__":
    main()
