"""Zero-shot image classification: dataset readers (ImageNet-1k, any class-per-folder set, CLIP_benchmark's
webdataset export) and the protocol's two pure pieces, the prompt-ensembled classifier and the metrics.

Scores follow CLIP_benchmark (clip_benchmark/metrics/zeroshot_classification.py) so numbers are comparable:
OpenAI's class names and 80 templates for ImageNet, per-class mean of L2-normalised template embeddings,
acc1 / acc5 (NaN under 5 classes) / mean per-class recall (sklearn's balanced accuracy).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.readers import SkipCounter, fail
from ..errors import ConfigError, DataError, one_line
from .base import CLASSIFICATION, ClassificationItem, EvalSet, register
from .wds import shard_samples

log = logging.getLogger(__name__)

METADATA = Path(__file__).parent / "metadata"  # provenance: metadata/README.md
# torchvision's ImageFolder extensions, so a folder yields the same images there and here
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID = re.compile(r"n\d{8}")


@functools.cache
def _metadata(name: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (METADATA / name).read_text(encoding="utf-8").splitlines() if line.strip())


def imagenet_classnames() -> list[str]:
    """OpenAI's 1,000 cleaned ImageNet class names, in class-index order."""
    return list(_metadata("imagenet_classnames.txt"))


def imagenet_wnids() -> list[str]:
    """The 1,000 ILSVRC-2012 WordNet ids in class-index order (sorted)."""
    return list(_metadata("imagenet_wnids.txt"))


def openai_templates() -> list[str]:
    """OpenAI's 80 ImageNet prompt templates; '{c}' is the class name."""
    return list(_metadata("openai_imagenet_templates.txt"))


def _check_templates(templates: Sequence[str], source: str) -> list[str]:
    templates = [t for t in templates if t.strip()]
    if not templates:
        raise ConfigError(f"{source}: no templates. Fix: give at least one, e.g. 'a photo of a {{c}}.'")
    if bad := [t for t in templates if "{c}" not in t]:
        raise ConfigError(one_line(f"{source}: template '{bad[0]}' has no '{{c}}' placeholder for the class "
                                   "name. Fix: add '{c}' where the class name goes"))
    return templates


def _read_lines(path: Path) -> list[str]:
    """Stripped lines, trailing blank lines dropped (CLIP_benchmark keeps the rest as they are)."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _templates_option(templates: str | Path | Sequence[str] | None) -> list[str]:
    """None -> OpenAI's 80 ImageNet templates (CLIP_benchmark's fallback for sets without their own);
    a file path -> its lines; a list -> as given."""
    if templates is None:
        return openai_templates()
    if isinstance(templates, str | Path):
        path = Path(templates)
        if not path.is_file():
            raise ConfigError(one_line(f"templates: '{templates}' is not a file. Fix: point it at a text file with "
                                       "one template per line, '{c}' marking the class name"))
        return _check_templates(_read_lines(path), str(path))
    return _check_templates(list(templates), "templates")


# -- class-per-folder sets -----------------------------------------------------------------------

def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _folder_images(class_dir: Path) -> Iterator[Path]:
    """Image files under one class folder, in torchvision ImageFolder's order (walked, sorted)."""
    for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
        for fname in sorted(filenames):
            if not fname.startswith(".") and fname.lower().endswith(FOLDER_IMAGE_EXTS):
                yield Path(dirpath) / fname


def _folder_set(name: str, base: Path, folders: list[str], labels: list[int], classnames: list[str],
                templates: list[str]) -> EvalSet:
    """An EvalSet over base/<folder>/**/<image>, each image labelled with its folder's label."""
    stats = SkipCounter()

    def items() -> Iterator[ClassificationItem]:
        stats.reset()
        for folder, label in zip(folders, labels, strict=True):
            for path in _folder_images(base / folder):
                stats.read += 1  # a path that fails to decode is counted by the protocol
                yield ClassificationItem(key=f"{folder}/{path.relative_to(base / folder).as_posix()}",
                                         image=path, label=label)

    size = sum(1 for folder in folders for _ in _folder_images(base / folder))  # listing only: progress bars
    return EvalSet(name=name, task=CLASSIFICATION, items=items, stats=stats, classnames=classnames,
                   templates=templates, size=size)


