"""What every benchmark reader yields, and the registry that maps dataset names to readers.

A reader streams items with the image *undecoded* (a path or the bytes from a tar member): the
protocol decodes and preprocesses them in batches, so no split ever sits in memory as pixels.
Bad samples are skipped and counted in `stats` (a missing image is counted by the protocol when it
fails to decode), or raise DataError under `strict`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..data.readers import SkipCounter
from ..errors import ConfigError

RETRIEVAL, CLASSIFICATION = "zeroshot_retrieval", "zeroshot_classification"


@dataclass
class RetrievalItem:
    key: str  # unique within the set: the image file's name or the tar member's key
    image: bytes | Path  # undecoded
    captions: list[str]  # one or more, none empty
    # one id per caption where a caption belongs to several images (Chinese-CLIP's texts list image_ids):
    # such a text is scored once, a hit when any of its images ranks; None: every caption is its own
    caption_ids: list[str] | None = None


@dataclass
class ClassificationItem:
    key: str
    image: bytes | Path
    label: int  # index into EvalSet.classnames


@dataclass
class EvalSet:
    """One scored set: a (dataset, language) pair. `items` is a callable so the set can be read twice
    (e.g. in strict mode after a dry count) and so nothing is read before the protocol starts."""

    name: str  # CLIP_benchmark's name where it has one ('flickr30k', 'mscoco_captions', 'imagenet1k',
    #            'wds/<name>', 'xm3600'), ours otherwise ('urban1k', 'docci', 'sharegpt4v', 'dci')
    task: str  # RETRIEVAL | CLASSIFICATION
    items: Callable[[], Iterator[RetrievalItem | ClassificationItem]]
    language: str = "en"
    stats: SkipCounter = field(default_factory=SkipCounter)
    classnames: list[str] | None = None  # classification only
    templates: list[str] | None = None  # classification only: '{c}' is replaced by the class name
    folds: int = 1  # retrieval: >1 also reports the mean over that many equal consecutive image folds (COCO 1k)
    size: int | None = None  # number of images when known up front (progress bars only)


# dataset name -> opener(root: Path, strict: bool, **options) -> list[EvalSet] (several for per-language sets)
Opener = Callable[..., list[EvalSet]]
REGISTRY: dict[str, Opener] = {}


def register(*names: str):
    def wrap(fn: Opener) -> Opener:
        for name in names:
            REGISTRY[name] = fn
        return fn
    return wrap


def open_dataset(name: str, root: str | Path, strict: bool = False, **options) -> list[EvalSet]:
    """The sets of benchmark `name` under `root`; a clear error when the name or the layout is unknown."""
    from . import classification, retrieval_long_multilingual, retrieval_sets, shapes  # noqa: F401  (registry)

    opener = REGISTRY.get(name) or (REGISTRY.get("wds/") if name.startswith("wds/") else None)
    if opener is None:
        names = ", ".join("wds/<name>" if n == "wds/" else n for n in sorted(REGISTRY))
        raise ConfigError(f"unknown dataset '{name}'. Fix: choose from {names} "
                          "(docs/EVALUATION.md gives each one's layout)")
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"--data-root '{root}' does not exist. Fix: point it at the {name} folder "
                          "(docs/EVALUATION.md gives its layout)")
    return opener(root, strict, name=name, **options)
