"""Write the malformed-input corpus, tests/data/bad/ (run: python tests/data/make_bad_corpus.py).

Deterministic (fixed pixels, numpy seed 0, tar headers with mtime 0), stdlib + PIL + numpy only. Every
case is a small file (or folder) holding the broken sample between good ones, so a test can check both
that the bad one is skipped and counted and that its neighbours are still read. `cases.json` is the
machine-readable list that tests/reliability/test_malformed.py runs; README.md is the same list for
people. Oversized inputs (1 MB captions) are stored gzipped; the test unpacks them into a temp folder.

Expected outcomes per case: `good` (keys read in non-strict mode), `skips` (reason -> count),
`lenient_error` (an error class even in non-strict mode: the whole file is unusable), `strict` (the error
class strict mode raises, or null when strict mode reads the case cleanly), `where` (substrings the
error message must contain; `{root}` is the corpus folder, `{images}` its images/ folder).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run by path (runpy, or as a script)
from bad_corpus_bytes import _tar, image_bytes

HERE = Path(__file__).resolve().parent
ONE_MB = "a red square " * 80_660  # just over 1 MB of caption text
GOOD = [{"key": "good1", "image": "ok.png", "short_caption": "a red square",
         "long_caption": "a small red square fills the whole picture"},
        {"key": "good2", "image": "ok.png", "short_caption": "a red square again",
         "long_caption": "the same small red square, seen a second time"}]
KEYS = ["good1", "good2"]
CSV_HEADER = ["key", "image", "short_caption", "long_caption"]
LLAVA_GOOD = [{"id": f"good{i}", "image": "ok.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red square."}]}
    for i in (1, 2)]


def _good_members(key: str, png: bytes) -> list[tuple[str, bytes]]:
    caption = next(g["short_caption"] for g in GOOD if g["key"] == key)
    return [(f"{key}.png", png), (f"{key}.txt", caption.encode())]


def _csv_rows(rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def _csv_row(row: dict) -> list[str]:
    return [row.get(c, "") for c in CSV_HEADER]


class Corpus:
    def __init__(self, root: Path):
        self.root, self.cases, self.shared = root, [], []
        self.images = image_bytes()

    def write(self, rel: str, data: bytes, shared: bool = False) -> str:
        if rel.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if shared:
            self.shared.append(rel)
        return rel

    def case(self, cid: str, reader: str, path: str | None, problem: str, files: list[str], *,
             skips: dict | None = None, good: list[str] | None = None, strict: str | None = "DataError",
             where: list[str] = (), lenient_error: str | None = None, **extra) -> None:
        self.cases.append({"id": cid, "reader": reader, "path": path, "problem": problem, "files": files,
                           "good": KEYS if good is None else good, "skips": skips or {},
                           "lenient_error": lenient_error, "strict": strict, "where": list(where), **extra})

    # -- one builder per reader ----------------------------------------------------------------------
    def jsonl(self, cid: str, problem: str, bad: bytes, reason: str | None, gz: bool = False, good=None) -> None:
        lines = [json.dumps(GOOD[0]).encode(), bad, json.dumps(GOOD[1]).encode()]
        rel = f"jsonl/{cid.removeprefix('jsonl-')}.jsonl" + (".gz" if gz else "")
        self.case(cid, "jsonl", rel.removesuffix(".gz"), problem, [self.write(rel, b"\n".join(lines) + b"\n")],
                  skips={reason: 1} if reason else {}, strict="DataError" if reason else None, good=good,
                  where=[f"{{root}}/{rel.removesuffix('.gz')}:2"], options={"image_root": "{images}"})

    def csv(self, cid: str, problem: str, body: bytes, reason: str | None, *, line: int = 3, good=None,
            gz: bool = False, with_good_file: bool = False, header: list[str] = CSV_HEADER) -> None:
        name = cid.removeprefix("csv-")
        rel = f"csv/{name}.csv" + (".gz" if gz else "")
        data = body if header is None else _csv_rows([header]) + body
        files = [self.write(rel, data)]
        path = f"csv/{{good,{name}}}.csv" if with_good_file else rel.removesuffix(".gz")
        self.case(cid, "csv", path, problem, files, skips={reason: 1} if reason else {}, good=good,
                  strict="DataError" if reason else None, where=[f"{{root}}/csv/{name}.csv:{line}"],
                  options={"image_root": "{images}"})

    def wds(self, cid: str, problem: str, bad: list[tuple[str, bytes]] | bytes, reason: str | None, *,
            key: str = "bad", good=None, gz: bool = False, with_good_file: bool = False) -> None:
        name = cid.removeprefix("wds-")
        ok = self.images["ok.png"]
        data = bad if isinstance(bad, bytes) else _tar(_good_members("good1", ok) + bad + _good_members("good2", ok))
        rel = f"webdataset/{name}.tar" + (".gz" if gz else "")
        files = [self.write(rel, data)]
        path = f"webdataset/{{good,{name}}}.tar" if with_good_file else rel.removesuffix(".gz")
        where = f"{{root}}/webdataset/{name}.tar" + (f":{key}" if key else "")
        self.case(cid, "webdataset", path, problem, files, skips={reason: 1} if reason else {}, good=good,
                  strict="DataError" if reason else None, where=[where], options={"format": "webdataset"})

    def folder(self, cid: str, problem: str, bad: dict[str, bytes], reason: str | None, where: str = "bad.png"):
        name = cid.removeprefix("folder-")
        ok = self.images["ok.png"]
        members = dict(_good_members("good1", ok) + _good_members("good2", ok)) | bad
        files = [self.write(f"imagefolder/{name}/{n}", d) for n, d in sorted(members.items())]
        self.case(cid, "imagefolder", f"imagefolder/{name}", problem, files, skips={reason: 1} if reason else {},
                  strict="DataError" if reason else None, where=[f"{{root}}/imagefolder/{name}/{where}"],
                  options={"format": "imagefolder"})

    def llava(self, cid: str, problem: str, bad, reason: str | None, *, where: list[str], raw: bytes | None = None,
              lenient_error: str | None = None, good=None) -> None:
        name = cid.removeprefix("llava-")
        data = raw if raw is not None else json.dumps([LLAVA_GOOD[0], bad, LLAVA_GOOD[1]], indent=1).encode()
        rel = self.write(f"llava/{name}.json", data)
        self.case(cid, "llava", rel, problem, [rel], skips={reason: 1} if reason else {}, good=good,
                  lenient_error=lenient_error, strict="DataError", where=where, options={"image_folder": "{images}"})

    def config(self, cid: str, problem: str, yaml: bytes | None, overrides=(), where=(), missing=False) -> None:
        name = cid.removeprefix("config-")
        rel = f"config/{name}.yaml" if yaml is not None or missing else None
        files = [self.write(rel, yaml)] if yaml is not None else []
        where = ([f"{{root}}/{rel}"] if rel else []) + list(where)
        self.case(cid, "config", rel, problem, files, good=[], strict="ConfigError", where=where,
                  overrides=list(overrides))

    def tensor(self, cid: str, problem: str, array: np.ndarray, target: str, strict: str, where=()) -> None:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        rel = self.write(f"tensors/{cid.removeprefix('tensor-')}.npy", buf.getvalue())
        self.case(cid, "tensor", rel, problem, [rel], good=[], strict=strict, where=where,
                  options={"target": target, "dim": 24})


def build(root: Path) -> dict:
    """Write every case under `root` (emptied first) and return the manifest."""
    shutil.rmtree(root, ignore_errors=True)
    c = Corpus(root)
    for name, data in c.images.items():
        c.write(f"images/{name}", data, shared=True)
    img = {name: dict(GOOD[0], key="bad", image=name) for name in c.images}
    row = json.dumps
    ok = c.images["ok.png"]

    # JSONL: line 2 of 3 is broken
    image_cases = [("truncated-png", "truncated.png", "PNG cut in half", "unreadable image"),
                   ("zero-byte-png", "zero.png", "zero-byte image file", "unreadable image"),
                   ("text-as-png", "text.png", "a text file named .png", "unreadable image"),
                   ("signature-only-png", "signature_only.png", "PNG signature then garbage", "unreadable image"),
                   ("corrupt-idat-png", "corrupt_idat.png", "PNG whose pixel data does not inflate",
                    "unreadable image"),
                   ("bomb-png", "bomb.png", "decompression bomb: IHDR claims 40000x40000", "image too large"),
                   ("large-png", "large.png", "IHDR claims 5000x5000 > data.max_image_pixels", "image too large")]
    for slug, name, problem, reason in image_cases:
        c.jsonl(f"jsonl-{slug}", problem, row(img[name]).encode(), reason)
    c.jsonl("jsonl-missing-image-file", "image file does not exist", row(dict(img["ok.png"], image="nope.png"))
            .encode(), "missing image file")
    c.jsonl("jsonl-image-is-directory", "image path names a folder", row(dict(img["ok.png"], image=".")).encode(),
            "unreadable image")
    c.jsonl("jsonl-jpeg-named-png", "a JPEG named .png (fine: read)",
            row(dict(img["jpeg_named.png"], key="jpeg")).encode(), None, good=["good1", "jpeg", "good2"])
    c.jsonl("jsonl-empty-caption", "all captions empty",
            row(dict(img["ok.png"], short_caption="", long_caption="")).encode(), "empty caption")
    c.jsonl("jsonl-whitespace-caption", "all captions whitespace only",
            row(dict(img["ok.png"], short_caption=" \t\n", long_caption="   ")).encode(), "empty caption")
    c.jsonl("jsonl-invalid-utf8", "raw non-UTF-8 bytes in a caption",
            row(dict(img["ok.png"], short_caption="CAPTION")).encode().replace(b"CAPTION", b"caf\xe9 \xff"),
            "invalid utf-8")
    c.jsonl("jsonl-lone-surrogate", "caption holds an escaped lone surrogate (\\ud800)",
            row(dict(img["ok.png"], short_caption="x\ud800y")).encode(), "invalid utf-8")
    c.jsonl("jsonl-1mb-caption", "a 1 MB caption (stored gzipped)",
            row(dict(img["ok.png"], short_caption=ONE_MB)).encode(), "caption too long", gz=True)
    c.jsonl("jsonl-broken-json", "line cut off mid-object", b'{"key": "bad", "image": "ok.png", "short_cap',
            "malformed json")
    c.jsonl("jsonl-non-object", "a JSON list instead of an object", b'["ok.png", "a red square"]', "malformed row")
    c.jsonl("jsonl-caption-not-text", "caption is a number", row(dict(img["ok.png"], short_caption=42)).encode(),
            "malformed row")
    c.jsonl("jsonl-no-image-key", "row has no 'image' field",
            row({k: v for k, v in img["ok.png"].items() if k != "image"}).encode(), "malformed row")

    # CSV: header on line 1, good1 on line 2, the bad row on line 3, good2 on line 4
    good_rows = [_csv_row(g) for g in GOOD]

    def body(bad: bytes) -> bytes:
        return _csv_rows(good_rows[:1]) + bad + _csv_rows(good_rows[1:])

    bad_row = {name: _csv_rows([_csv_row(r)]) for name, r in img.items()}
    c.csv("csv-truncated-png", "image is a truncated PNG", body(bad_row["truncated.png"]), "unreadable image")
    c.csv("csv-zero-byte-png", "zero-byte image", body(bad_row["zero.png"]), "unreadable image")
    c.csv("csv-text-as-png", "a text file named .png", body(bad_row["text.png"]), "unreadable image")
    c.csv("csv-bomb-png", "decompression bomb (40000x40000 header)", body(bad_row["bomb.png"]), "image too large")
    c.csv("csv-missing-image-file", "image file does not exist",
          body(_csv_rows([_csv_row(dict(img["ok.png"], image="nope.png"))])), "missing image file")
    c.csv("csv-empty-caption", "both caption cells empty",
          body(_csv_rows([["bad", "ok.png", "", ""]])), "empty caption")
    c.csv("csv-whitespace-caption", "caption cells hold only whitespace",
          body(_csv_rows([["bad", "ok.png", "  ", "\t"]])), "empty caption")
    c.csv("csv-invalid-utf8", "non-UTF-8 bytes in a caption cell",
          body(b"bad,ok.png,caf\xe9 \xff,a caption\n"), "invalid utf-8")
    c.csv("csv-row-extra-field", "a row with one field too many",
          body(_csv_rows([[*_csv_row(img["ok.png"]), "surplus"]])), "malformed row")
    c.csv("csv-row-missing-field", "a row with two fields", body(b"bad,ok.png\n"), "malformed row")
    c.csv("csv-unterminated-quote", "an opening quote never closed (it swallows good2's line; the reader cannot "
          "resync after it)", body(b'bad,ok.png,"a red square,long\n'), "malformed csv", good=["good1"])
    c.csv("csv-1mb-caption", "a 1 MB caption cell (stored gzipped)",
          body(_csv_rows([["bad", "ok.png", ONE_MB, ""]])), "caption too long", gz=True)
    c.csv("csv-extra-column", "header has an extra column (fine: read, kept in meta)",
          _csv_rows([[*_csv_row(g), "web"] for g in GOOD]), None, header=[*CSV_HEADER, "source"])
    c.write("csv/good.csv", _csv_rows([CSV_HEADER, *good_rows]), shared=True)
    c.csv("csv-missing-column", "no 'image' column (read beside csv/good.csv)",
          _csv_rows([["key", "short_caption"], ["bad", "a red square"]]), "missing column", line=1,
          with_good_file=True, header=None)
    c.csv("csv-no-caption-columns", "no caption column at all (read beside csv/good.csv)",
          _csv_rows([["key", "image"], ["bad", "ok.png"]]), "missing column", line=1, with_good_file=True,
          header=None)
    c.csv("csv-zero-byte", "an empty .csv file (read beside csv/good.csv)", b"", "missing column", line=1,
          with_good_file=True, header=None)
    c.csv("csv-utf8-bom", "UTF-8 BOM before the header, as Excel writes it (should read)",
          b"\xef\xbb\xbf" + _csv_rows([["image", "short_caption", "long_caption", "key"],
                                       *[[g["image"], g["short_caption"], g["long_caption"], g["key"]]
                                         for g in GOOD]]), None, header=None)

    # webdataset: good1, the bad sample (key 'bad'), good2 in one shard
    for slug, name, problem, reason in image_cases[:4] + image_cases[5:6]:
        c.wds(f"wds-{slug}", problem, [("bad.png", c.images[name]), ("bad.txt", b"a red square")], reason)
    c.wds("wds-invalid-utf8-txt", "bad.txt is not UTF-8", [("bad.png", ok), ("bad.txt", b"caf\xe9 \xff")],
          "invalid utf-8")
    c.wds("wds-empty-txt", "bad.txt is empty", [("bad.png", ok), ("bad.txt", b"")], "empty caption")
    c.wds("wds-whitespace-txt", "bad.txt is whitespace only", [("bad.png", ok), ("bad.txt", b" \n\t ")],
          "empty caption")
    c.wds("wds-png-without-txt", "mismatched keys: bad.png has no caption member", [("bad.png", ok)],
          "empty caption")
    c.wds("wds-txt-without-png", "mismatched keys: bad.txt has no image member", [("bad.txt", b"a red square")],
          "missing image")
    c.wds("wds-broken-json", "bad.json is cut off", [("bad.png", ok), ("bad.json", b'{"short_caption": "a re')],
          "malformed json")
    c.wds("wds-json-list", "bad.json holds a list", [("bad.png", ok), ("bad.json", b'["a red square"]')],
          "malformed row")
    c.wds("wds-1mb-caption", "a 1 MB bad.txt (stored gzipped)", [("bad.png", ok), ("bad.txt", ONE_MB.encode())],
          "caption too long", gz=True)
    whole = _tar(_good_members("good1", ok) + _good_members("good2", ok))
    c.wds("wds-truncated-mid-member", "shard cut inside good2.png's data", whole[: 512 * 5 + 40], "corrupt shard",
          key="", good=["good1"])
    c.wds("wds-truncated-mid-header", "shard cut inside good2.png's 512-byte header", whole[: 512 * 4 + 100],
          "corrupt shard", key="", good=["good1"])
    c.write("webdataset/good.tar", whole, shared=True)
    c.wds("wds-not-a-tar", "a text file named .tar (read beside webdataset/good.tar)", b"not a tar archive\n" * 4,
          "corrupt shard", key="", with_good_file=True)
    c.wds("wds-zero-byte-shard", "an empty .tar (read beside webdataset/good.tar)", b"", "corrupt shard", key="",
          with_good_file=True)

    # image folders: good1.png/.txt, good2.png/.txt and the bad sample
    for slug, name, problem, reason in image_cases[:4] + image_cases[5:6]:
        c.folder(f"folder-{slug}", problem, {"bad.png": c.images[name], "bad.txt": b"a red square"}, reason)
    c.folder("folder-invalid-utf8-txt", "bad.txt is not UTF-8", {"bad.png": ok, "bad.txt": b"caf\xe9 \xff"},
             "invalid utf-8")
    c.folder("folder-empty-txt", "bad.txt is empty", {"bad.png": ok, "bad.txt": b""}, "empty caption")
    c.folder("folder-whitespace-txt", "bad.txt is whitespace only", {"bad.png": ok, "bad.txt": b"  \n"},
             "empty caption")
    c.folder("folder-png-without-txt", "bad.png has no caption file", {"bad.png": ok}, "empty caption")
    c.folder("folder-txt-without-png", "a lone bad.txt (not a sample: ignored)", {"bad.txt": b"a red square"}, None)
    c.folder("folder-broken-json", "bad.json is cut off", {"bad.png": ok, "bad.json": b'{"short_caption": '},
             "malformed json")
    c.folder("folder-json-list", "bad.json holds a list", {"bad.png": ok, "bad.json": b"[1, 2]"}, "malformed row")

    # LLaVA JSON lists: good1, the bad sample (id 'bad'), good2; images under images/
    turns = LLAVA_GOOD[0]["conversations"]
    json_file = "{root}/llava/%s.json"
    c.llava("llava-missing-image", "the sample's image file does not exist",
            dict(LLAVA_GOOD[0], id="bad", image="nope.png"), "missing image", where=["{images}/nope.png"])
    c.llava("llava-wrong-role-order", "conversation starts with gpt",
            dict(LLAVA_GOOD[0], id="bad", conversations=[dict(turns[0], **{"from": "gpt"}),
                                                         dict(turns[1], **{"from": "human"})]),
            "bad conversation", where=[json_file % "wrong-role-order", "sample bad"])
    c.llava("llava-no-image-token", "image sample whose text has no <image>",
            dict(LLAVA_GOOD[0], id="bad", conversations=[{"from": "human", "value": "What is it?"}, turns[1]]),
            "bad conversation", where=[json_file % "no-image-token", "sample bad"])
    c.llava("llava-image-token-without-image", "<image> in the text but no image key",
            {"id": "bad", "conversations": turns}, "bad conversation",
            where=[json_file % "image-token-without-image", "sample bad"])
    c.llava("llava-empty-conversations", "conversations is an empty list",
            dict(LLAVA_GOOD[0], id="bad", conversations=[]), "bad conversation",
            where=[json_file % "empty-conversations", "sample bad"])
    c.llava("llava-entry-not-object", "a list entry that is a string", "ok.png", "bad sample",
            where=[json_file % "entry-not-object", "entry 1"])
    c.llava("llava-truncated-image", "the image is a truncated PNG (found when loaded)",
            dict(LLAVA_GOOD[0], id="bad", image="truncated.png"), "unreadable image",
            where=["{images}/truncated.png"])
    c.llava("llava-bomb-image", "the image is a decompression bomb (found when loaded)",
            dict(LLAVA_GOOD[0], id="bad", image="bomb.png"), "image too large", where=["{images}/bomb.png"])
    c.llava("llava-broken-json", "the JSON file is cut off", None, None, raw=b'[{"id": "good1", "image": "ok.p',
            lenient_error="DataError", good=[], where=[json_file % "broken-json"])
    c.llava("llava-not-a-list", "the file holds one object, not a list", None, None,
            raw=json.dumps(LLAVA_GOOD[0]).encode(), lenient_error="DataError", good=[],
            where=[json_file % "not-a-list"])
    c.llava("llava-invalid-utf8", "non-UTF-8 bytes in a conversation", None, None,
            raw=json.dumps(LLAVA_GOOD).encode().replace(b"A red square.", b"caf\xe9 \xff"),
            lenient_error="DataError", good=[], where=[json_file % "invalid-utf8"])
    c.llava("llava-empty-list", "an empty JSON list", None, None, raw=b"[]\n", lenient_error="DataError", good=[],
            where=[json_file % "empty-list"])

    # configs, through llm2clip.config.load_config(path, overrides)
    c.config("config-unknown-key", "unknown key data.pth", b"data:\n  pth: train.jsonl\n", where=["'data.pth'"])
    c.config("config-wrong-type", "synth.num_images: many", b"synth:\n  num_images: many\n",
             where=["'synth.num_images'"])
    c.config("config-section-scalar", "a section given a scalar (data: 5)", b"data: 5\n", where=["'data'"])
    c.config("config-section-list", "a section given a list (stage1: [1, 2])", b"stage1: [1, 2]\n",
             where=["'stage1'"])
    c.config("config-bad-yaml", "unclosed flow sequence", b"data: [\n")
    c.config("config-duplicate-key", "the same section twice", b"run:\n  seed: 1\nrun:\n  seed: 2\n")
    c.config("config-top-level-list", "the document is a list", b"- run\n- data\n")
    c.config("config-invalid-utf8", "non-UTF-8 bytes in a value", b"data:\n  path: caf\xe9\n")
    c.config("config-bad-value", "data.format: parquet (a string, but not a format)",
             b"data:\n  format: parquet\n", where=["data.format"])
    c.config("config-broken-interpolation", "data.path: ${nope.x}", b"data:\n  path: ${nope.x}\n",
             where=["'data.path'"])
    c.config("config-list-given-a-mapping", "a mapping for a list key (data.long_caption_keys: {a: 1})",
             b"data:\n  long_caption_keys: {a: 1}\n", where=["'data.long_caption_keys'"])
    c.config("config-missing-file", "the config file does not exist", None, missing=True)
    c.config("config-override-unknown-key", "--set synth.num_image=3", None, ["synth.num_image=3"],
             where=["synth.num_image=3"])
    c.config("config-override-wrong-type", "--set synth.num_images=many", None, ["synth.num_images=many"],
             where=["synth.num_images=many"])
    c.config("config-override-no-equals", "--set without '='", None, ["synth.num_images"],
             where=["synth.num_images"])
    c.config("config-override-section-scalar", "--set data=5", None, ["data=5"], where=["data=5"])
    c.config("config-override-list-given-a-mapping", "--set data.long_caption_keys={}", None,
             ["data.long_caption_keys={}"], where=["data.long_caption_keys={}"])
    c.config("config-override-invalid-utf8", "--set data.path=caf\\xe9 (a non-UTF-8 byte, surrogate-escaped in "
             "sys.argv)", None, ["data.path=caf\udce9"], where=["data.path"])
    c.config("config-override-unparsable-value", "--set data.path=[ (not YAML)", None, ["data.path=["],
             where=["data.path=["])
    c.config("config-override-bad-key", "--set [=None (a key OmegaConf cannot parse; found by the fuzz)", None,
             ["[=None"], where=["[=None"])

    # tensors: LLM vectors handed to the stage-2 adapter and to the knowledge concepts (fit on 24-wide)
    rng = np.random.default_rng(0)
    narrow = rng.standard_normal((2, 16)).astype(np.float32)
    nan = rng.standard_normal((2, 24)).astype(np.float32)
    nan[1, 3] = np.nan
    for target in ("encode_text", "concepts"):
        c.tensor(f"tensor-wrong-width-{target.replace('_', '-')}", f"16-wide vectors into {target} (expects 24)",
                 narrow, target, "ConfigError", where=["16", "24"])
        c.tensor(f"tensor-nan-{target.replace('_', '-')}", f"a NaN inside the vectors passed to {target}", nan,
                 target, "DataError or ConfigError")

    manifest = {"cases": c.cases, "shared": c.shared}
    (root / "cases.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=True) + "\n")
    (root / "README.md").write_text(readme(c.cases))
    return manifest


def _outcome(case: dict) -> tuple[str, str]:
    if case["reader"] in ("config", "tensor"):
        lenient = "n/a"
    elif case["lenient_error"]:
        lenient = f"{case['lenient_error']} (the whole file is unusable)"
    else:
        skips = ", ".join(f"{n} x `{r}`" for r, n in case["skips"].items()) or "nothing skipped"
        lenient = f"{skips}; reads {', '.join(case['good'])}"
    if not case["strict"]:
        return lenient, "no error (reads the same)"
    where = [w.replace("{root}/", "").replace("{images}", "images") for w in case["where"]]
    return lenient, case["strict"] + (f" naming {', '.join(f'`{w}`' for w in where)}" if where else "")


def readme(cases: list[dict]) -> str:
    lines = ["# Malformed-input corpus", "",
             "Generated by `python tests/data/make_bad_corpus.py` (deterministic; do not edit by hand) and run by",
             "`tests/reliability/test_malformed.py`; `cases.json` holds the same list with the exact expectations.",
             "Images used by the JSONL/CSV/LLaVA cases live in `images/`; `*.gz` files (1 MB captions) are",
             "unpacked by the test into a temp folder.", "",
             "Expected outcomes. Non-strict: the bad sample is skipped and counted under the reason shown, and",
             "the good samples around it are still read (a file-level case is read beside a good file, e.g.",
             "`csv/{good,missing-column}.csv`). Strict (`data.strict=true`, LLaVA `--strict`, and always for",
             "configs and tensors): the error shown, with a one-line message containing the file (and line or",
             "key) listed. Where the code does not meet a case's expectation yet, the test marks it",
             "`xfail(strict=True)` and says what happens instead (`XFAIL` in the test file).", "",
             f"{len(cases)} cases.", "",
             "| id | reader | what is wrong | non-strict | strict |", "|---|---|---|---|---|"]
    for case in cases:
        lenient, strict = _outcome(case)
        problem = case["problem"].replace("|", "\\|")
        lines.append(f"| `{case['id']}` | {case['reader']} | {problem} | {lenient} | {strict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    built = build(HERE / "bad")
    size = sum(p.stat().st_size for p in (HERE / "bad").rglob("*") if p.is_file())
    print(f"wrote {len(built['cases'])} cases to {HERE / 'bad'} ({size / 1024:.1f} KB)")