@register("imagenet1k")
def open_imagenet(root: Path, strict: bool, name: str = "imagenet1k", split: str = "val",
                  **options) -> list[EvalSet]:
    """ImageNet-1k in ImageFolder form: root/<split>/<wnid>/*.JPEG or root/<wnid>/*.JPEG. Labels are the
    standard indices of the wnids (sorted order), so a subset of class folders keeps its true labels and
    is scored against all 1,000 classes."""
    if options:
        raise ConfigError(f"{name}: unknown option(s) {', '.join(sorted(options))}. Fix: only 'split' is read")
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    base = next((b for b in (root / split, root) if b.is_dir() and any(d in index for d in _subdirs(b))), None)
    if base is None:
        raise ConfigError(one_line(f"{name}: no ImageNet class folders (n01440764, ...) in '{root / split}' or "
                                   f"'{root}'. Fix: point --data-root at ImageNet's validation set in ImageFolder "
                                   "form, <root>/val/<wnid>/*.JPEG (docs/EVALUATION.md); other class-per-folder "
                                   "sets read as dataset 'imagefolder'"))
    folders = _subdirs(base)
    if stray := [d for d in folders if d not in index]:
        raise ConfigError(one_line(f"{name}: '{base / stray[0]}' is not an ImageNet-1k class folder ({len(stray)} "
                                   "such). Fix: move non-wnid folders out of it, or read the folder as dataset "
                                   "'imagefolder'"))
    if len(folders) < len(wnids):
        log.warning("%s: %d of %d class folders in %s; their images are scored against all %d classes",
                    name, len(folders), len(wnids), base, len(wnids))
    return [_folder_set(name, base, folders, [index[d] for d in folders], imagenet_classnames(),
                        openai_templates())]


@register("imagefolder")
def open_imagefolder(root: Path, strict: bool, name: str = "imagefolder", split: str | None = None,
                     templates: str | Path | Sequence[str] | None = None, **options) -> list[EvalSet]:
    """Any class-per-folder set: root[/<split>]/<class_name>/*.jpg. Class index = sorted folder order;
    class name = folder name with '_' read as a space; templates default to OpenAI's 80 ImageNet ones."""
    if options:
        raise ConfigError(f"{name}: unknown option(s) {', '.join(sorted(options))}. Fix: only 'split' and "
                          "'templates' are read")
    base = root / split if split else root
    if not base.is_dir():
        raise ConfigError(one_line(f"{name}: split folder '{base}' does not exist. Fix: set split to one of "
                                   f"{_subdirs(root)} or leave it unset"))
    folders = _subdirs(base)
    if len(folders) < 2:
        raise ConfigError(one_line(f"{name}: '{base}' holds {len(folders)} class folder(s); zero-shot "
                                   "classification needs at least 2. Fix: lay the images out as "
                                   "<root>/<class_name>/<image>, one folder per class"))
    classnames = [d.replace("_", " ").strip() for d in folders]
    templates = _templates_option(templates)
    return [_folder_set(name, base, folders, list(range(len(folders))), classnames, templates)]


# -- CLIP_benchmark's webdataset export ----------------------------------------------------------

