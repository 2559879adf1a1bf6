"""llm2clip.clip_benchmark_adapter through LAION-AI/CLIP_benchmark's own metric code.

clip-benchmark is not a dependency: it is pip-installed once, without its dependencies, into the
git-ignored .compat folder (as tests/compat/side_env.py does for old transformers) and put on sys.path.
Its metric modules need only torch, tqdm and scikit-learn; its `models` module imports open_clip (and that
torchvision), which this environment lacks, so register() is tested on the real module with a stand-in
for open_clip alone. Set LLM2CLIP_SKIP_COMPAT=1 where PyPI cannot be reached."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from llm2clip.clip_benchmark_adapter import (
    BenchmarkModel,
    TextBatch,
    embedder_from_model_arg,
    fix_metrics,
    load_llm2clip,
    main,
    register,
)
from llm2clip.errors import ConfigError
from tests.test_eval_models import build_folders

VERSION = "1.6.2"  # PyPI's latest; its metrics/ and cli.py equal LAION-AI/CLIP_benchmark @ 48de38c
ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(os.environ.get("LLM2CLIP_COMPAT_DIR", ROOT / ".compat")) / f"clip_benchmark-{VERSION}"
CLASSES = ["circle", "square", "triangle", "hexagon", "diamond", "star"]  # >= 5: CLIP_benchmark reports acc5
TEMPLATES = ["a photo of a {c}.", "a {c} on a black background"]


def _ensure() -> Path:
    """clip-benchmark==VERSION without dependencies under .compat; built once, atomically."""
    if (TARGET / ".complete").is_file():
        return TARGET
    partial = TARGET.with_name(TARGET.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(partial), f"clip-benchmark=={VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-1500:])
    (partial / ".complete").write_text(VERSION + "\n")
    shutil.rmtree(TARGET, ignore_errors=True)
    os.replace(partial, TARGET)
    return TARGET


@pytest.fixture(scope="module")
def cb():
    """CLIP_benchmark's metric modules, imported from the side folder, with register()'s fix_metrics()."""
    if os.environ.get("LLM2CLIP_SKIP_COMPAT"):
        pytest.skip("LLM2CLIP_SKIP_COMPAT is set")
    try:
        target = str(_ensure())
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"clip-benchmark=={VERSION} could not be installed from PyPI: {str(e).strip()[-300:]}")
    sys.path.insert(0, target)
    try:
        from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval

        assert "open_clip" not in sys.modules  # the metrics need no open_clip
        upstream_accuracy = zeroshot_classification.accuracy
        fix_metrics()
        yield types.SimpleNamespace(retrieval=zeroshot_retrieval, classification=zeroshot_classification,
                                    root=Path(target) / "clip_benchmark", upstream_accuracy=upstream_accuracy)
    finally:
        sys.path.remove(target)


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory):
    return build_folders(world, tmp_path_factory.mktemp("cb_models"))


def _real_function(path: Path, name: str, namespace: dict):
    """A top-level function of CLIP_benchmark's source, compiled alone (its module imports torchvision)."""
    node = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


class Rows(Dataset):
    """(transform(image), captions) for retrieval, (transform(image), label) for classification."""

    def __init__(self, world: Path, split: str, n: int, transform, classes: list[str] | None = None):
        rows = [json.loads(line) for line in (world / f"{split}.jsonl").read_text().splitlines()][:n]
        self.images = [world / r["image"] for r in rows]
        self.targets = [[r["short_caption"], r["long_caption"]] for r in rows] if classes is None else \
            [i % len(classes) for i in range(len(rows))]
        self.transform, self.classes = transform, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        with Image.open(self.images[i]) as im:
            return self.transform(im), self.targets[i]


class Spy(BenchmarkModel):
    """Records what CLIP_benchmark's code received from the adapter."""

    def __init__(self, model: BenchmarkModel):
        super().__init__(model.eval_model)
        self.texts, self.text_out, self.images, self.image_out = [], [], [], []

    def encode_text(self, batch):
        self.texts += batch.texts
        self.text_out.append(super().encode_text(batch))
        return self.text_out[-1]

    def encode_image(self, images):
        self.images.append(images)
        self.image_out.append(super().encode_image(images))
        return self.image_out[-1]


