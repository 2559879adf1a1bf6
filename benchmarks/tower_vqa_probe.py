"""What each LLaVA tower's features carry for the VQA questions, read by linear probes (a diagnostic).

    python benchmarks/tower_vqa_probe.py [--run runs/tiny] [--train 3000] [--towers llm2clip,...]
        [--layer -2] [--feature patch]

The tiny preset's LLaVA reads a tower's penultimate-layer patch features (`mm_vision_select_layer -2`,
`patch`): [B, 9, 128], 72 px at patch 24, so one patch per cell of the world's 3 x 3 grid. Here
scikit-learn logistic regressions read, from the same features flattened, each cell's shape (or
"empty"), colour and size; the L2 strength is picked on val. The predicted scene then answers every typed
question of the test conversations (the 4 types `llava_integration eval` scores) with the generator's
own answer templates, scored as `eval` scores: exact match after `normalize`. Answering from the true
scene scores 100 on every type (checked before any probe runs), so a gap below 100 is the features' and
the probes'. Set beside LLaVA's VQA on the same questions, it tells the tower's share from the LLM's.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark scripts import each other by module name
from vqa_seeds import score

ATTRIBUTES = ("shape", "color", "size")
EMPTY = "empty"
TOWERS = {"llm2clip": "vision_tower", "clip_finetuned": "clip_vision_tower",
          "clip_pretrained": "stage2/clip_pretrain/model"}


def world():
    from llm2clip.data.lexicon import POSITION_EN, count_en, plural_en
    from llm2clip.data.world import COLORS, GRID, SHAPES, SIZES

    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    classes = {"shape": [EMPTY, *SHAPES], "color": [EMPTY, *COLORS], "size": [EMPTY, *SIZES]}
    return SimpleNamespace(cells=cells, classes=classes, positions={v: k for k, v in POSITION_EN.items()},
                           plurals={plural_en(s, 2): s for s in SHAPES}, count_en=count_en, plural_en=plural_en)


def scene_labels(attributes: dict, w) -> dict[str, list[str]]:
    """attribute -> one label per grid cell, 'empty' where the cell holds no object."""
    at = {(o["row"], o["col"]): o for o in attributes["objects"]}
    return {a: [at[cell][a] if cell in at else EMPTY for cell in w.cells] for a in ATTRIBUTES}


def one_hot(labels: list[dict[str, list[str]]], w) -> dict[str, np.ndarray]:
    """The true scenes as probabilities: attribute -> [N, 9, classes]."""
    out = {}
    for a in ATTRIBUTES:
        index = {c: i for i, c in enumerate(w.classes[a])}
        p = np.zeros((len(labels), len(w.cells), len(index)))
        for n, scene in enumerate(labels):
            for k, label in enumerate(scene[a]):
                p[n, k, index[label]] = 1.0
        out[a] = p
    return out


class Answerer:
    """Answers the world's four question types from per-cell probabilities of one image."""

    def __init__(self, w):
        self.w = w
        where = "|".join(map(re.escape, w.positions))
        self.color_q = re.compile(rf"What colour is the (\w+)(?: ({where}))?\?")
        self.count_q = re.compile(r"How many (\w+) are there in the image\?")
        self.exists_q = re.compile(r"Is there a (\w+) (\w+) in the image\?")
        self.left_q = re.compile(rf"What is directly to the left of the (\w+) (\w+)(?: ({where}))?\?")

    def __call__(self, probs: dict[str, np.ndarray], question: str) -> str:  # probs: attribute -> [9, classes]
        w = self.w
        top = {a: [w.classes[a][i] for i in probs[a].argmax(-1)] for a in ATTRIBUTES}  # attribute -> 9 labels
        if m := self.color_q.fullmatch(question):
            k = self._locate(probs, m[1], cell=m[2])
            return f"It is {top['color'][k]}."
        if m := self.count_q.fullmatch(question):
            shape = w.plurals[m[1]]
            n = sum(s == shape for s in top["shape"])
            return f"There {'is' if n == 1 else 'are'} {w.count_en(n) if n else 'no'} {w.plural_en(shape, n)}."
        if m := self.exists_q.fullmatch(question):
            present = any(s == m[2] and c == m[1] for s, c in zip(top["shape"], top["color"], strict=True))
            return "Yes." if present else "No."
        if m := self.left_q.fullmatch(question):
            row, col = w.cells[self._locate(probs, m[2], color=m[1], cell=m[3])]
            left = [k for k, (r, c) in enumerate(w.cells) if r == row and c < col and top["shape"][k] != EMPTY]
            k = max(left, key=lambda k: w.cells[k][1]) if left else self._most_occupied(probs, row, col)
            return f"A {top['size'][k]} {top['color'][k]} {top['shape'][k]}."
        raise ValueError(f"not one of the world's question templates: {question!r}")

    def _locate(self, probs, shape: str, color: str | None = None, cell: str | None = None) -> int:
        """The cell the question names: its position if given, else the likeliest holder of the object."""
        if cell is not None:
            return self.w.cells.index(self.w.positions[cell])
        score = probs["shape"][:, self.w.classes["shape"].index(shape)]  # [9]
        if color is not None:
            score = score * probs["color"][:, self.w.classes["color"].index(color)]
        return int(score.argmax())

    def _most_occupied(self, probs, row: int, col: int) -> int:
        left = [k for k, (r, c) in enumerate(self.w.cells) if r == row and c < col] or [0]
        return max(left, key=lambda k: 1 - probs["shape"][k, 0])


