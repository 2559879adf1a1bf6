"""Our model folders in LAION-AI/CLIP_benchmark, through its model-loader contract.

    llm2clip-clip-benchmark eval --model_type llm2clip --pretrained FOLDER [--model EMBEDDER] \\
        --dataset flickr30k --dataset_root DATA --output 'results/{dataset}_{language}_{task}.json'

`main()` registers the loader and runs CLIP_benchmark's own CLI (`clip_benchmark.cli.main`), so every
dataset, task and metric is CLIP_benchmark's. Arguments, as this loader reads them:

- `--pretrained FOLDER`: any folder `llm2clip.evaluation.models.load_eval_model` reads: LLM2CLIP (ours or
  converted releases), Knowledge-CLIP, stock HF CLIP, SigLIP, SigLIP 2.
- `--model`: the stage-1 embedder (what `llm2clip eval --embedder` takes) when it names an embedder
  folder (embedder_config.json or llm2vec_config.json inside); needed for folders that record none
  (converted releases). A bare name is a label only ('llm2clip' reads well in the results; CLIP_benchmark's
  default 'ViT-B-32-quickgelu' is ignored too); any other path ('/', './', '~') is an error, so a typo
  never silently falls back to the recorded embedder.
- `--model_cache_dir DIR`: LLM2CLIP folders keep their LLM caption vectors under DIR/llm2clip-text-vectors
  (see models.py), so a second run over the same captions skips the LLM.
- `--output`: CLIP_benchmark's default template puts {pretrained} (here a folder path, slashes included)
  and {model} into the file name; pass a template without them, as above.
- `--no_amp`: CLIP_benchmark runs encoders under torch.autocast(device) unless it is given; our features
  come back float32 either way, and the LLM runs at its own precision (the cached vectors do not depend
  on it).

The tokenizer does not tokenise: it wraps the texts in a `TextBatch` (`.to(device)` returns it), and
`encode_text` hands them to the EvalModel, which tokenises (77-token CLIP, max_length SigLIP) or runs
the cached LLM + adapter. Supported tasks: zeroshot_classification, zeroshot_retrieval,
image_caption_selection and linear_probe (encode_image only); not captioning (no decoder).

CLIP_benchmark is not a dependency: `pip install clip-benchmark` (it imports open_clip, which needs a
torchvision matching your torch). Its `clip_benchmark.models` module fails to import without them, and
`register()` says so in one line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import ConfigError, Llm2ClipError, one_line

MODEL_TYPE = "llm2clip"
TEXT_CACHE = "llm2clip-text-vectors"


class TextBatch:
    """What the tokenizer returns: the texts themselves (the model encodes them in its own way)."""

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)

    def to(self, device) -> TextBatch:
        return self

    def __len__(self) -> int:
        return len(self.texts)


class Tokenizer:
    def __call__(self, texts: str | Sequence[str]) -> TextBatch:
        return TextBatch([texts] if isinstance(texts, str) else texts)


class ImageTransform:
    """PIL image -> [3, H, W] with the folder's image processor (a class, so DataLoader workers can pickle it)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


class BenchmarkModel:
    """encode_image(images [B, 3, H, W]) / encode_text(TextBatch) -> [B, E] unit float32 features."""

    def __init__(self, eval_model):
        self.eval_model = eval_model

    def eval(self) -> BenchmarkModel:  # CLIP_benchmark calls model.eval(); the EvalModel is in eval mode
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.eval_model.encode_images(images)

    def encode_text(self, batch: TextBatch | Sequence[str]) -> torch.Tensor:
        return self.eval_model.encode_texts(batch.texts if isinstance(batch, TextBatch) else list(batch))