def open_wds_classification(root: Path, strict: bool, name: str, split: str = "test") -> list[EvalSet]:
    """CLIP_benchmark's `clip_benchmark_export_wds` layout: root/classnames.txt, root/zeroshot_classification_
    templates.txt, root/<split>/nshards.txt and root/<split>/{0..N-1}.tar with members <key>.cls (class index
    as text) and <key>.webp|.png|.jpg|.jpeg. Called by the 'wds/' opener when root/classnames.txt exists."""
    kind_file = root / "dataset_type.txt"
    if kind_file.is_file() and kind_file.read_text(encoding="utf-8", errors="replace").strip().lower() == "multilabel":
        raise ConfigError(f"{name}: '{kind_file}' says multilabel; multi-label sets (.npy targets, scored by mean "
                          "average precision) are not supported. Fix: evaluate a single-label set")
    try:
        classnames = _read_lines(root / "classnames.txt")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(one_line(f"{name}: cannot read '{root / 'classnames.txt'}' ({type(e).__name__}). Fix: "
                                   "one UTF-8 class name per line, in class-index order")) from None
    if not classnames or "" in classnames:
        line = classnames.index("") + 1 if "" in classnames else 1
        raise ConfigError(one_line(f"{name}: '{root / 'classnames.txt'}' line {line} is empty. Fix: one class name "
                                   "per line, in class-index order"))
    templates_file = root / "zeroshot_classification_templates.txt"
    if not templates_file.is_file():
        openai = METADATA / "openai_imagenet_templates.txt"
        raise ConfigError(one_line(f"{name}: '{templates_file}' is missing. Fix: add it, one template per line "
                                   f"with '{{c}}' for the class name (e.g. copy {openai})"))
    templates = _check_templates(_read_lines(templates_file), str(templates_file))
    split_dir = root / split
    if not split_dir.is_dir():
        raise ConfigError(one_line(f"{name}: split '{split}' not found: '{split_dir}' does not exist. Fix: set "
                                   f"split to one of {_subdirs(root)}"))
    nshards_file = split_dir / "nshards.txt"
    try:
        nshards = int(nshards_file.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(one_line(f"{name}: cannot read the shard count from '{nshards_file}' ({type(e).__name__})."
                                   " Fix: write the number of shards N there (shards are 0.tar .. N-1.tar)")) from None
    if nshards < 1:
        raise ConfigError(f"{name}: '{nshards_file}' says {nshards} shards. Fix: write N >= 1")
    shards = [split_dir / f"{i}.tar" for i in range(nshards)]
    stats = SkipCounter()

    def items() -> Iterator[ClassificationItem]:
        stats.reset()
        for shard in shards:
            yield from _wds_shard(shard, len(classnames), stats, strict)

    return [EvalSet(name=name, task=CLASSIFICATION, items=items, stats=stats, classnames=classnames,
                    templates=templates)]


def _wds_shard(shard: Path, num_classes: int, stats: SkipCounter, strict: bool) -> Iterator[ClassificationItem]:
    for raw, where, image in shard_samples(shard, stats, strict):
        if "cls" not in raw:
            fail(stats, strict, "missing class index", where, "no .cls member")
            continue
        label = _class_index(raw["cls"], num_classes)
        if label is None:
            shown = bytes(raw["cls"][:40]).decode("utf-8", errors="replace").strip()
            fail(stats, strict, "bad class index", where, f"'{shown}' is not an integer in 0..{num_classes - 1}")
            continue
        stats.read += 1
        yield ClassificationItem(key=raw.get("__key__", "?"), image=image, label=label)


def _class_index(raw: bytes, num_classes: int) -> int | None:
    try:
        text = bytes(raw).decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not re.fullmatch(r"[0-9]+", text):  # int() would also take '+3', '3_0' and non-ASCII digits
        return None
    label = int(text)
    return label if label < num_classes else None


# -- protocol ------------------------------------------------------------------------------------

@torch.no_grad()
def zero_shot_classifier(encode_texts: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                         templates: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """OpenAI's prompt ensembling: per class, embed every template's text, L2-normalise, average, L2-normalise.
    `encode_texts(texts) -> [B, E]`. Returns [C, E] float32 (rows unit length) on encode_texts' device.
    Batches span classes, and only per-class sums are kept: C*T texts (80k for ImageNet) never sit in memory
    as embeddings."""
    if not classnames or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    texts = [(c, t.replace("{c}", name)) for c, name in enumerate(classnames) for t in templates]
    sums: torch.Tensor | None = None  # [C, E]
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        emb = F.normalize(encode_texts([t for _, t in chunk]).float(), dim=-1)  # [B, E]
        if sums is None:
            sums = emb.new_zeros(len(classnames), emb.shape[-1])
        sums.index_add_(0, torch.tensor([c for c, _ in chunk], device=emb.device), emb)
    # mean then normalise == normalise the sum: every class has the same number of templates
    return F.normalize(sums, dim=-1)


def ranks_and_predictions(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, from one batch: the true class's rank (0 = top-1) and the top-1 class, both [N] on CPU.
    Ties rank the lower class index first (torch.argmax's rule), so results do not depend on topk's order;
    a NaN logit never wins. Kept per batch, so memory grows with images, never with images x classes."""
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits must be [N, C] and targets [N]; got {tuple(logits.shape)}, {tuple(targets.shape)}")
    c = logits.shape[1]
    targets = targets.long().cpu()
    if len(targets) and (targets.min() < 0 or targets.max() >= c):
        raise ValueError(f"targets must be class indices in 0..{c - 1}")
    logits = torch.nan_to_num(logits.float().cpu(), nan=float("-inf"))
    # rank of the true class = classes scoring higher + equal-scoring classes with a lower index
    true_score = logits.gather(1, targets[:, None])  # [N, 1]
    lower_index = torch.arange(c)[None, :] < targets[:, None]  # [N, C]
    rank = (logits > true_score).sum(1) + ((logits == true_score) & lower_index).sum(1)  # [N]
    return rank, logits.argmax(1)


def metrics_from_ranks(ranks: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor,
                       num_classes: int) -> dict[str, float]:
    """ranks, predictions, targets [N] -> {'acc1', 'acc5', 'mean_per_class_recall'}, fractions. acc5 only
    with 5 or more classes (CLIP_benchmark writes NaN there; we leave the key out, so the JSON stays JSON).
    mean_per_class_recall is sklearn's balanced accuracy of the top-1 predictions: the mean recall over
    the classes that have samples (an ImageNet subset is scored against all 1,000 classes)."""
    from sklearn.metrics import balanced_accuracy_score

    if len(targets) == 0:
        raise DataError("no images to score: every sample was skipped. Fix: see the skip summary above")
    with warnings.catch_warnings():  # classes predicted but absent (an ImageNet subset) are dropped: intended
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        recall = balanced_accuracy_score(targets.numpy(), predictions.numpy())
    out = {"acc1": (ranks < 1).float().mean().item()}
    if num_classes >= 5:
        out["acc5"] = (ranks < 5).float().mean().item()
    out["mean_per_class_recall"] = float(recall)
    return out


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """`logits` [N, C], `targets` [N] -> metrics_from_ranks' dict, for a whole set at once."""
    ranks, predictions = ranks_and_predictions(logits, targets)
    return metrics_from_ranks(ranks, predictions, targets.long().cpu(), logits.shape[1])
