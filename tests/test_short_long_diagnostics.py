"""The short↔long diagnostics of issue #20: the scene matcher's exact ceilings
(benchmarks/short_long_text_baseline.py) and the per-layer pooled features and linear probe
(benchmarks/pooled_layer_probe.py), against hand-worked cases and HF's own modules."""

import random

import pytest
import torch

from benchmarks.pooled_layer_probe import layer_features, linear_probe
from benchmarks.short_long_text_baseline import parse_short, scene_matcher
from llm2clip.data.captions import describe
from llm2clip.data.world import Scene, ShapeObject, sample_scene


def _row(short: str, background: str, *objects: tuple[str, str, str, str]) -> dict:
    scene = Scene(tuple(ShapeObject(shape, color, size, style, row=0, col=i)
                        for i, (size, color, shape, style) in enumerate(objects)), background)
    return {"short_caption": short, "attributes": scene.to_dict()}


def test_parse_short_reads_mentions_and_background():
    assert parse_short("a large red star on a white background") == ([("large", "red", "star")], "white")
    assert parse_short("a photo of a small blue circle next to a green square") == (
        [("small", "blue", "circle"), (None, "green", "square")], None)


def test_scene_matcher_hand_worked():
    rows = [_row("a large red star on a white background", "white", ("large", "red", "star", "solid")),
            _row("a photo of a large red star", "black", ("large", "red", "star", "solid")),
            _row("a photo of a small blue circle", "white", ("small", "blue", "circle", "solid"))]
    # short->long: short 0 fits scene 0 only, short 1 scenes 0 and 1, short 2 scene 2: (1 + 1/2 + 1) / 3
    # long->short: scene 0 is fitted by shorts 0 and 1, scene 1 by short 1, scene 2 by short 2: the same
    got = scene_matcher(rows)
    for key in ("short_to_long", "long_to_short", "mean"):
        assert got[key] == pytest.approx(100 * 2.5 / 3, abs=0.01)


def test_salience_only_narrows_and_more_candidates_lower_the_ceiling():
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        scene = sample_scene(rng)
        rows.append({"short_caption": describe(scene, rng)["short_caption"], "attributes": scene.to_dict()})
    plain, salient = scene_matcher(rows), scene_matcher(rows, salience=True)
    assert all(salient[k] >= plain[k] for k in plain)  # salience fits are a subset of attribute fits
    assert salient["mean"] > plain["mean"]
    assert scene_matcher(rows[:60])["mean"] > plain["mean"]


def test_scene_matcher_refuses_a_caption_its_scene_does_not_fit():
    rows = [_row("a photo of a large red star", "white", ("large", "blue", "star", "solid")),
            _row("a photo of a large blue star", "white", ("large", "blue", "star", "solid"))]
    with pytest.raises(ValueError, match="misreads"):
        scene_matcher(rows)


def test_layer_features_match_the_embedding_layer_and_encode(world, tmp_path):
    from llm2clip.embedder import CaptionEmbedder, EmbedderConfig
    from tests.helpers import save_tiny_llm

    lm = save_tiny_llm(tmp_path / "lm", world / "tokenizer")
    # fp32: encode() batches by length and layer_features in input order, which bf16 rounds differently
    embedder = CaptionEmbedder.load(EmbedderConfig(model=str(lm), device="cpu", max_length=96,
                                                   instruction="Retrieve a caption", autocast=False))
    texts = ["a large red star", "a small blue circle on a white background next to a green square", "a cross"]
    feats = layer_features(embedder, texts, batch_size=2)  # [3, L + 1, D]
    assert feats.shape == (3, embedder.model.config.num_hidden_layers + 1, embedder.dim)
    assert torch.allclose(feats[:, -1], embedder.encode(texts), atol=1e-5)
    table = embedder.model.get_input_embeddings().weight
    for i, text in enumerate(texts):  # layer 0: the mean of the text tokens' embeddings, instruction left out
        ids = embedder.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert torch.allclose(feats[i, 0], table[ids].mean(0), atol=1e-5)


def test_linear_probe_finds_a_linear_relation_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1200, 16, generator=gen)
    b = a @ torch.randn(16, 16, generator=gen) + 0.05 * torch.randn(1200, 16, generator=gen)
    assert linear_probe(a[:1000], b[:1000], a[1000:], b[1000:], steps=300) > 90
    noise = torch.randn(1200, 16, generator=gen)
    assert linear_probe(a[:1000], noise[:1000], a[1000:], noise[1000:], steps=300) < 10