def _check_features(spy: Spy) -> None:
    """What the metric code got equals the EvalModel's direct output for the same inputs."""
    direct = spy.eval_model
    torch.testing.assert_close(torch.cat(spy.text_out), direct.encode_texts(spy.texts), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(spy.image_out), direct.encode_images(torch.cat(spy.images)), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["llm2clip", "siglip"])
def test_retrieval_metrics_equal_a_direct_computation(cb, folders, world, kind):
    model, transform, tokenizer = load_llm2clip("llm2clip", str(folders[kind]), device="cpu")
    collate = _real_function(cb.root / "datasets/builder.py", "image_captions_collate_fn",
                             {"default_collate": default_collate})
    data = Rows(world, "test", 6, transform)
    spy = Spy(model)
    metrics = cb.retrieval.evaluate(spy.eval(), DataLoader(data, batch_size=4, collate_fn=collate), tokenizer,
                                    device="cpu", amp=False, recall_k_list=[1, 2, 3])
    _check_features(spy)

    direct = model.eval_model
    images = direct.encode_images(torch.stack([data[i][0] for i in range(len(data))]))  # [6, E]
    captions = [c for caps in data.targets for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(data.targets) for _ in caps])  # caption -> image
    scores = direct.encode_texts(captions) @ images.T  # [12, 6]
    for k in (1, 2, 3):
        image_hit = (scores.topk(k, dim=1).indices == owner[:, None]).any(1)  # per caption
        text_top = scores.T.topk(k, dim=1).indices  # [6, k] caption rows per image
        text_hit = (owner[text_top] == torch.arange(len(images))[:, None]).any(1)
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(image_hit.float().mean().item())
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(text_hit.float().mean().item())


