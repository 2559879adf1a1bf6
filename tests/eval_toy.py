"""The toy world of tests/test_eval_format_metrics.py: a model whose image feature is its normalised mean
RGB and whose caption feature is the RGB triple the caption names, brute-force metric references, and
writers for the files each benchmark layout holds."""
from __future__ import annotations

import io
import json
import math
import random
import re
import tarfile
import zlib
from functools import cache
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip.data.images import make_image_processor
from llm2clip.evaluation.protocols import EvalOptions

KS = (1, 3, 5)
OPTIONS = EvalOptions(batch_size=4, recall_k=KS, progress=False)
EPS = 1e-5  # the smallest score gap the data may hold between a positive and a negative (float32-safe)
TRIPLE = re.compile(r"(\d+) (\d+) (\d+)")
TAILS = ["on a plain card", "seen up close", "in soft light", "a flat square"]
PALETTE = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (210, 200, 40), (40, 190, 200), (200, 50, 190)]
IMAGENET = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
            "n01860187": "black swan", "n03042490": "cliff dwelling", "n15075141": "toilet paper"}
FOLDERS = ["azure_lake", "brick_wall", "cactus", "dune", "ember", "fern"]  # class index order (sorted)
CLASSNAMES = [f.replace("_", " ") for f in FOLDERS]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of the {c}.", "art of the {c}."]
OTHER = (-100, -100, -100)  # any class a test does not use: scores below every image


def unit(v) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


image_vec = unit  # an RGB triple -> the image feature


@cache  # ImageNet's 80,000 prompts are encoded by the protocol and by the reference
def text_vec(text: str, classes: tuple[tuple[str, tuple], ...] = ()) -> list[float]:
    """The caption's RGB triple, else the colour of the class (name, colour) it names with a per-text jitter."""
    if m := TRIPLE.search(text):
        return unit([int(g) for g in m.groups()])
    base = next((c for name, c in classes if name in text), OTHER)
    h = zlib.crc32(text.encode())
    return unit([b + 30 * (((h >> (8 * i)) & 255) / 127.5 - 1) for i, b in enumerate(base)])


class ToyModel:
    name, pretrained = "toy", "colour"

    def __init__(self, classes: tuple = ()):
        self.classes = classes
        self.processor = make_image_processor(16)
        self.processor.image_mean, self.processor.image_std = [0, 0, 0], [1, 1, 1]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] in [0, 1] -> [B, 3]
        rgb = (pixels.float().mean(dim=(2, 3)) * 255).round()
        return torch.tensor([image_vec(c) for c in rgb.tolist()])

    def encode_texts(self, texts: list[str]) -> torch.Tensor:  # [B, 3]
        return torch.tensor([text_vec(t, self.classes) for t in texts])


# -- brute-force references --------------------------------------------------------------------------

def untied(gaps) -> None:  # no near tie that float32 rounding or topk's tie order could decide
    if any(abs(g) <= EPS for g in gaps):
        raise ValueError("the generated data holds a near tie")


def recall_reference(images: list, texts: list[tuple[str, set[int]]], ks=KS) -> dict[str, float]:
    """images: RGB per image; texts: (caption, indices of its images). A query hits at k when one of its
    positives has fewer than k candidates scoring strictly above it (the data holds no near ties)."""
    ivec, tvec = [image_vec(c) for c in images], [text_vec(t) for t, _ in texts]
    s = [[dot(t, i) for i in ivec] for t in tvec]  # [T][I]
    t2i, i2t = [], []
    for row, (_, pos) in zip(s, texts, strict=True):
        untied(row[p] - x for p in pos for j, x in enumerate(row) if j not in pos)
        t2i.append(min(sum(x > row[p] for x in row) for p in pos))
    for i in range(len(images)):
        col = [row[i] for row in s]
        pos = [t for t, (_, owners) in enumerate(texts) if i in owners]
        untied(col[p] - x for p in pos for u, x in enumerate(col) if u not in pos)
        i2t.append(min(sum(x > col[p] for x in col) for p in pos))
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = sum(r < k for r in t2i) / len(t2i)  # text -> image
        out[f"text_retrieval_recall@{k}"] = sum(r < k for r in i2t) / len(i2t)  # image -> text
    return out


def retrieval_reference(rows: list[tuple[tuple, list[str]]], folds: int = 1) -> dict[str, dict[str, float]]:
    """rows: (colour, captions) per image in the reader's order; folds > 1 adds the consecutive-fold mean."""
    out = {"": recall_reference([c for c, _ in rows], [(t, {i}) for i, (_, caps) in enumerate(rows) for t in caps])}
    if folds > 1:
        size = len(rows) // folds
        per = [retrieval_reference(rows[f * size:(f + 1) * size])[""] for f in range(folds)]
        out["1k"] = {k: sum(p[k] for p in per) / folds for k in per[0]}
    return out


