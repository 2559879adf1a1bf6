"""Readers for the standard image-text retrieval benchmarks, laid out as each one ships (docs/EVALUATION.md).

An opener finds the annotation file under --data-root and reads it (captions only, small), then returns
EvalSets whose items() stream the images undecoded: a path, checked with is_file() so a missing file is
counted here, or the bytes of a tar member. Files, fields and caption rules follow the evaluators the
papers report with. Here: CLIP_benchmark's sets (flickr30k, mscoco_captions in Karpathy's, BLIP's or
CLIP_benchmark's release; wds/* exports) and the shared helpers. The long-caption and multilingual sets
(urban1k, docci, sharegpt4v, dci, xm3600, flickr30k-cn, coco-cn) live in retrieval_long_multilingual.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.readers import SkipCounter, fail
from ..errors import ConfigError, DataError, one_line
from .base import RETRIEVAL, EvalSet, RetrievalItem, register
from .wds import shard_samples

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

Problem = tuple[str, str, str]  # (reason, where, detail) found while indexing; counted on every items() pass


@dataclass
class Row:
    key: str  # unique within the set
    image: Path
    captions: Any  # str | list as the annotation has it; cleaned when read
    where: str  # 'file:line' or 'file[index]', for messages


# -- shared ----------------------------------------------------------------------------------------

def make_set(name: str, produce: Callable[[SkipCounter], Iterator[RetrievalItem]], strict: bool, *,
             size: int | None = None, language: str = "en", folds: int = 1,
             problems: Sequence[Problem] = ()) -> EvalSet:
    evalset = EvalSet(name=name, task=RETRIEVAL, items=lambda: iter(()), language=language, folds=folds, size=size)
    stats = evalset.stats

    def items() -> Iterator[RetrievalItem]:
        stats.reset()  # each pass describes itself: a second read must not double the counts
        for reason, where, detail in problems:
            fail(stats, strict, reason, where, detail)
        for item in produce(stats):
            stats.read += 1
            yield item

    evalset.items = items
    return evalset


def clean_captions(value: Any) -> list[str]:
    """Non-empty stripped strings; an empty one among others is dropped (the image still has captions)."""
    values = value if isinstance(value, list) else [value]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def path_set(name: str, rows: Sequence[Row], strict: bool, **kw) -> EvalSet:
    def produce(stats: SkipCounter) -> Iterator[RetrievalItem]:
        for row in rows:
            captions = clean_captions(row.captions)
            if not captions:
                fail(stats, strict, "empty caption", row.where, f"no non-empty caption for {row.key}")
            elif not row.image.is_file():
                fail(stats, strict, "missing image file", row.where, f"{row.image} does not exist")
            else:
                yield RetrievalItem(key=row.key, image=row.image, captions=captions)

    return make_set(name, produce, strict, size=len(rows), **kw)


def check_options(name: str, options: dict, read: str) -> None:
    options.pop("languages", None)  # --language is for multilingual sets; a monolingual one has nothing to pick
    if options:
        raise ConfigError(f"{name}: unknown option(s) {', '.join(sorted(options))}. Fix: only {read} is read")


def no_split(name: str, split: str | None) -> None:
    if split not in (None, "test"):
        raise ConfigError(f"{name}: has no '{split}' split (the whole set is the test set). Fix: drop --split")


def layout_error(name: str, root: Path, expected: str, fix: str) -> ConfigError:
    return ConfigError(one_line(f"{name}: no {expected} under '{root}'. Fix: {fix} (docs/EVALUATION.md)"))


def find_file(root: Path, names: Sequence[str], subdirs: Sequence[str] = ("", "annotations")) -> Path | None:
    return next((root / d / n for n in names for d in subdirs if (root / d / n).is_file()), None)


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(one_line(f"{path}: not valid JSON ({type(e).__name__}: {e}). Fix: download it again")) from None


def pick_base(candidates: Sequence[Path], rels: Sequence[str]) -> Path:
    """The folder the annotation's relative image paths resolve under: the first candidate holding one of
    the first few images (a few stat calls), else the first candidate, so misses name the expected path."""
    probe = [r for r in rels if r][:5]
    return next((b for b in candidates if any((b / r).is_file() for r in probe)), candidates[0])


def natural(stem: str) -> tuple:
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)  # Urban-1k's 1..1000, not 1, 10, 100


def json_lines(path: Path) -> Iterator[tuple[str, Any | None, str]]:
    """(where, object or None, problem detail) per non-blank line of a JSONL file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(raw.decode("utf-8")), ""
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield where, None, f"{type(e).__name__}: {e}"


# -- Flickr30k and MS-COCO (Karpathy test splits) --------------------------------------------------

KARPATHY = {"flickr30k": "dataset_flickr30k.json", "mscoco_captions": "dataset_coco.json"}  # Karpathy's release
BLIP = {"flickr30k": "flickr30k_{split}.json", "mscoco_captions": "coco_karpathy_{split}.json"}  # BLIP / LLM2CLIP
CLIP_BENCHMARK = {"flickr30k": "flickr30k_{split}_karpathy.txt", "mscoco_captions": "coco_{split}_karpathy.json"}