@pytest.mark.parametrize("kind", ["llm2clip", "siglip"])
def test_classification_metrics_equal_a_direct_computation(cb, folders, world, kind):
    model, transform, tokenizer = load_llm2clip("llm2clip", str(folders[kind]), device="cpu")
    data = Rows(world, "train", 12, transform, CLASSES)
    spy = Spy(model)
    metrics = cb.classification.evaluate(spy.eval(), DataLoader(data, batch_size=5), tokenizer, CLASSES, TEMPLATES,
                                         device="cpu", amp=False)
    _check_features(spy)

    direct = model.eval_model
    weights = torch.stack([F.normalize(direct.encode_texts([t.format(c=c) for t in TEMPLATES]).mean(0), dim=0)
                           for c in CLASSES])  # [C, E]
    logits = direct.encode_images(torch.stack([data[i][0] for i in range(len(data))])) @ weights.T  # [N, C]
    labels = torch.tensor(data.targets)
    pred = logits.argmax(1)
    recall = [(pred[labels == c] == c).float().mean().item() for c in range(len(CLASSES))]
    assert metrics["acc1"] == pytest.approx((pred == labels).float().mean().item())
    assert metrics["acc5"] == pytest.approx((logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item())
    assert metrics["mean_per_class_recall"] == pytest.approx(sum(recall) / len(recall))


def test_fix_metrics_replaces_only_a_broken_accuracy_with_the_same_values(cb):
    """LAION-AI/CLIP_benchmark#147: accuracy() calls float() on a 1-element array."""
    import numpy as np

    logits = torch.randn(20, 6, generator=torch.Generator().manual_seed(7))
    labels = torch.arange(20) % 6
    expected = [(logits.topk(k, 1).indices == labels[:, None]).any(1).float().mean().item() for k in (1, 5)]
    assert cb.classification.accuracy(logits, labels, topk=(1, 5)) == pytest.approx(expected)
    try:
        float(np.zeros(1))
    except TypeError:  # this NumPy: upstream's accuracy crashes, so fix_metrics replaced it
        assert cb.classification.accuracy is not cb.upstream_accuracy
        with pytest.raises(TypeError):
            cb.upstream_accuracy(logits, labels, topk=(1, 5))
    else:
        assert cb.classification.accuracy is cb.upstream_accuracy
    assert fix_metrics() == []  # already fixed: nothing more to do


def test_metrics_run_under_clip_benchmarks_default_autocast(cb, folders, world):
    model, transform, tokenizer = load_llm2clip("llm2clip", str(folders["llm2clip"]), device="cpu")
    data = Rows(world, "train", 6, transform, CLASSES)
    metrics = cb.classification.evaluate(model.eval(), DataLoader(data, batch_size=4), tokenizer, CLASSES, TEMPLATES,
                                         device="cpu", amp=True)  # CLIP_benchmark's default: torch.autocast(cpu)
    assert 0 <= metrics["acc1"] <= 1 and 0 <= metrics["mean_per_class_recall"] <= 1


def test_the_model_argument_carries_the_embedder_or_a_label(folders, tmp_path):
    assert embedder_from_model_arg("llm2clip") is None and embedder_from_model_arg("ViT-B-32-quickgelu") is None
    assert embedder_from_model_arg(str(folders["embedder"])) == folders["embedder"]
    for typo in (str(tmp_path / "missing"), "./missing", "org/name"):
        with pytest.raises(ConfigError, match="looks like a path"):
            embedder_from_model_arg(typo)
    with pytest.raises(ConfigError, match="--embedder"):  # a converted release needs its embedder
        load_llm2clip("llm2clip", str(folders["llm2clip_norecord"]))
    model, transform, tokenizer = load_llm2clip(str(folders["embedder"]), str(folders["llm2clip_norecord"]),
                                                cache_dir=str(tmp_path / "cache"))
    batch = tokenizer(["a red circle", "two squares"])
    assert isinstance(batch, TextBatch) and batch.to("cpu") is batch
    assert model.encode_text(batch).shape == (2, 16) and (tmp_path / "cache/llm2clip-text-vectors").is_dir()
    with Image.new("L", (40, 30)) as image:  # grayscale in, [3, H, W] out
        assert transform(image).shape == (3, 32, 32)


def _forget_models_module() -> None:
    for name in [m for m in sys.modules if m == "clip_benchmark.models" or m.startswith("clip_benchmark.models.")]:
        del sys.modules[name]


def test_register_adds_the_loader_to_the_real_clip_benchmark_models(cb, folders, monkeypatch):
    sys.path.insert(0, str(cb.root.parent))
    try:
        _forget_models_module()
        if importlib.util.find_spec("open_clip") is None:
            with pytest.raises(ConfigError, match="open_clip"):  # the real failure here, in one line
                register()
            # clip_benchmark/models/open_clip.py only imports it at the top: a bare stand-in will do
            monkeypatch.setitem(sys.modules, "open_clip", types.ModuleType("open_clip"))
        _forget_models_module()
        register()
        register()  # idempotent
        import clip_benchmark.models as models

        assert models.MODEL_TYPES.count("llm2clip") == 1 and models.TYPE2FUNC["llm2clip"] is load_llm2clip
        model, _, tokenizer = models.load_clip("llm2clip", "llm2clip", str(folders["clip"]), None, "cpu")
        assert model.eval().encode_text(tokenizer(["a red circle"]).to("cpu")).shape == (1, 16)
        # cli.py binds models.MODEL_TYPES itself as --model_type's choices, so the in-place append reaches it
        cli = (cb.root / "cli.py").read_text()
        assert "from clip_benchmark.models import MODEL_TYPES, load_clip" in cli and "choices=MODEL_TYPES" in cli
        if importlib.util.find_spec("torchvision") is None:
            assert main(["eval", "--help"]) == 2  # cli.py imports its dataset builders: a one-line error
    finally:
        _forget_models_module()
        sys.path.remove(str(cb.root.parent))


def test_register_without_clip_benchmark_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "clip_benchmark.models", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install clip-benchmark"):
        register()
    assert main(["eval"]) == 2
    assert "pip install clip-benchmark" in capsys.readouterr().err