def classification_reference(items: list[tuple[tuple, int]], classnames: list[str], templates: list[str],
                             classes: tuple) -> dict[str, float]:
    weights = []
    for name in classnames:  # prompt ensembling: mean of the unit template embeddings, renormalised
        embs = [text_vec(t.replace("{c}", name), classes) for t in templates]
        weights.append(unit([sum(e[d] for e in embs) / len(embs) for d in range(3)]))
    ranks, hits = [], {}
    for rgb, label in items:
        logits = [dot(image_vec(rgb), w) for w in weights]
        untied(x - logits[label] for c, x in enumerate(logits) if c != label)
        ranks.append(sum(x > logits[label] for x in logits))
        top = max(range(len(logits)), key=lambda c: (logits[c], -c))
        hits.setdefault(label, []).append(top == label)
    out = {"acc1": sum(r < 1 for r in ranks) / len(ranks)}
    if len(classnames) >= 5:
        out["acc5"] = sum(r < 5 for r in ranks) / len(ranks)
    out["mean_per_class_recall"] = sum(sum(h) / len(h) for h in hits.values()) / len(hits)
    return out


def check(got: dict, want: dict) -> None:
    assert got == {part: pytest.approx(metrics, abs=1e-6) for part, metrics in want.items()}


def nontrivial(metrics: dict[str, float]) -> None:
    t2i = [metrics[f"image_retrieval_recall@{k}"] for k in KS]
    assert 0 < t2i[0] < 1 and t2i[-1] > t2i[0]


# -- ground truth and files ----------------------------------------------------------------------------

def colours(rng: random.Random, n: int) -> list[tuple]:
    out = []
    while len(out) < n:
        c = tuple(rng.randint(25, 230) for _ in range(3))
        if all(dot(image_vec(c), image_vec(o)) < 0.99 for o in out):  # no two images nearly the same direction
            out.append(c)
    return out


def blend(a, b, w: float) -> tuple:
    return tuple(round((1 - w) * x + w * y) for x, y in zip(a, b, strict=True))


def captions(rng, cols, count=(1, 3), spread=(0.0, 0.75), word="colour") -> list[list[str]]:
    """Per image 1-3 captions, each naming its colour blended toward a random other image's by up to `spread`;
    a candidate that would nearly tie with an image or another image's caption is drawn again."""
    ivec, kept, out = [image_vec(c) for c in cols], [], []  # kept: (vector, owner)
    for i, c in enumerate(cols):
        caps, n = [], rng.randint(*count)
        while len(caps) < n:
            mix = blend(c, cols[rng.choice([j for j in range(len(cols)) if j != i])], rng.uniform(*spread))
            v = text_vec(f"{mix[0]} {mix[1]} {mix[2]}")
            s = [dot(v, x) for x in ivec]
            if any(abs(s[i] - x) < 10 * EPS for j, x in enumerate(s) if j != i) or any(
                    abs(dot(u, ivec[j]) - s[j]) < 10 * EPS for u, o in kept for j in (i, o) if o != i):
                continue
            kept.append((v, i))
            caps.append(f"{word} {mix[0]} {mix[1]} {mix[2]} {rng.choice(TAILS)}")
        out.append(caps)
    return out


def truth(seed: int, most: int = 3, n: int = 10) -> list[tuple[tuple, list[str]]]:
    rng = random.Random(seed)
    cols = colours(rng, n)
    return list(zip(cols, captions(rng, cols, (1, most)), strict=True))


def png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def put(path: Path, data) -> None:
    """Write bytes, text, an RGB colour (as a PNG), or a list of (member, bytes) as a tar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, list):
        with tarfile.open(path, "w") as tar:
            for name, raw in data:
                info = tarfile.TarInfo(name)
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
        return
    path.write_bytes(data if isinstance(data, bytes) else data.encode() if isinstance(data, str) else png(data))


def put_shards(root: Path, samples: list[list[tuple[str, bytes]]]) -> None:  # two shards and nshards.txt
    put(root / "test" / "0.tar", [m for sample in samples[:6] for m in sample])
    put(root / "test" / "1.tar", [m for sample in samples[6:] for m in sample])
    put(root / "test" / "nshards.txt", "2\n")


def dump(path: Path, data, lines: bool = False) -> None:  # JSON, or JSON lines
    put(path, "\n".join(json.dumps(r, ensure_ascii=False) for r in data) + "\n" if lines else json.dumps(data))


