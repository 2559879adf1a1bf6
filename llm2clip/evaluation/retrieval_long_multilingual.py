"""The retrieval sets beyond CLIP_benchmark's English ones, as each ships (helpers: retrieval_sets.py).

Long captions, one per image, scored image <-> caption (Long-CLIP's and LLM2CLIP's evaluators): urban1k,
docci, sharegpt4v, dci. Multilingual: xm3600 (one set per language) and Chinese-CLIP's flickr30k-cn and
coco-cn (base64 images in a TSV, read in one streaming pass).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..data.readers import SkipCounter, fail
from ..errors import ConfigError, DataError, one_line
from .base import EvalSet, RetrievalItem, register
from .retrieval_sets import (
    IMAGE_SUFFIXES,
    Problem,
    Row,
    check_options,
    clean_captions,
    find_file,
    json_lines,
    layout_error,
    load_json,
    make_set,
    natural,
    no_split,
    path_set,
    pick_base,
)

JSON_CHUNK = 1 << 20  # characters read at a time by json_array
SHARE4V = "share-captioner_coco_lcs_sam_1246k_1107.json"


# -- Urban-1k ---------------------------------------------------------------------------------------

@register("urban1k")
def open_urban1k(root: Path, strict: bool, name: str, split: str | None = None, **options) -> list[EvalSet]:
    """Urban1k.zip: image/<n>.jpg and caption/<n>.txt, n = 1..1000; the caption is the file's first line."""
    check_options(name, options, "nothing")
    no_split(name, split)
    base = next((b for b in (root, root / "Urban1k") if (b / "caption").is_dir()), None)
    if base is None:
        raise layout_error(name, root, "caption/ folder (caption/<n>.txt beside image/<n>.jpg)",
                           "unzip Urban1k.zip and point --data-root at the Urban1k folder")
    captions = {p.stem: p for p in (base / "caption").glob("*.txt")}
    images = {p.stem: p for p in (base / "image").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    stems = sorted(set(captions) | set(images), key=natural)

    def produce(stats: SkipCounter) -> Iterator[RetrievalItem]:
        for stem in stems:
            where = str(captions.get(stem) or images[stem])
            try:
                lines = captions[stem].read_bytes().decode("utf-8").splitlines() if stem in captions else []
            except UnicodeDecodeError:
                fail(stats, strict, "invalid utf-8", where, "the caption file is not valid UTF-8")
                continue
            caption = next((line.strip() for line in lines if line.strip()), "")
            image = images.get(stem, base / "image" / f"{stem}.jpg")
            if not caption:
                fail(stats, strict, "empty caption", where, "no caption file" if stem not in captions else "empty file")
            elif not image.is_file():
                fail(stats, strict, "missing image file", where, f"{image} does not exist")
            else:
                yield RetrievalItem(key=image.name, image=image, captions=[caption])

    return [make_set(name, produce, strict, size=len(stems))]


# -- DOCCI ------------------------------------------------------------------------------------------

@register("docci")
def open_docci(root: Path, strict: bool, name: str, split: str | None = None, **options) -> list[EvalSet]:
    """docci_descriptions.jsonlines (example_id, split, image_file, description) and images/<image_file>;
    the test split (5,000 images) by default, each scored with its one long description."""
    check_options(name, options, "'split'")
    split = split or "test"
    path = find_file(root, ["docci_descriptions.jsonlines"], ("", "data"))
    if path is None:
        raise layout_error(name, root, "docci_descriptions.jsonlines",
                           "download it and docci_images.tar.gz (images/) into one folder and point --data-root there")
    found, problems, splits = [], [], set()
    for where, row, detail in json_lines(path):
        if row is None or not isinstance(row, dict):
            problems.append(("malformed json", where, detail or "a line must be an object"))
            continue
        splits.add(str(row.get("split")))
        if row.get("split") != split:
            continue
        image = row.get("image_file")
        if not isinstance(image, str) or not image:
            problems.append(("malformed row", where, "no 'image_file'"))
            continue
        found.append((image, row.get("description"), where))
    if not found and not problems:
        raise ConfigError(f"{path}: no row has split '{split}'. Fix: set --split to one of {', '.join(sorted(splits))}")
    base = pick_base([root / "images", root], [image for image, _, _ in found])
    rows = [Row(Path(image).name, base / image, caption, where) for image, caption, where in found]
    return [path_set(name, rows, strict, problems=problems)]


# -- ShareGPT4V-1k ----------------------------------------------------------------------------------

@register("sharegpt4v")
def open_sharegpt4v(root: Path, strict: bool, name: str, split: str | None = None, limit: int | None = 1000,
                    **options) -> list[EvalSet]:
    """The first `limit` (1,000) entries of ShareGPT4V's share-captioner JSON ([{image, conversations: [human,
    gpt]}]); caption = the gpt turn with newlines as spaces, image = <root>/<image> (coco/..., sam/..., ...),
    as Long-CLIP's share4v_val_dataset. limit=None or 0 reads every entry."""
    check_options(name, options, "'limit'")
    no_split(name, split)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ConfigError(f"{name}: limit must be a whole number >= 0, not {limit!r}")
    candidates = [root / SHARE4V] if (root / SHARE4V).is_file() else sorted(root.glob("*.json"))
    path = next((p for p in candidates if _share4v_entry(_first(p))), None)
    if path is None:
        raise layout_error(name, root, f"{SHARE4V} (or another JSON list of {{image, conversations}})",
                           "download it from the ShareGPT4V dataset and put it beside the images' coco/, sam/ ... "
                           "folders")
    found, problems = [], []
    try:
        for i, entry in enumerate(json_array(path)):
            if limit and i >= limit:
                break
            where = f"{path}[{i}]"
            if not _share4v_entry(entry):
                problems.append(("malformed row", where, "no 'image' path"))
                continue
            found.append((entry["image"], _gpt_caption(entry), where))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(one_line(f"{path}: not a readable JSON list ({type(e).__name__}: {e}). Fix: download it "
                                 "again")) from None
    base = pick_base([root, root / "data"], [image for image, _, _ in found])
    rows = [Row(image, base / image, caption, where) for image, caption, where in found]
    return [path_set(name, rows, strict, problems=problems)]


def _first(path: Path) -> Any:
    try:
        return next(json_array(path), None)
    except (ValueError, UnicodeDecodeError, OSError):
        return None


def _share4v_entry(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("image"), str) and bool(entry["image"]) \
        and ("conversations" in entry or "caption" in entry)


def _gpt_caption(entry: dict) -> str | None:
    turns = entry.get("conversations")
    if isinstance(turns, list):  # the share-captioner file: [{from: human, ...}, {from: gpt, value: caption}]
        text = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    else:  # LLM2CLIP's derived validation_1k.json: {image, caption}
        text = entry.get("caption")
    return text.replace("\n", " ") if isinstance(text, str) else None


def json_array(path: Path) -> Iterator[Any]:
    """The elements of the JSON array in `path`, parsed incrementally: the share-captioner file holds 1.2M
    entries (gigabytes as Python objects) and the benchmark reads its first 1,000."""
    decoder, ws = json.JSONDecoder(), re.compile(r"\s*")
    with open(path, encoding="utf-8") as f:
        buf, pos, eof, state = "", 0, False, "start"

        def more() -> None:
            nonlocal buf, pos, eof
            chunk = f.read(JSON_CHUNK)
            eof, buf, pos = not chunk, buf[pos:] + chunk, 0

        while True:
            pos = ws.match(buf, pos).end()
            if pos == len(buf):
                if eof:
                    raise ValueError("the file ends inside the array" if state != "start" else "the file is empty")
                more()
                continue
            char = buf[pos]
            if state == "start":
                if char != "[":
                    raise ValueError("the file is not a JSON array")
                pos, state = pos + 1, "first"
            elif char == "]" and state in ("first", "next"):
                return
            elif state == "next":
                if char != ",":
                    raise ValueError(f"expected ',' between entries, found {char!r}")
                pos, state = pos + 1, "value"
            else:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        raise
                    more()  # the entry runs past the buffer
                    continue
                if end == len(buf) and not eof and not isinstance(value, dict | list | str):
                    more()  # a number or literal may go on in the next chunk
                    continue
                yield value
                pos, state = end, "next"


# -- DCI (Densely Captioned Images) -------------------------------------------------------------------

@register("dci")
def open_dci(root: Path, strict: bool, name: str, split: str | None = None, **options) -> list[EvalSet]:
    """dci.tar.gz's densely_captioned_images/: splits.json ({train, valid, test: [<file>.json]}), annotations/
    <file>.json ({image, short_caption, extra_caption, ...}) and photos/<image> (from SA-1B's sa_000138.tar).
    Long-caption retrieval scores all 7,805 images (split 'all', every split in splits.json order), each with
    one caption: short_caption and extra_caption as sentences."""
    check_options(name, options, "'split'")
    split = split or "all"
    base = next((b for b in (root, root / "densely_captioned_images")
                 if (b / "annotations").is_dir() or (b / "complete").is_dir()), None)
    if base is None:
        raise layout_error(name, root, "annotations/ folder (densely_captioned_images/{splits.json, annotations/, "
                           "photos/})", "extract dci.tar.gz, put the sa_000138.tar images in photos/ and point "
                           "--data-root at densely_captioned_images")
    ann_dir = base / "annotations" if (base / "annotations").is_dir() else base / "complete"  # DCI's code: complete/
    if (base / "splits.json").is_file():
        splits = load_json(base / "splits.json")
        if not isinstance(splits, dict) or (split != "all" and split not in splits):
            raise ConfigError(f"{name}: split '{split}' is not in {base / 'splits.json'}. Fix: set --split to all or "
                              f"one of {', '.join(splits) if isinstance(splits, dict) else '(none: file malformed)'}")
        files = [f for s, names in splits.items() if split in ("all", s) for f in names if isinstance(f, str)]
    elif split == "all":
        files = sorted((p.name for p in ann_dir.glob("*.json")), key=lambda n: natural(Path(n).stem))
    else:
        raise ConfigError(f"{name}: no splits.json in '{base}' to pick split '{split}' from. Fix: drop --split")

    def produce(stats: SkipCounter) -> Iterator[RetrievalItem]:
        for file in files:
            where = str(ann_dir / file)
            try:
                anno = json.loads((ann_dir / file).read_bytes().decode("utf-8"))
            except FileNotFoundError:
                fail(stats, strict, "missing annotation file", where, "listed in splits.json but not on disk")
                continue
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                fail(stats, strict, "malformed json", where, f"{type(e).__name__}: {e}")
                continue
            image = anno.get("image") if isinstance(anno, dict) else None
            if not isinstance(image, str) or not image:
                fail(stats, strict, "malformed row", where, "no 'image'")
                continue
            caption = dci_caption(anno.get("short_caption"), anno.get("extra_caption"))
            if not caption:
                fail(stats, strict, "empty caption", where, "empty short_caption and extra_caption")
            elif not (base / "photos" / image).is_file():
                fail(stats, strict, "missing image file", where, f"{base / 'photos' / image} does not exist")
            else:
                yield RetrievalItem(key=image, image=base / "photos" / image, captions=[caption])

    return [make_set(name, produce, strict, size=len(files))]


def dci_caption(short: Any, extra: Any) -> str:
    """DCI's extended caption ('short\\nextra') as one paragraph: each line a sentence, as the long-caption
    evaluators join it."""
    text = "\n".join(t for t in (short, extra) if isinstance(t, str))
    lines = [line.strip() for line in re.split(r"\n|</s>", text) if line.strip()]
    return " ".join(line if line[-1] in ".!?" else line + "." for line in lines)


# -- Crossmodal-3600 ----------------------------------------------------------------------------------

@register("xm3600", "crossmodal3600")
def open_xm3600(root: Path, strict: bool, name: str, split: str | None = None,
                languages: str | Sequence[str] | None = None, captions: str = "first", **options) -> list[EvalSet]:
    """captions.jsonl ({"image/key": k, "<lang>": {"caption": [...]}, ...} per line) and images/<k>.jpg: one
    set per language (all 36 by default). captions='first' scores each image's first caption, as CLIP_benchmark's
    crossmodal3600.py; captions='all' keeps every one."""
    check_options(name, options, "'languages' and 'captions'")
    no_split(name, split)
    if captions not in ("first", "all"):
        raise ConfigError(f"{name}: captions must be 'first' or 'all', not {captions!r}")
    base = next((b for b in (root, root / "xm3600") if (b / "captions.jsonl").is_file()), None)
    if base is None:
        raise layout_error(name, root, "captions.jsonl", "unzip captions.zip and images.tgz (images/) into one "
                           "folder and point --data-root there")
    found, problems = [], []
    for where, line, detail in json_lines(base / "captions.jsonl"):
        key = line.get("image/key") if isinstance(line, dict) else None
        if not isinstance(key, str) or not key:
            problems.append(("malformed json" if line is None else "malformed row", where, detail or "no 'image/key'"))
            continue
        by_lang = {k: v.get("caption") for k, v in line.items() if isinstance(v, dict) and "caption" in v}
        found.append((key, by_lang, where))
    available = sorted({lang for _, by_lang, _ in found for lang in by_lang})
    wanted = [s.strip() for s in (languages.split(",") if isinstance(languages, str) else languages or available)]
    wanted = list(dict.fromkeys(s for s in wanted if s))  # 'en, zh,' and repeats from a comma list
    if unknown := [lang for lang in wanted if lang not in available]:
        raise ConfigError(f"{name}: no captions in language(s) {', '.join(unknown)} in {base / 'captions.jsonl'}. "
                          f"Fix: choose from {', '.join(available)}")
    sets = []
    for lang in wanted:
        rows = []
        for key, by_lang, where in found:
            caps = clean_captions(by_lang.get(lang))
            rows.append(Row(key, base / "images" / f"{key}.jpg", caps[:1] if captions == "first" else caps, where))
        sets.append(path_set(name, rows, strict, language=lang, problems=problems))
    return sets


# -- Chinese-CLIP's Flickr30k-CN and COCO-CN ---------------------------------------------------------

@register("flickr30k-cn", "coco-cn")
def open_chinese_clip(root: Path, strict: bool, name: str, split: str | None = None, **options) -> list[EvalSet]:
    """Chinese-CLIP's preprocessed release: <split>_imgs.tsv ('<image_id>\\t<base64 image>' per line) and
    <split>_texts.jsonl ({text_id, text, image_ids}); the test split by default. A text listing several
    images is scored once, a hit when any of them ranks (as Chinese-CLIP's evaluation); images arrive as
    bytes, decoded from base64 one line at a time."""
    check_options(name, options, "'split'")
    split = split or "test"
    folder = {"flickr30k-cn": "Flickr30k-CN", "coco-cn": "COCO-CN"}[name]
    base = next((b for b in (root, root / folder) if (b / f"{split}_texts.jsonl").is_file()), None)
    if base is None or not (base / f"{split}_imgs.tsv").is_file():
        raise layout_error(name, root, f"{split}_imgs.tsv and {split}_texts.jsonl",
                           f"unzip Chinese-CLIP's {folder}.zip and point --data-root at the {folder} folder")
    texts, tsv = base / f"{split}_texts.jsonl", base / f"{split}_imgs.tsv"
    by_image: dict[str, list] = {}
    problems: list[Problem] = []
    for where, line, detail in json_lines(texts):
        ids = line.get("image_ids") if isinstance(line, dict) else None
        if not isinstance(ids, list):
            problems.append(("malformed json" if line is None else "malformed row", where, detail or "no 'image_ids'"))
            continue
        for image_id in ids:
            by_image.setdefault(str(image_id), []).append((str(line.get("text_id", where)), line.get("text")))

    def produce(stats: SkipCounter) -> Iterator[RetrievalItem]:
        seen = set()
        with open(tsv, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{tsv}:{lineno}"
                image_id, tab, b64 = line.strip().partition(b"\t")
                key = image_id.decode("utf-8", errors="replace").strip()
                if not tab or not b64:
                    fail(stats, strict, "malformed row", where, "expected '<image_id>\\t<base64 image>'")
                    continue
                seen.add(key)
                pairs = [(i, t.strip()) for i, t in by_image.get(key, []) if isinstance(t, str) and t.strip()]
                if not pairs:
                    fail(stats, strict, "empty caption", where, f"no text in {texts.name} names image {key}")
                    continue
                try:  # Chinese-CLIP decodes with urlsafe_b64decode, which reads the standard alphabet too
                    image = base64.urlsafe_b64decode(b64)
                except (binascii.Error, ValueError) as e:
                    image, detail = b"", f"bad base64: {e}"
                else:
                    detail = "no base64 characters"  # the decoder drops the others silently
                if not image:
                    fail(stats, strict, "unreadable image", where, detail)
                    continue
                yield RetrievalItem(key=key, image=image, captions=[t for _, t in pairs],
                                    caption_ids=[i for i, _ in pairs])
        for key in by_image:
            if key not in seen:
                fail(stats, strict, "missing image", str(texts), f"image {key} is not in {tsv.name}")

    return [make_set(name, produce, strict, size=len(by_image), language="zh", problems=problems)]