def answer_all(items: list[dict], probs: dict[str, np.ndarray], row_of: dict[str, int], w) -> dict[str, float]:
    """Overall and per-type exact match (percent), scored as vqa_seeds.py scores LLaVA's predictions."""
    from llava_integration.evaluate import normalize

    answer = Answerer(w)
    predictions = []
    for item in items:
        n = row_of[item["id"]]
        predicted = answer({a: probs[a][n] for a in ATTRIBUTES}, item["question"])
        predictions.append({"type": item["type"], "correct": normalize(predicted) == normalize(item["answer"])})
    return score(predictions)


def tower_features(folder: Path, images: dict[str, list], layer: int = -2, feature: str = "patch",
                   batch: int = 128) -> dict[str, np.ndarray]:
    """split -> [N, T * C]: one layer's tokens as LLaVA selects them (T = 9 patches, or 10 with
    `cls_patch`); the tiny preset's LLaVA reads layer -2, `patch`. The tower is loaded once."""
    import torch

    from llava_integration.tower import LLM2CLIPVisionTower

    args = SimpleNamespace(mm_vision_select_layer=layer, mm_vision_select_feature=feature)
    tower = LLM2CLIPVisionTower(str(folder), args)
    features = {}
    with torch.inference_mode():
        for split, split_images in images.items():
            chunks = []
            for i in range(0, len(split_images), batch):
                pixels = tower.image_processor(split_images[i:i + batch], return_tensors="pt")["pixel_values"]
                chunks.append(tower(pixels).flatten(1).float().numpy())  # [b, T * C]
            features[split] = np.concatenate(chunks)
    return features


def fit_probes(x: dict[str, np.ndarray], labels: dict[str, list], w, strengths=(0.01, 0.1, 1.0)):
    """Per attribute and cell, a logistic regression on train, C picked on val; test probabilities
    (attribute -> [N_test, 9, classes]) and each probe's test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs, accuracy = {}, {}
    for a in ATTRIBUTES:
        p = np.zeros((len(x["test"]), len(w.cells), len(w.classes[a])))
        correct = []
        for k in range(len(w.cells)):
            y = {split: np.array([scene[a][k] for scene in labels[split]]) for split in x}
            fits = [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x["train"], y["train"])
                    for c in strengths]
            best = max(fits, key=lambda f: f.score(x["val"], y["val"]))
            columns = [w.classes[a].index(c) for c in best.classes_]
            p[:, k, columns] = best.predict_proba(x["test"])
            correct.append(best.predict(x["test"]) == y["test"])
        probs[a], accuracy[a] = p, round(100 * float(np.mean(correct)), 2)
    return probs, accuracy


def main() -> None:
    from llava_integration.evaluate import vqa_items
    from llm2clip.data.images import load_image

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, default=Path("runs/tiny"))
    parser.add_argument("--train", type=int, default=3000, help="train images for the probes (the first N)")
    parser.add_argument("--towers", default=",".join(TOWERS), help=f"a subset of {list(TOWERS)}")
    parser.add_argument("--layer", type=int, default=-2, help="hidden state to read (LLaVA's mm_vision_select_layer)")
    parser.add_argument("--feature", default="patch", choices=("patch", "cls_patch"), help="mm_vision_select_feature")
    args = parser.parse_args()
    data = args.run / "data"
    w = world()
    rows = {s: [json.loads(line) for line in (data / f"{s}.jsonl").open(encoding="utf-8")]
            for s in ("train", "val", "test")}
    rows["train"] = rows["train"][:args.train]
    labels = {s: [scene_labels(r["attributes"], w) for r in rows[s]] for s in rows}
    items = vqa_items(data / "llava/test_instruct.json")
    row_of = {r["key"]: n for n, r in enumerate(rows["test"])}
    truth = answer_all(items, one_hot(labels["test"], w), row_of, w)
    if any(v != 100 for v in truth.values()):
        raise SystemExit(f"answering from the true scenes should score 100 on every type, got {truth}")

    images = {s: [load_image(data / r["image"], max_pixels=1 << 30) for r in rows[s]] for s in rows}  # decoded once
    report = {"questions": len(items), "train_images": len(rows["train"]), "layer": args.layer,
              "feature": args.feature,
              "true_scene": truth, "towers": {}}
    for name in args.towers.split(","):
        folder = args.run / TOWERS[name]
        x = tower_features(folder, images, args.layer, args.feature)
        probs, accuracy = fit_probes(x, labels, w)
        report["towers"][name] = {"folder": str(folder), "cell_probe_accuracy": accuracy,
                                  "vqa_from_probes": answer_all(items, probs, row_of, w)}
        print(name, json.dumps(report["towers"][name]), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