def embedder_from_model_arg(model_name: str | None) -> Path | None:
    """--model: an embedder folder is the embedder; a bare label is ignored (even where a folder of that
    name exists, e.g. the package's own 'llm2clip'); any other path is an error."""
    from .embedder import CONFIG_NAME, LLM2VEC_CONFIG_NAME

    if not model_name:
        return None
    path = Path(model_name).expanduser()
    if (path / CONFIG_NAME).is_file() or (path / LLM2VEC_CONFIG_NAME).is_file():
        return path
    if model_name.startswith((".", "~")) or "/" in model_name or "\\" in model_name:
        raise ConfigError(one_line(f"--model '{model_name}' looks like a path but is not a stage-1 embedder folder "
                                   f"(no {CONFIG_NAME} or {LLM2VEC_CONFIG_NAME}). Fix: point it at the embedder "
                                   "folder, or pass a label such as 'llm2clip'"))
    return None


def load_llm2clip(model_name: str | None = None, pretrained: str = "", cache_dir: str | None = None,
                  device: str | torch.device = "cpu", **kwargs):
    """CLIP_benchmark's loader contract -> (model, transform, tokenizer); see the module docstring."""
    from .evaluation.models import load_eval_model

    if not pretrained:
        raise ConfigError("--pretrained is empty. Fix: pass the model folder (--pretrained FOLDER)")
    text_cache = Path(cache_dir) / TEXT_CACHE if cache_dir else None
    model = load_eval_model(pretrained, embedder=embedder_from_model_arg(model_name), device=device,
                            text_cache=text_cache)
    return BenchmarkModel(model), ImageTransform(model.processor), Tokenizer()


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip_benchmark.metrics.zeroshot_classification.accuracy, with .item() where it calls float() on a
    1-element array: top-k accuracy of logits [N, C] against labels [N]."""
    pred = output.topk(max(topk), 1, True, True)[1].t()  # [k, N] class ids, best first
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def fix_metrics() -> list[str]:
    """Work around LAION-AI/CLIP_benchmark#147 (open; 1.6.2): its accuracy() calls float() on a 1-element
    array, which NumPy 2.4 refuses (deprecated since 1.25), so every zero-shot classification and linear
    probe crashes after the model has run. Replaced by `_accuracy` (same values) only where the bug shows;
    returns the patched modules."""
    import importlib

    try:
        zeroshot = importlib.import_module("clip_benchmark.metrics.zeroshot_classification")
        zeroshot.accuracy(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
        return []
    except TypeError:
        pass
    except ImportError:
        return []
    patched = []
    for name in ("zeroshot_classification", "linear_probe"):  # linear_probe binds accuracy at import
        try:
            module = importlib.import_module(f"clip_benchmark.metrics.{name}")
        except ImportError:
            continue
        module.accuracy = _accuracy
        patched.append(module.__name__)
    return patched


def register() -> None:
    """Add 'llm2clip' to clip_benchmark.models' TYPE2FUNC and MODEL_TYPES (idempotent), and fix_metrics()."""
    try:
        import clip_benchmark.models as models
    except Exception as e:  # ImportError, or torchvision failing against this torch
        raise ConfigError(one_line(
            f"clip_benchmark.models cannot be imported ({type(e).__name__}: {e}). Fix: pip install clip-benchmark "
            "open_clip_torch and a torchvision built for this torch (clip_benchmark imports open_clip, which "
            "imports torchvision)")) from None
    models.TYPE2FUNC[MODEL_TYPE] = load_llm2clip
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # in place: cli.py binds this very list as --model_type's choices
    fix_metrics()


def main(argv: Sequence[str] | None = None) -> int:
    """`llm2clip-clip-benchmark ARGS` = `clip_benchmark ARGS` with --model_type llm2clip available."""
    try:
        register()
        from clip_benchmark import cli
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # cli.py imports its dataset builders (torchvision) too
        print(f"error: clip_benchmark.cli cannot be imported ({one_line(f'{type(e).__name__}: {e}')})",
              file=sys.stderr)
        return 2
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]  # cli.main parses sys.argv
    try:
        cli.main()
    except Llm2ClipError as e:  # our one-line errors, without a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
