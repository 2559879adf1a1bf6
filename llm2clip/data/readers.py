"""One reader over JSONL, CSV, webdataset shards and image folders.

Every bad sample is skipped and counted under a stable reason name (`SkipCounter`), or, with
`strict=True`, raises `DataError` naming the file and line (or shard and key). Nothing else escapes.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import ConfigError, DataError, one_line
from .images import ImageSkip, load_image
from .tar import tar_end_problem

FORMATS = ("auto", "jsonl", "csv", "webdataset", "imagefolder")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class DataConfig:
    path: str = "${run.out_dir}/data/train.jsonl"  # .jsonl, .csv, shard pattern '{000..009}.tar', or folder
    format: str = "auto"  # auto | jsonl | csv | webdataset | imagefolder
    image_key: str = "image"  # JSONL/CSV column holding the image path
    short_caption_key: str = "short_caption"  # LLM2CLIP's column name
    long_caption_keys: list[str] = field(default_factory=lambda: ["long_caption", "long_caption_2"])
    image_root: str | None = None  # relative image paths resolve here (default: the file's folder)
    image_size: int = 64  # CLIP image processor size when the vision checkpoint brings none
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it
    max_image_pixels: int = 4096 * 4096  # larger images are skipped (decompression-bomb guard)
    max_caption_chars: int = 20_000  # longer captions are skipped as garbage

    def validate(self, require_exists: bool = False, key: str = "data.path") -> None:
        """`key`: the config key `path` came from (stage1.cc.data, cache.data, ...), named in errors."""
        if self.format not in FORMATS:
            raise ConfigError(f"data.format: '{self.format}' is not one of {', '.join(FORMATS)}")
        if self.image_size < 8 or self.max_image_pixels < 1 or self.max_caption_chars < 1:
            raise ConfigError("data.image_size must be >= 8; data.max_image_pixels and "
                              "data.max_caption_chars must be >= 1")
        if require_exists and not expand_paths(self.path):
            raise missing_path(key, self.path)


def missing_path(key: str, pattern: str) -> ConfigError:
    synth = " (the shapes world: `llm2clip data synth`)" if key == "data.path" else ""
    return ConfigError(one_line(f"{key}: nothing found at '{pattern}'. Fix: point {key} at a .jsonl/.csv file, a "
                                f"shard pattern such as 'shards/{{000000..000009}}.tar', or an image folder{synth}"))


@dataclass
class Sample:
    key: str
    image: Image.Image | bytes | Path | None  # RGB; raw bytes / path with decode_images=False; None without images
    short_caption: str | None
    long_captions: list[str]
    meta: dict[str, Any]  # every other field of the row (second-language captions, attributes, ...)
    source: str  # 'file:line' or 'shard.tar:key', for error messages


class SkipCounter:
    """Counts skipped samples by reason and keeps the first few locations of each."""

    def __init__(self, keep: int = 5):
        self._keep = keep
        self.reset()

    def skip(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        if len(kept := self.where.setdefault(reason, [])) < self._keep:
            kept.append(where)

    def reset(self) -> None:
        """Forget every count: a set read again (a second pass) describes itself, not both passes."""
        self.counts: Counter[str] = Counter()
        self.where: dict[str, list[str]] = {}
        self.read = 0

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return "\n".join([f"read {self.read} samples, skipped {self.skipped}"] + [
            f"  {n} x {reason}: {', '.join(self.where[reason])}{' ...' if n > self._keep else ''}"
            for reason, n in sorted(self.counts.items())])

    def brief(self) -> str:
        """The summary on one line, for error messages: 'read 3, skipped 2: 2 x bad conversation'."""
        reasons = ", ".join(f"{n} x {reason}" for reason, n in sorted(self.counts.items()))
        return f"read {self.read}, skipped {self.skipped}" + (f": {reasons}" if reasons else "")


def fail(stats: SkipCounter, strict: bool, reason: str, where: str, detail: str = "") -> None:
    """Count a bad sample under `reason`, or under strict mode raise DataError naming `where`."""
    if strict:
        raise DataError(one_line(f"{where}: {reason}{': ' + detail if detail else ''}. Fix the sample, or turn "
                                 "strict mode off (data.strict=false; `llm2clip eval` without --strict) to skip it"))
    stats.skip(reason, where)


def decode_sample(sample: Sample, max_image_pixels: int) -> Sample:
    """A sample read with decode_images=False, its image decoded to RGB. Raises ImageSkip under the same
    reasons the reader uses ('missing image file' | 'image too large' | 'unreadable image')."""
    if sample.image is None or isinstance(sample.image, Image.Image):
        return sample
    return replace(sample, image=load_image(sample.image, max_image_pixels))


def caption_fields(sample: Sample, cfg: DataConfig, extra_fields: tuple[str, ...] = ()) -> dict[str, str]:
    """Field name -> text: the short caption, the long ones under cfg.long_caption_keys, and the
    non-empty `extra_fields` text columns of sample.meta (e.g. second-language captions)."""
    fields = {}
    if sample.short_caption:
        fields[cfg.short_caption_key] = sample.short_caption
    fields.update(zip(cfg.long_caption_keys, sample.long_captions, strict=False))
    for name in extra_fields:
        if isinstance(sample.meta.get(name), str) and sample.meta[name].strip():
            fields[name] = sample.meta[name].strip()
    return fields


def expand_paths(pattern: str) -> list[str]:
    """Brace patterns ('a-{000..009}.tar'), globs, a file or a folder; only existing paths are kept."""
    import braceexpand

    out = []
    for p in braceexpand.braceexpand(pattern):
        out.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if Path(p).exists() else []))
    return out


def path_format(path: str) -> str | None:
    """The format a path shows: its suffix, or for a folder, shards (*.tar) or images; None if unknown."""
    if Path(path).is_dir():
        return "webdataset" if any(Path(path).glob("*.tar")) else "imagefolder"
    return next((fmt for suffix, fmt in ((".jsonl", "jsonl"), (".csv", "csv"), (".tar", "webdataset"))
                 if path.endswith(suffix)), None)


def detect_format(paths: list[str]) -> str:
    first = paths[0]
    if fmt := path_format(first):
        return fmt
    raise ConfigError(f"data.format: cannot tell the format of '{first}'; set data.format to one of "
                      f"{', '.join(FORMATS[1:])}")


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class CaptionReader:
    """Iterate `Sample`s from `cfg.path`; `stats` holds what was skipped and why."""

    def __init__(self, cfg: DataConfig, shard: tuple[int, int] = (0, 1), load_images: bool = True,
                 key: str = "data.path", decode_images: bool = True, paths: list[str] | None = None):
        """`shard=(k, n)`: keep rows k, k+n, k+2n, ... (per dataloader worker / rank); others are not decoded.
        `load_images=False`: text only (stage 1); `Sample.image` is None and images are not opened.
        `decode_images=False`: `Sample.image` is the image's raw bytes (shards) or its Path, decoded later
        with `decode_sample` (a shuffle buffer then holds bytes, not pixels).
        `paths`: read these files (a subset of cfg.path's, e.g. one consumer's shards) instead of all.
        `key`: the config key that named `cfg.path`, for error messages."""
        cfg.validate(require_exists=True, key=key)
        self.cfg = cfg
        self.paths = expand_paths(cfg.path)
        self.format = cfg.format if cfg.format != "auto" else detect_format(self.paths)
        for path in self.paths:  # e.g. a JSONL file read as a shard would be "1 x corrupt shard"
            if (shown := path_format(path)) not in (None, self.format):
                how = "set" if cfg.format != "auto" else "detected from the first path"
                raise ConfigError(one_line(f"data.format: '{self.format}' ({how}) does not fit '{path}', which is "
                                           f"{shown}. Fix: set data.format={shown} or auto, or read one format "
                                           "per path"))
        if self.format == "webdataset":  # a folder of shards: its .tar files
            self.paths = [s for p in self.paths for s in (sorted(glob.glob(str(Path(p) / "*.tar")))
                                                          if Path(p).is_dir() else [p])]
        if paths is not None:
            self.paths = list(paths)
        self.stats = SkipCounter()
        self.shard = shard
        self.load_images, self.decode_images = load_images, decode_images
        self._row = -1

    def __iter__(self) -> Iterator[Sample]:
        read = {"jsonl": self._jsonl, "csv": self._csv, "webdataset": self._webdataset,
                "imagefolder": self._imagefolder}[self.format]
        for path in self.paths:
            yield from read(path)

    # -- shared ------------------------------------------------------------------------------------
    def _fail(self, reason: str, where: str, detail: str = "", whole_file: bool = False) -> None:
        """`whole_file`: a problem every row slice (`shard`) meets; only slice 0 counts it, so the
        slices' counts add up to one."""
        if whole_file and self.shard[0] != 0 and not self.cfg.strict:
            return
        fail(self.stats, self.cfg.strict, reason, where, detail)

    def _emit(self, build, where: str) -> Iterator[Sample]:
        self._row += 1
        if self._row % self.shard[1] != self.shard[0]:
            return
        try:
            sample = build()
        except _Skip as e:
            self._fail(e.reason, where, e.detail)
            return
        except ImageSkip as e:
            self._fail(e.reason, where, e.detail)
            return
        self.stats.read += 1
        yield sample

    def _caption(self, value: Any, name: str) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise _Skip("malformed row", f"caption '{name}' is {type(value).__name__}, not text")
        try:
            value.encode("utf-8")  # lone surrogates = bytes that were not UTF-8 (see _csv)
        except UnicodeEncodeError:
            raise _Skip("invalid utf-8", f"caption '{name}' is not valid UTF-8") from None
        value = value.strip()
        if len(value) > self.cfg.max_caption_chars:
            raise _Skip("caption too long", f"'{name}' has {len(value)} characters > data.max_caption_chars")
        return value or None

    def _from_fields(self, row: dict, key: str, where: str, image: bytes | Path) -> Sample:
        cfg = self.cfg
        short = self._caption(row.get(cfg.short_caption_key), cfg.short_caption_key)
        longs: list[str] = []
        for name in cfg.long_caption_keys:
            value = row.get(name)
            for v in value if isinstance(value, list) else [value]:
                if (text := self._caption(v, name)) is not None:
                    longs.append(text)
        if short is None and not longs:
            raise _Skip("empty caption", "no non-empty short or long caption")
        caption_keys = {cfg.short_caption_key, *cfg.long_caption_keys, cfg.image_key}
        meta = {k: v for k, v in row.items() if k not in caption_keys}
        if not self.load_images:
            return Sample(key, None, short, longs, meta, where)
        pixels = load_image(image, cfg.max_image_pixels) if self.decode_images else image
        return Sample(key, pixels, short, longs, meta, where)

    def _image_path(self, value: Any, file: str) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise _Skip("malformed row", f"no image path in column '{self.cfg.image_key}'")
        path = Path(value)
        return path if path.is_absolute() else Path(self.cfg.image_root or Path(file).parent) / path

    # -- formats -----------------------------------------------------------------------------------
    def _jsonl(self, file: str) -> Iterator[Sample]:
        with open(file, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{file}:{lineno}"
                if not raw.strip():
                    continue

                def build(raw=raw, where=where, lineno=lineno):
                    try:
                        row = json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        raise _Skip("invalid utf-8", "line is not valid UTF-8") from None
                    except json.JSONDecodeError as e:
                        raise _Skip("malformed json", str(e)) from None
                    if not isinstance(row, dict):
                        raise _Skip("malformed row", "a JSONL line must be an object")
                    key = str(row.get("key", lineno))
                    return self._from_fields(row, key, where, self._image_path(row.get(self.cfg.image_key), file))

                yield from self._emit(build, where)
    def _csv(self, file: str) -> Iterator[Sample]:
        # surrogateescape keeps bad bytes visible as lone surrogates, so one bad row is skipped, not the file
        text = Path(file).read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")  # Excel's BOM
        # one field may be as long as the file: over-long captions are then counted by their own rule
        csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
        # strict: an opening quote never closed is an error, not a caption swallowing the rest of the file
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
        try:
            header = reader.fieldnames or []
        except csv.Error as e:
            self._fail("malformed csv", f"{file}:1", str(e), whole_file=True)
            return
        needed = [self.cfg.image_key]
        captions = [self.cfg.short_caption_key, *self.cfg.long_caption_keys]
        if self.cfg.image_key not in header or not any(c in header for c in captions):
            missing = [c for c in needed if c not in header] or [f"any of {captions}"]
            self._fail("missing column", f"{file}:1", f"header lacks {missing}; has {header}. Fix: set "
                       "data.image_key / data.short_caption_key / data.long_caption_keys", whole_file=True)
            return
        rows = iter(reader)
        while True:
            where = f"{file}:{reader.line_num + 1}"
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as e:
                self._fail("malformed csv", where, str(e), whole_file=True)
                return
            where = f"{file}:{reader.line_num}"

            def build(row=row, where=where):
                if None in row or None in row.values():
                    raise _Skip("malformed row", f"expected {len(header)} fields")
                key = row.get("key") or where
                return self._from_fields(row, key, where, self._image_path(row.get(self.cfg.image_key), file))

            yield from self._emit(build, where)
    def _webdataset(self, shard: str) -> Iterator[Sample]:
        import webdataset as wds

        broken: list[Exception] = []

        def on_error(exn: Exception) -> bool:  # webdataset calls this for a broken tar stream
            broken.append(exn)
            return False  # stop this shard; nothing after a broken tar header can be trusted

        stream = wds.WebDataset(shard, shardshuffle=False, handler=on_error, empty_check=False,
                                nodesplitter=None, workersplitter=None)
        for raw in stream:
            key = raw.get("__key__", "?")
            where = f"{shard}:{key}"

            def build(raw=raw, key=key, where=where):
                image = next((raw[ext] for ext in IMAGE_EXTS if ext in raw), None)
                if image is None:
                    raise _Skip("missing image", f"no {'/'.join(IMAGE_EXTS)} member for key {key}")
                row: dict[str, Any] = {}
                if "json" in raw:
                    try:
                        row = json.loads(raw["json"].decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise _Skip("malformed json", f"{key}.json: {e}") from None
                    if not isinstance(row, dict):
                        raise _Skip("malformed row", f"{key}.json must hold an object")
                if "txt" in raw and not row.get(self.cfg.short_caption_key):
                    try:  # img2dataset's key.txt is the (short, alt-text) caption
                        row[self.cfg.short_caption_key] = raw["txt"].decode("utf-8")
                    except UnicodeDecodeError:
                        raise _Skip("invalid utf-8", f"{key}.txt is not valid UTF-8") from None
                return self._from_fields(row, key, where, bytes(image))

            yield from self._emit(build, where)
        if not broken and Path(shard).is_file():
            broken += tar_end_problem(shard)
        if broken:
            exn = broken[0]
            self._fail("corrupt shard", shard, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}",
                       whole_file=True)

    def _imagefolder(self, folder: str) -> Iterator[Sample]:
        # img2dataset's 'files' layout: name.png beside name.txt and/or name.json
        by_stem: dict[Path, dict[str, Path]] = {}
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                by_stem.setdefault(p.with_suffix(""), {})[p.suffix.lower().lstrip(".")] = p
        for stem, files in by_stem.items():
            image = next((files[ext] for ext in IMAGE_EXTS if ext in files), None)
            if image is None:
                continue  # a lone .txt/.json or unrelated file is not a sample
            where = str(image)

            def build(stem=stem, files=files, image=image):
                row: dict[str, Any] = {}
                if "json" in files:
                    try:
                        row = json.loads(files["json"].read_text(encoding="utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise _Skip("malformed json", f"{files['json']}: {e}") from None
                    if not isinstance(row, dict):
                        raise _Skip("malformed row", f"{files['json']} must hold an object")
                if "txt" in files and not row.get(self.cfg.short_caption_key):
                    try:
                        row[self.cfg.short_caption_key] = files["txt"].read_text(encoding="utf-8")
                    except UnicodeDecodeError:
                        raise _Skip("invalid utf-8", f"{files['txt']} is not valid UTF-8") from None
                return self._from_fields(row, stem.name, str(image), image)

            yield from self._emit(build, where)