@register("flickr30k", "mscoco_captions")
def open_karpathy(root: Path, strict: bool, name: str, split: str | None = None, **options) -> list[EvalSet]:
    """Flickr30k / COCO Karpathy splits in any of three releases; every caption of an image is kept (5, or
    more for some COCO images). COCO also reports the 1k protocol: the mean over 5 folds of 1,000 images."""
    check_options(name, options, "'split'")
    split = split or "test"
    coco = name == "mscoco_captions"
    if path := find_file(root, [KARPATHY[name]]):
        rows, problems = karpathy_rows(path, root, split, coco)
    elif path := find_file(root, [BLIP[name].format(split=split)] + ([f"{split}.json"] if not coco else [])):
        rows, problems = blip_rows(path, root)  # LLM2CLIP's setup script saves BLIP's Flickr file as test.json
    elif path := find_file(root, [CLIP_BENCHMARK[name].format(split=split)]):
        rows, problems = (coco_format_rows if coco else flickr_txt_rows)(path, root)
    else:
        names = [KARPATHY[name], BLIP[name].format(split=split), CLIP_BENCHMARK[name].format(split=split)]
        images = "val2014/" if coco else "flickr30k-images/"
        raise layout_error(name, root, f"annotation file ({' or '.join(names)})",
                           f"download one next to {images} and point --data-root at that folder")
    return [path_set(name, rows, strict, folds=5 if coco else 1, problems=problems)]


def karpathy_rows(path: Path, root: Path, split: str, coco: bool) -> tuple[list[Row], list[Problem]]:
    """Karpathy's dataset_*.json: images[] with filename, filepath (COCO: val2014 / train2014), split
    (train | val | test | restval) and sentences[].raw; file order kept, so COCO's 5 folds are the usual ones."""
    data = load_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: has no 'images' list. Fix: use Karpathy's dataset_*.json as released")
    found, rels, problems = [], [], []
    for i, image in enumerate(images):
        if not isinstance(image, dict) or image.get("split") != split:
            continue
        where = f"{path}:images[{i}]"
        filename = image.get("filename")
        if not isinstance(filename, str) or not filename:
            problems.append(("malformed row", where, "no 'filename'"))
            continue
        rel = f"{image.get('filepath') or ''}/{filename}".lstrip("/") if coco else filename
        sentences = image.get("sentences")
        captions = [s.get("raw") for s in sentences if isinstance(s, dict)] if isinstance(sentences, list) else []
        found.append((filename, rel, captions, where))
        rels.append(rel)
    if not found and not problems:
        splits = sorted({str(im.get("split")) for im in images if isinstance(im, dict)})
        raise ConfigError(f"{path}: no image has split '{split}'. Fix: set --split to one of {', '.join(splits)}")
    flickr_dirs = ("flickr30k-images", "flickr30k_images", "images", "")  # official tarball, Kaggle copy, ...
    bases = [root, root / "images"] if coco else [root / d for d in flickr_dirs]
    base = pick_base(bases, rels)
    return [Row(key, base / rel, captions, where) for key, rel, captions, where in found], problems


def blip_rows(path: Path, root: Path) -> tuple[list[Row], list[Problem]]:
    """BLIP's flickr30k_test.json / coco_karpathy_test.json: [{image: 'flickr30k-images/x.jpg' or
    'val2014/COCO_val2014_x.jpg', caption: [...]}], paths relative to the dataset folder."""
    data = load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of {{image, caption}} entries (BLIP's format). Fix: download "
                        "it again, or remove it if it is another file")
    found, problems = [], []
    for i, entry in enumerate(data):
        where = f"{path}[{i}]"
        image = entry.get("image") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not image:
            problems.append(("malformed row", where, "no 'image' path"))
            continue
        found.append((image, entry.get("caption"), where))
    base = pick_base([root, root / "images"], [image for image, _, _ in found])
    return [Row(Path(image).name, base / image, captions, where) for image, captions, where in found], problems


