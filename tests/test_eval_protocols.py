"""Benchmark protocols against hand-computed references: COCO 1k folds, streamed retrieval with several
captions per image, top-k classification metrics, CLIP_benchmark records and tables."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llm2clip.data.images import make_image_processor
from llm2clip.errors import DataError
from llm2clip.eval import retrieval_metrics
from llm2clip.evaluation.base import CLASSIFICATION, RETRIEVAL, ClassificationItem, EvalSet, RetrievalItem
from llm2clip.evaluation.protocols import EvalOptions, evaluate_set, fold_metrics
from llm2clip.evaluation.report import csv_table, language_means, markdown_table, records_for, write_records

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def brute_force_hits(images, texts, owner, k):
    """Per-query loops: a text scores when its image is in its top k; an image when any of its texts is."""
    scores = texts @ images.T
    t2i = sum(int(owner[t] in scores[t].topk(k).indices.tolist()) for t in range(len(texts))) / len(texts)
    i2t = sum(any(owner[t] == i for t in scores[:, i].topk(min(k, len(texts))).indices.tolist())
              for i in range(len(images))) / len(images)
    return i2t, t2i


def test_fold_metrics_equal_per_fold_brute_force_means():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)  # 2 folds of 5
    owner = torch.tensor([i for i in range(10) for _ in range(2 + i % 2)])  # 2 or 3 captions per image
    texts = torch.nn.functional.normalize(images[owner] + 0.9 * torch.randn(len(owner), 8), dim=-1)
    got = fold_metrics(images, texts, owner, folds=2, ks=(1, 5))
    for k in (1, 5):
        fold = [owner // 5 == f for f in range(2)]
        per_fold = [brute_force_hits(images[f * 5:(f + 1) * 5], texts[fold[f]], owner[fold[f]] - 5 * f, k)
                    for f in range(2)]
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx(sum(p[0] for p in per_fold) / 2)
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx(sum(p[1] for p in per_fold) / 2)
    whole = retrieval_metrics(images, texts, owner, (1,))
    assert whole["image_retrieval_recall@1"] <= got["image_retrieval_recall@1"] + 1e-9  # 10 candidates vs 5


class ColourModel:
    """A toy model: an image's feature is its mean colour; a caption's is the colour it names."""

    name, pretrained = "colour", "toy"

    def __init__(self):
        self.processor = make_image_processor(16)
        self.processor.image_mean, self.processor.image_std = [0, 0, 0], [1, 1, 1]

    def encode_images(self, pixels):
        return torch.nn.functional.normalize(pixels.mean(dim=(2, 3)) + 1e-3, dim=-1)  # [B, 3]

    def encode_texts(self, texts):
        rows = [torch.tensor(next(v for c, v in COLOURS.items() if c in t), dtype=torch.float) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows) + 1e-3, dim=-1)


def png(tmp_path, name, colour):
    path = tmp_path / f"{name}.png"
    Image.new("RGB", (20, 20), COLOURS[colour]).save(path)
    return path


def test_streamed_retrieval_scores_every_caption_and_counts_a_missing_image(tmp_path):
    items = [RetrievalItem("r", png(tmp_path, "r", "red"), ["a red square", "something red"]),
             RetrievalItem("g", png(tmp_path, "g", "green"), ["green"]),
             RetrievalItem("gone", tmp_path / "missing.png", ["blue"]),
             RetrievalItem("b", png(tmp_path, "b", "blue"), ["a blue one", "blue", "very blue"])]
    evalset = EvalSet("toy", RETRIEVAL, lambda: iter(items))
    evalset.stats.read = len(items)  # as a reader counts them
    result = evaluate_set(ColourModel(), evalset, EvalOptions(batch_size=2, recall_k=(1,), progress=False))
    assert result[""] == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}
    assert evalset.stats.counts == {"missing image file": 1} and evalset.stats.read == 3
    evalset.stats.read = len(items)
    with pytest.raises(DataError, match="missing"):
        evaluate_set(ColourModel(), evalset, EvalOptions(strict=True, progress=False))
    gone = EvalSet("gone", RETRIEVAL, lambda: iter(items[2:3]))  # every image missing: one line, no traceback
    with pytest.raises(DataError, match=r"gone: .*no image.*1 x missing image file"):
        evaluate_set(ColourModel(), gone, EvalOptions(progress=False))


def test_classification_prompt_ensemble_and_metrics(tmp_path):
    names = ["red", "green", "blue", "white"]
    items = [ClassificationItem(str(i), png(tmp_path, f"c{i}", c), label) for i, (c, label) in
             enumerate([("red", 0), ("green", 1), ("blue", 2), ("blue", 3), ("white", 3)])]
    evalset = EvalSet("toy", CLASSIFICATION, lambda: iter(items), classnames=names,
                      templates=["a photo of {c}.", "{c}"])
    metrics = evaluate_set(ColourModel(), evalset, EvalOptions(progress=False))[""]
    assert metrics["acc1"] == pytest.approx(4 / 5)  # the blue image labelled 'white' is wrong
    assert "acc5" not in metrics  # 4 classes: CLIP_benchmark reports no acc5
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)


def test_records_tables_and_language_means(tmp_path):
    class M:
        name, pretrained = "ours", "/models/ours"

    records = []
    for lang, r1 in (("de", 0.5), ("zh", 0.25)):
        s = EvalSet("xm3600", RETRIEVAL, lambda: iter(()), language=lang)
        s.stats.read = 4
        records += records_for(M(), s, {"": {"image_retrieval_recall@1": r1, "text_retrieval_recall@1": r1}})
    coco = EvalSet("mscoco_captions", RETRIEVAL, lambda: iter(()), folds=5)
    records += records_for(M(), coco, {"": {"image_retrieval_recall@1": 0.1}, "1k": {"image_retrieval_recall@1": 0.3}})
    records += language_means(records)
    assert [r["dataset"] for r in records] == ["xm3600", "xm3600", "mscoco_captions", "mscoco_captions_1k", "xm3600"]
    mean = records[-1]
    assert mean["language"] == "mean" and mean["metrics"]["image_retrieval_recall@1"] == pytest.approx(0.375)
    assert set(records[0]) >= {"dataset", "model", "pretrained", "task", "metrics", "language"}
    paths = write_records(records, str(tmp_path / "out" / "results.json"))
    assert json.loads(paths[0].read_text()) == records
    assert "| xm3600 | mean | ours | 37.50 | 37.50 |" in markdown_table(records)
    assert csv_table(records).splitlines()[1].startswith("xm3600,de,ours,/models/ours,zeroshot_retrieval,0.500000")
    per_file = write_records(records[:1], str(tmp_path / "t" / "{dataset}_{pretrained}_{model}_{language}_{task}.json"))
    assert per_file[0].name == "xm3600_models_ours_ours_de_zeroshot_retrieval.json"
    assert json.loads(per_file[0].read_text())["metrics"]["text_retrieval_recall@1"] == 0.5


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_retrieval_metrics_in_chunks_equal_brute_force_for_owners_and_positive_matrices(chunk):
    torch.manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(7, 6), dim=-1)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 6, 6])
    texts = torch.nn.functional.normalize(images[owner] + torch.randn(len(owner), 6), dim=-1)
    positives = torch.zeros(len(owner), 7, dtype=torch.bool)
    positives[torch.arange(len(owner)), owner] = True
    for target in (owner, positives):
        got = retrieval_metrics(images, texts, target, ks=(1, 3), chunk=chunk)
        for k in (1, 3):
            i2t, t2i = brute_force_hits(images, texts, owner, k)
            assert got[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
            assert got[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)


def test_model_labels_are_the_shortest_distinct_path_tails(tmp_path):
    from llm2clip.evaluation.cli import model_labels

    folders = [tmp_path / "run/stage2/llm2clip/model", tmp_path / "run/stage2/clip_finetune/model", tmp_path / "siglip"]
    labels = model_labels([str(f) for f in folders])
    assert labels == ["llm2clip/model", "clip_finetune/model", f"{tmp_path.name}/siglip"]
    assert model_labels([str(folders[2])]) == ["siglip"]
