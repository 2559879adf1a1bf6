"""Where a stage-1 embedder loses the detail short↔long retrieval needs: per layer of the LLM, the mean-
pooled hidden states (the embedder's own pooling over text tokens) as they are, and after a linear map
trained for short↔long retrieval (a diagnostic for issue #20's short↔long CRA).

    python benchmarks/pooled_layer_probe.py [--embedder runs/tiny/stage1/cc] [--raw]
        [--model LM] [--train runs/tiny/data/train.jsonl] [--test runs/tiny/data/test.jsonl] [--train-images 9600]

Per layer l (0 = the token embeddings, i.e. a bag of words; the last = the embedder's output, which must
reproduce `llm2clip stage1 eval-cra`'s short_long): `as_is`, the cross-set top-1 of the pooled vectors
(mean of both directions, %, as eval-cra scores it), and `linear`, the same after one linear map per side
(standardised inputs, InfoNCE on the training split's short/long pairs, batch 256, AdamW 1e-3, fixed
steps and seed): how much of the retrieval the layer's pooled vector holds for a linear reader.
`--raw` drops the embedder's adapters (the LM before CC). Prints JSON (docs/STAGE1.md).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


@torch.inference_mode()
def layer_features(embedder, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """-> [N, L + 1, D]: per text, each layer's hidden states mean-pooled over the text tokens."""
    embedder.model.eval()
    chunks = []
    items = embedder.tokenize_texts(texts)
    for start in range(0, len(items), batch_size):
        batch = embedder.collate(items[start:start + batch_size])
        with embedder._autocast():
            states = embedder.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    output_hidden_states=True).hidden_states  # L + 1 x [B, T, D]
        mask = batch["pool_mask"].unsqueeze(-1).float()  # [B, T, 1]
        chunks.append(torch.stack([(h.float() * mask).sum(1) / mask.sum(1) for h in states], dim=1))
    return torch.cat(chunks)


def linear_probe(train_a: torch.Tensor, train_b: torch.Tensor, test_a: torch.Tensor, test_b: torch.Tensor,
                 steps: int = 3000, batch_size: int = 256, seed: int = 0) -> float:
    """Cross-set top-1 (%) on the test pairs after a linear map per side trained with InfoNCE on the train
    pairs (row i of a and of b describe one image)."""
    from llm2clip.stage1.cra import cross_set_accuracy

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    stats = [(x.mean(0), x.std(0) + 1e-6) for x in (train_a, train_b)]
    za, zb = ((x - m) / s for x, (m, s) in zip((train_a, train_b), stats, strict=True))
    dim = train_a.shape[1]
    map_a, map_b = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, dim)
    log_scale = torch.nn.Parameter(torch.tensor(3.0))
    opt = torch.optim.AdamW([*map_a.parameters(), *map_b.parameters(), log_scale], lr=1e-3)
    target = torch.arange(min(batch_size, len(za)))
    for _ in range(steps):
        idx = torch.randperm(len(za), generator=gen)[:len(target)]
        logits = log_scale.exp() * F.normalize(map_a(za[idx]), dim=-1) @ F.normalize(map_b(zb[idx]), dim=-1).T
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        (ma, sa), (mb, sb) = stats
        return cross_set_accuracy(map_a((test_a - ma) / sa), map_b((test_b - mb) / sb))


def main() -> None:
    from llm2clip.embedder import CaptionEmbedder
    from llm2clip.stage1.cra import cross_set_accuracy

    parser = argparse.ArgumentParser()
    parser.add_argument("--embedder", default="runs/tiny/stage1/cc")
    parser.add_argument("--raw", action="store_true", help="without the embedder's adapters (the LM before CC)")
    parser.add_argument("--model", default=None, help="another backbone under the embedder's pooling and "
                        "instruction (with --raw: an LM before CC, e.g. a wider one)")
    parser.add_argument("--train", default="runs/tiny/data/train.jsonl")
    parser.add_argument("--test", default="runs/tiny/data/test.jsonl")
    parser.add_argument("--train-images", type=int, default=9600)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args()
    overrides = {"adapters": []} if args.raw else {}
    if args.model:
        overrides["model"] = args.model
    embedder = CaptionEmbedder.from_pretrained(args.embedder, **overrides)

    def captions(path: str, limit: int | None = None) -> tuple[list[str], list[str]]:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f][:limit]
        return [r["short_caption"] for r in rows], [r["long_caption"] for r in rows]

    train, test = captions(args.train, args.train_images), captions(args.test)
    (train_s, train_l), (test_s, test_l) = ([layer_features(embedder, t) for t in pair] for pair in (train, test))
    check = 64  # a sample suffices to tie the last layer to what stage 2 reads; all would encode twice
    if not torch.allclose(test_s[:check, -1], embedder.encode(test[0][:check]), atol=1e-4):
        raise AssertionError("the last layer's pooled states differ from CaptionEmbedder.encode")
    layers = {f"layer {i}": {"as_is": round(cross_set_accuracy(test_s[:, i], test_l[:, i]), 2),
                             "linear": round(linear_probe(train_s[:, i], train_l[:, i], test_s[:, i], test_l[:, i],
                                                          steps=args.steps), 2)}
              for i in range(test_s.shape[1])}
    print(json.dumps({"embedder": args.embedder, "model": embedder.cfg.model, "adapters": not args.raw,
                      "train_images": len(train_s), "test_images": len(test_s), "layers": layers}))


if __name__ == "__main__":
    main()