def coco_format_rows(path: Path, root: Path) -> tuple[list[Row], list[Problem]]:
    """CLIP_benchmark's coco_test_karpathy.json in COCO format (images[{id, file_name}], annotations[{image_id,
    caption}]) read as torchvision's CocoCaptions does: images by id, captions in file order."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: expected COCO format with 'images' and 'annotations' lists. Fix: download it again")
    captions: dict[Any, list] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict):
            captions.setdefault(ann.get("image_id"), []).append(ann.get("caption"))
    found, problems = [], []
    for i, image in enumerate(data["images"]):
        where = f"{path}:images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("file_name"), str) or "id" not in image:
            problems.append(("malformed row", where, "no 'id' and 'file_name'"))
            continue
        found.append((image["id"], image["file_name"], captions.get(image["id"], []), where))
    found.sort(key=lambda f: (str(type(f[0])), f[0]))
    bases = [root / "val2014", root / "train2014", root, root / "images" / "val2014", root / "images"]
    base = pick_base(bases, [f[1] for f in found])
    return [Row(Path(file).name, base / file, caps, where) for _, file, caps, where in found], problems


def flickr_txt_rows(path: Path, root: Path) -> tuple[list[Row], list[Problem]]:
    """CLIP_benchmark's flickr30k_test_karpathy.txt: a header, then 'name.jpg,caption' lines (a caption may hold
    commas), several lines per image; images directly in the dataset folder."""
    captions: dict[str, list[str]] = {}
    wheres: dict[str, str] = {}
    problems = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 or not line.strip():
                continue
            image, sep, caption = line.strip().partition(".jpg,")
            if not sep:
                problems.append(("malformed row", f"{path}:{lineno}", "expected 'name.jpg,caption'"))
                continue
            wheres.setdefault(image + ".jpg", f"{path}:{lineno}")
            captions.setdefault(image + ".jpg", []).append(caption)
    base = pick_base([root, root / "flickr30k-images", root / "flickr30k_images"], list(captions))
    return [Row(image, base / image, caps, wheres[image]) for image, caps in captions.items()], problems


# -- CLIP_benchmark's webdataset export --------------------------------------------------------------

@register("wds/")
def open_wds(root: Path, strict: bool, name: str, split: str | None = None, **options) -> list[EvalSet]:
    """clip_benchmark_export_wds --retrieval: root/dataset_type.txt ('retrieval'), root/<split>/nshards.txt and
    root/<split>/{0..N-1}.tar with <key>.webp|.png|.jpg and <key>.txt (the captions, one per line). A
    classification export (root/classnames.txt) is handed to the classification reader."""
    check_options(name, options, "'split'")
    split = split or "test"
    kind_file = root / "dataset_type.txt"
    kind = kind_file.read_text(encoding="utf-8", errors="replace").strip().lower() if kind_file.is_file() else None
    if kind != "retrieval" and ((root / "classnames.txt").is_file() or kind in ("classification", "multilabel")):
        from .classification import open_wds_classification

        return open_wds_classification(root, strict, name, split)
    split_dir = root / split
    if not split_dir.is_dir():
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise layout_error(name, root, f"split folder '{split}/' (found {subdirs or 'none'})",
                           "point --data-root at the export (holding dataset_type.txt and <split>/0.tar ...) "
                           "or set --split")
    shards = wds_shards(name, split_dir)
    if kind is None and wds_looks_like_classification(shards[0]):
        raise ConfigError(one_line(f"{name}: '{shards[0]}' holds .cls labels, not .txt captions, and '{root}' has "
                                   "no classnames.txt. Fix: add classnames.txt and zeroshot_classification_"
                                   "templates.txt to read it as a classification set"))
    folds = 5 if name.removeprefix("wds/") == "mscoco_captions" else 1

    def produce(stats: SkipCounter) -> Iterator[RetrievalItem]:
        for shard in shards:
            yield from wds_shard(shard, stats, strict)

    return [make_set(name, produce, strict, folds=folds)]


def wds_shards(name: str, split_dir: Path) -> list[Path]:
    nshards_file = split_dir / "nshards.txt"
    if nshards_file.is_file():
        try:
            count = int(nshards_file.read_text(encoding="utf-8").strip())
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(f"{name}: '{nshards_file}' does not hold a shard count. Fix: write the number N "
                              "of shards (0.tar .. N-1.tar)") from None
        if count >= 1:
            return [split_dir / f"{i}.tar" for i in range(count)]
    shards = sorted(split_dir.glob("*.tar"), key=lambda p: natural(p.stem))  # nshards.txt lost: the tars there
    if not shards:
        raise layout_error(name, split_dir, "nshards.txt or *.tar shards",
                           "point --data-root at a clip_benchmark_export_wds folder")
    return shards


def wds_looks_like_classification(shard: Path) -> bool:
    import tarfile

    try:
        with tarfile.open(shard) as tar:
            names = [m.name for _, m in zip(range(16), tar, strict=False)]
    except (OSError, tarfile.TarError):
        return False  # counted as a corrupt shard when read
    return any(n.endswith(".cls") for n in names) and not any(n.endswith(".txt") for n in names)


def wds_shard(shard: Path, stats: SkipCounter, strict: bool) -> Iterator[RetrievalItem]:
    for raw, where, image in shard_samples(shard, stats, strict):
        yield from wds_sample(raw, where, image, stats, strict)


def wds_sample(raw: dict, where: str, image: bytes, stats: SkipCounter, strict: bool) -> Iterator[RetrievalItem]:
    key = raw.get("__key__", "?")
    try:  # CLIP_benchmark reads the .txt with str.splitlines: one caption per line
        captions = clean_captions(bytes(raw.get("txt", b"")).decode("utf-8").splitlines())
    except UnicodeDecodeError:
        fail(stats, strict, "invalid utf-8", where, f"{key}.txt is not valid UTF-8")
        return
    if not captions:
        fail(stats, strict, "empty caption", where, f"no .txt member or no non-empty line in {key}.txt")
        return
    yield RetrievalItem(key=key, image=image, captions=captions)
