"""Knowledge-CLIP training and evaluation: a short run learns, and the recipe runs end to end."""

import hashlib
import json

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig

from llm2clip.baseline import BaselineCLIP, TextTowerConfig
from llm2clip.data.images import make_image_processor
from llm2clip.data.lexicon import count_en
from llm2clip.data.readers import DataConfig
from llm2clip.data.synth import SynthConfig, synthesize
from llm2clip.knowledge.attributes import ATTRIBUTES, attribute_labels, label_array, linear_probe, prompts
from llm2clip.knowledge.concepts import ConceptConfig, fit_concepts
from llm2clip.knowledge.model import HeadsConfig, KnowledgeCLIP
from llm2clip.knowledge.train import KnowledgeTargets
from llm2clip.stage2.data import CaptionSampler, ImageSet
from llm2clip.stage2.train import TrainConfig, train_contrastive

DIM = 32


class BagOfWordsCache:
    """A stand-in for the embedding cache: each caption is the mean of fixed random word vectors (an
    'LLM' whose embedding says which words a caption uses), looked up by (key, field) like the cache."""

    def __init__(self, images: ImageSet):
        self.captions = dict(zip(images.keys, images.captions, strict=True))
        self.dim, self.fields = DIM, ["short_caption", "long_caption", "long_caption_2"]

    @staticmethod
    def embed(text: str) -> torch.Tensor:
        vectors = []
        for word in text.lower().replace(",", " ").replace(".", " ").split():
            seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
            vectors.append(torch.randn(DIM, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(vectors).mean(0)  # mean pooling

    def has(self, key, field):
        return field in self.captions.get(key, {})

    def lookup(self, keys, field):
        return torch.stack([self.embed(self.captions[k][field]) for k in keys])


@pytest.fixture(scope="module")
def split_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("kworld") / "data"
    # 72 px as in the tiny preset: a 3x3 grid of 24-px cells, one vision patch per cell
    synthesize(SynthConfig(num_images=1000, image_size=72, val_fraction=0.1, test_fraction=0.2, shard_size=1000),
               out, progress=False)
    data = DataConfig(path=str(out / "train.jsonl"), image_size=72)
    processor = make_image_processor(72)
    splits = {s: ImageSet.load(data, str(out / f"{s}.jsonl"), processor) for s in ("train", "val", "test")}
    labels = {s: attribute_labels(data, str(out / f"{s}.jsonl")) for s in splits}
    return out, splits, labels


def _probe_accuracy(model: KnowledgeCLIP, splits, labels) -> dict[str, float]:
    with torch.inference_mode():
        feats = {s: model.clip.vision_model(pixel_values=im.pixels).pooler_output.numpy() for s, im in splits.items()}
    out = {}
    for attr in ATTRIBUTES:
        y = {s: label_array(im.keys, labels[s], attr) for s, im in splits.items()}
        out[attr], _ = linear_probe((feats["train"], y["train"]), (feats["val"], y["val"]),
                                    (feats["test"], y["test"]), [0.01, 0.1, 1.0, 10.0])
    return out


def _tiny_clip(world, layers: int = 2) -> BaselineCLIP:
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=2,
                              image_size=72, patch_size=24)
    torch.manual_seed(0)
    return BaselineCLIP.from_config(vision, TextTowerConfig(hidden_size=64, num_layers=1, num_heads=2,
                                                            tokenizer=str(world / "tokenizer")), 16)


def test_a_short_run_lowers_l_emb_and_raises_attribute_probe_accuracy(split_world, tmp_path):
    """From a random encoder, 200 steps on short captions (the regime of CLIP pretraining). Short
    captions name the salient object's colour, shape and size (object counts appear only in long
    captions); colour, the strongest visual cue, is what a short run learns first."""
    world, splits, labels = split_world
    train = splits["train"]
    cache = BagOfWordsCache(train)
    concepts = fit_concepts(cache.lookup(train.keys, "short_caption"), ConceptConfig(num_concepts=16), seed=0)
    model = KnowledgeCLIP.from_clip(_tiny_clip(world), HeadsConfig(llm_dim=DIM, num_concepts=16))
    untrained = _probe_accuracy(model, splits, labels)
    cfg = TrainConfig(steps=200, batch_size=64, lr=3e-4, warmup_steps=10, long_caption_ratio=0.0, checkpoint_every=0,
                      out=str(tmp_path / "run"))
    sampler = CaptionSampler("short_caption", ["long_caption", "long_caption_2"], 0.0, seed=0)
    summary = train_contrastive(model, KnowledgeTargets(model, cache, concepts), train, sampler, cfg,
                                name="knowledge_clip.train", progress=False, device=torch.device("cpu"))
    assert set(summary["terms_first"]) == set(summary["terms_last"]) == {"clip", "emb", "concept"}
    terms = [json.loads(line)["terms"] for line in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert len(terms) == 200

    def mean(name, rows):  # over several steps: each step draws other images
        return np.mean([r[name] for r in rows])

    assert mean("emb", terms[-20:]) < 0.8 * mean("emb", terms[:20])  # β = 0.01 keeps W_e's pull gentle
    assert mean("concept", terms[-20:]) < mean("concept", terms[:20])
    assert mean("clip", terms[-20:]) < mean("clip", terms[:20])
    trained = _probe_accuracy(model.eval(), splits, labels)
    named = ("color", "shape", "size")
    assert trained["color"] > untrained["color"] + 5, (untrained, trained)
    assert np.mean([trained[a] for a in named]) > np.mean([untrained[a] for a in named]), (untrained, trained)


def test_accumulated_knowledge_step_matches_the_big_batch_step(split_world):
    """Auxiliary per-sample terms add up over micro-batches; the contrastive loss spans the whole batch."""
    import contextlib

    from llm2clip.losses import ClipLoss
    from llm2clip.stage2.train import _step_loss

    world, splits, _ = split_world
    train = splits["train"]
    cache = BagOfWordsCache(train)
    concepts = fit_concepts(cache.lookup(train.keys, "short_caption"), ConceptConfig(num_concepts=4))
    grads, values = [], []
    for accum in (1, 2):
        model = KnowledgeCLIP.from_clip(_tiny_clip(world, layers=1), HeadsConfig(llm_dim=DIM, num_concepts=4))
        keys = train.keys[:8]
        captions = CaptionSampler("short_caption", ["long_caption"], 0.5, 0).choose(train.captions[:8], 0)
        batch = KnowledgeTargets(model, cache, concepts)(keys, captions)
        loss, parts = _step_loss(model, ClipLoss(), train.pixels[:8], batch, accum, contextlib.nullcontext,
                                 model.loss_weights)
        values.append((loss, parts))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    assert torch.allclose(values[0][0], values[1][0], atol=1e-5)
    assert all(torch.allclose(values[0][1][k], values[1][1][k], atol=1e-5) for k in values[0][1])


def test_zero_shot_prompts_cover_every_class_in_the_training_captions_phrasing():
    from llm2clip.knowledge.attributes import CLASSES

    for attr in ATTRIBUTES:
        per_class = prompts(attr)
        assert len(per_class) == len(CLASSES[attr]) and all(per_class)
        for value, group in zip(CLASSES[attr], per_class, strict=True):
            word = count_en(value) if attr == "count" else value
            assert all(f" {word} " in f" {p} " for p in group)


def test_knowledge_clip_end_to_end_on_a_micro_main_job(world, tmp_path, capsys):
    """concepts -> train -> eval through the CLI; results.json keeps its contract; steps are reused;
    bad K and a cache of another width are one-line errors."""
    from llm2clip.cli import main
    from llm2clip.knowledge.concepts import Concepts
    from tests.helpers import micro_run_overrides

    sets = [*micro_run_overrides(world, tmp_path), "synth.enabled=false", "knowledge_clip.concepts.num_concepts=4",
            "knowledge_clip.train.steps=3", "knowledge_clip.train.batch_size=8",
            f"knowledge_clip.probe_val_data={world}/val.jsonl", "knowledge_clip.probe_c=[1.0]"]
    base = ["--config", "configs/tiny.yaml", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    assert main(["run", *base]) == 0
    assert main(["knowledge", "all", *base]) == 0
    results = json.loads((tmp_path / "knowledge_clip" / "results.json").read_text())
    models = {"clip_finetuned", "knowledge_clip", "llm2clip"}
    assert models <= set(results["attribute_probe"]) and models <= set(results["cra"])
    for name in models:
        assert set(results["attribute_probe"][name]) == {"color", "shape", "size", "count"}
        assert all(0 <= v <= 100 for v in results["attribute_probe"][name].values())
        assert all(0 <= v <= 100 for v in results["zero_shot"][name].values())
        assert 0 <= results["cra"][name] <= 100
        assert {"short", "long"} <= set(results["retrieval"][name])
    assert results["cra"]["llm2clip"] == json.loads((tmp_path / "stage1" / "cra.json").read_text())["cc"]["en"]
    assert results["training"]["knowledge_clip"]["steps"] == 3 and results["concepts"]["num_concepts"] == 4
    out = capsys.readouterr().out
    assert "| knowledge_clip |" in out

    assert main(["knowledge", "all", *base]) == 0  # everything current: reused
    summary = json.loads((tmp_path / "knowledge_clip" / "run_summary.json").read_text())
    assert "reused" in summary["concepts"] and "reused" in summary["train"]

    assert main(["knowledge", "concepts", *base, "--set", "knowledge_clip.concepts.num_concepts=100000"]) == 2
    assert "num_concepts=100000 is larger than the" in capsys.readouterr().err

    folder = tmp_path / "knowledge_clip" / "concepts"
    fitted = Concepts.load(folder)
    other = Concepts(torch.randn(4, 7), torch.zeros(7), 0.1, fitted.info)  # 7-wide: another LLM's concepts
    other.save(folder)
    assert main(["knowledge", "train", *base]) == 2
    assert "fit on 7-wide LLM vectors but the cache holds 32-wide" in capsys.readouterr().err
