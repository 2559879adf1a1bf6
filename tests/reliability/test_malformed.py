"""Malformed input never ends in a traceback (issue "Reliability").

Every case of the corpus in tests/data/bad/ (written by tests/data/make_bad_corpus.py, listed in its
README.md and cases.json) is read twice: non-strict, the bad sample is skipped and counted under its
reason and the good samples beside it are still read; strict, the reader raises DataError/ConfigError
with a one-line message naming the file (and line or key). Hypothesis then fuzzes CaptionReader and
load_config with random rows and documents. Cases marked xfail are open bugs (see each reason).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import runpy
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm2clip.config import Config, all_keys, load_config
from llm2clip.data.readers import CaptionReader, DataConfig
from llm2clip.errors import ConfigError, DataError

DATA = Path(__file__).resolve().parents[1] / "data"
BAD = DATA / "bad"
MANIFEST = json.loads((BAD / "cases.json").read_text())
CASES = MANIFEST["cases"]
DATA_READERS = ("jsonl", "csv", "webdataset", "imagefolder", "llava")
ERRORS = {"DataError": DataError, "ConfigError": ConfigError, "DataError or ConfigError": (DataError, ConfigError)}
# 50 fixed examples per fuzz test in the suite; FUZZ_EXAMPLES=1500 runs a longer random search (about 5 min)
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Open bugs, (case id, mode) -> what happens today (none at present). strict=True: fixing one turns its
# test into XPASS, which fails until the entry is removed here.
XFAIL: dict[tuple[str, str], str] = {}


def _params(mode: str, readers: tuple[str, ...]) -> list:
    out = []
    for case in CASES:
        if case["reader"] not in readers:
            continue
        reason = XFAIL.get((case["id"], mode))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(case, id=case["id"], marks=marks))
    return out


def _root(case: dict, tmp_path: Path) -> Path:
    """The corpus folder, or a temp copy of the case with its *.gz files unpacked (1 MB captions)."""
    if not any(f.endswith(".gz") for f in case["files"]):
        return BAD
    for rel in case["files"]:
        data = (BAD / rel).read_bytes()
        target = tmp_path / rel.removesuffix(".gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(gzip.decompress(data) if rel.endswith(".gz") else data)
    return tmp_path


def _fill(text: str, root: Path) -> str:
    return text.replace("{root}", str(root)).replace("{images}", str(BAD / "images"))


@pytest.fixture(scope="module")
def llava_parts(world):
    from transformers import AutoTokenizer

    from llm2clip.data.images import make_image_processor

    return AutoTokenizer.from_pretrained(world / "tokenizer"), make_image_processor(32)


def _read_llava(case: dict, root: Path, strict: bool, parts) -> tuple[list[str], dict]:
    from llava_integration.data import DataArguments, LlavaDataset

    tokenizer, processor = parts
    folder = _fill(case["options"]["image_folder"], root)
    args = DataArguments(data_path=str(root / case["path"]), image_folder=folder, strict=strict)
    dataset = LlavaDataset(args, tokenizer, processor, "v1", 512, num_image_tokens=16, progress=False)
    keys = [dataset.samples[i]["id"] for i in range(len(dataset)) if dataset[i] is not None]
    return keys, dict(dataset.skips.counts)


def _read(case: dict, root: Path, strict: bool, request) -> tuple[list[str], dict]:
    """Run the case's reader to the end -> (keys of the samples read, skip counts)."""
    if case["reader"] == "llava":
        return _read_llava(case, root, strict, request.getfixturevalue("llava_parts"))
    options = {k: _fill(v, root) for k, v in case["options"].items()}
    reader = CaptionReader(DataConfig(path=str(root / case["path"]), strict=strict, **options))
    keys = [s.key for s in reader]
    assert reader.stats.read == len(keys)
    return keys, dict(reader.stats.counts)


def _run_other(case: dict, root: Path) -> None:
    """Config and tensor cases: call the API, which must raise."""
    if case["reader"] == "config":
        load_config(root / case["path"] if case["path"] else None, case["overrides"])
        return
    from llm2clip.knowledge.concepts import Concepts
    from llm2clip.model import LLM2CLIP, ModelConfig

    vectors = torch.from_numpy(np.load(BAD / case["path"]))
    dim = case["options"]["dim"]
    torch.manual_seed(0)
    if case["options"]["target"] == "encode_text":
        vision = SimpleNamespace(config=SimpleNamespace(hidden_size=8))  # encode_text never touches it
        LLM2CLIP(vision, dim, ModelConfig(embed_dim=8, adapter_depth=1)).encode_text(vectors)
    else:
        Concepts(torch.nn.functional.normalize(torch.randn(4, dim), dim=-1), torch.zeros(dim), 0.1, {}).labels(vectors)


def _check_error(err: BaseException, case: dict, root: Path) -> None:
    message = str(err)
    assert "\n" not in message, f"message is not one line: {message!r}"
    for part in case["where"]:
        assert _fill(part, root) in message, f"message does not name {_fill(part, root)!r}: {message!r}"


# -- the corpus -------------------------------------------------------------------------------------

def test_corpus_has_at_least_40_documented_cases():
    """Read-only: counts the cases and checks the folder holds exactly what they name, and nothing else."""
    ids = [c["id"] for c in CASES]
    assert len(ids) >= 40 and len(set(ids)) == len(ids)
    assert {c["reader"] for c in CASES} == {*DATA_READERS, "config", "tensor"}
    assert sum(c["reader"] in DATA_READERS for c in CASES) >= 40
    readme = (BAD / "README.md").read_text()
    assert all(f"`{i}`" in readme for i in ids) and f"{len(ids)} cases." in readme
    on_disk = {p.relative_to(BAD).as_posix() for p in BAD.rglob("*") if p.is_file()}
    named = {f for c in CASES for f in c["files"]} | set(MANIFEST["shared"]) | {"README.md", "cases.json"}
    assert on_disk == named
    assert sum((BAD / f).stat().st_size for f in on_disk) < 300 * 1024


def test_generator_reproduces_the_committed_corpus(tmp_path):
    """Rerun tests/data/make_bad_corpus.py into a temp folder (images compared by name only: zlib may vary)."""
    build = runpy.run_path(str(DATA / "make_bad_corpus.py"))["build"]  # runpy: no __pycache__ beside it
    assert build(tmp_path / "bad") == MANIFEST
    fresh = {p.relative_to(tmp_path / "bad").as_posix() for p in (tmp_path / "bad").rglob("*") if p.is_file()}
    assert fresh == {p.relative_to(BAD).as_posix() for p in BAD.rglob("*") if p.is_file()}
    for rel in fresh:
        if rel.endswith((".jsonl", ".csv", ".json", ".yaml", ".md", ".npy")):
            assert (tmp_path / "bad" / rel).read_bytes() == (BAD / rel).read_bytes(), rel


@pytest.mark.parametrize("case", _params("non-strict", DATA_READERS))
def test_non_strict_skips_and_counts(case, tmp_path, request):
    root = _root(case, tmp_path)
    if case["lenient_error"]:  # the whole file is unusable: an error even without strict
        with pytest.raises(ERRORS[case["lenient_error"]]) as info:
            _read(case, root, strict=False, request=request)
        _check_error(info.value, case, root)
        return
    keys, counts = _read(case, root, strict=False, request=request)
    assert counts == case["skips"]
    assert sorted(keys) == sorted(case["good"])


@pytest.mark.parametrize("case", _params("strict", (*DATA_READERS, "config", "tensor")))
def test_strict_raises_a_one_line_error_naming_the_file(case, tmp_path, request):
    root = _root(case, tmp_path)
    if case["strict"] is None:  # nothing is wrong with this case: strict reads it the same
        keys, counts = _read(case, root, strict=True, request=request)
        assert counts == {} and sorted(keys) == sorted(case["good"])
        return
    with pytest.raises(ERRORS[case["strict"]]) as info:
        if case["reader"] in DATA_READERS:
            _read(case, root, strict=True, request=request)
        else:
            _run_other(case, root)
    _check_error(info.value, case, root)


def test_extra_csv_columns_are_kept_in_meta():
    reader = CaptionReader(DataConfig(path=str(BAD / "csv/extra-column.csv"), image_root=str(BAD / "images")))
    assert [s.meta for s in reader] == [{"key": "good1", "source": "web"}, {"key": "good2", "source": "web"}]


# -- fuzzing ----------------------------------------------------------------------------------------

IMAGES = [*sorted(p.name for p in (BAD / "images").iterdir()), "nope.png", ".", ""]
any_text = st.text(st.characters(exclude_categories=()), max_size=20)  # lone surrogates included
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | any_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
                           max_leaves=6)
texts = st.sampled_from(["a red square", "", "  \n", "\u7ea2\u8272", "x" * 20_001, '"', ",", "\n"]) | any_text
images = st.sampled_from(IMAGES) | st.just("ok.png")
# mostly well-formed rows with one field off, so the fuzz reaches the image and caption checks
rows = st.fixed_dictionaries({"image": images | images | json_values, "short_caption": texts | texts | json_values},
                             optional={"key": json_values, "long_caption": texts,
                                       "long_caption_2": st.lists(texts, max_size=2) | texts | json_values})
jsonl_lines = st.one_of(rows.map(lambda r: json.dumps(r).encode()), rows.map(lambda r: json.dumps(r).encode()),
                        st.binary(max_size=40), st.text(max_size=40).map(str.encode),
                        json_values.map(lambda v: json.dumps(v).encode()))
COLUMNS = ["key", "image", "short_caption", "long_caption", "long_caption_2"]


@st.composite
def csv_files(draw) -> bytes:
    """A header (the usual columns in any order, or anything), then rows, ragged rows and raw bytes."""
    header = draw(st.permutations(COLUMNS) | st.lists(st.sampled_from([*COLUMNS, "extra"]) | st.text(max_size=6),
                                                        max_size=6))
    lines: list = [header]
    for kind in draw(st.lists(st.sampled_from(["row", "row", "row", "ragged", "bytes"]), max_size=6)):
        if kind == "row":
            lines.append([draw(images if h == "image" else texts) for h in header])
        elif kind == "ragged":
            lines.append(draw(st.lists(images | texts, max_size=len(header) + 2)))
        else:
            lines.append(draw(st.binary(max_size=30)))
    out = b""
    for line in lines:
        if isinstance(line, bytes):
            out += line
        else:
            buf = io.StringIO()
            csv.writer(buf).writerow(line)
            out += buf.getvalue().encode("utf-8", "surrogatepass")
    return out


def _fuzz_reader(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fuzz{suffix}"
        path.write_bytes(data)
        cfg = dict(path=str(path), image_root=str(BAD / "images"), max_image_pixels=64 * 64)
        reader = CaptionReader(DataConfig(**cfg))
        samples = list(reader)  # non-strict: never raises
        assert reader.stats.read == len(samples)
        assert all(s.image.size == (8, 8) and (s.short_caption or s.long_captions) for s in samples)
        try:
            strict = list(CaptionReader(DataConfig(**cfg, strict=True)))
        except (DataError, ConfigError) as e:
            assert reader.stats.skipped > 0 and "\n" not in str(e) and str(path) in str(e)
        else:
            assert reader.stats.skipped == 0 and len(strict) == len(samples)


@FUZZ
@given(st.lists(jsonl_lines, max_size=6))
def test_fuzzed_jsonl_is_skipped_or_read_never_a_traceback(lines):
    _fuzz_reader(b"\n".join(lines), ".jsonl")


@FUZZ
@given(csv_files())
def test_fuzzed_csv_is_skipped_or_read_never_a_traceback(data):
    _fuzz_reader(data, ".csv")


GOOD_SHARD = (BAD / "webdataset/good.tar").read_bytes()


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["cut", "overwrite", "insert"]), st.integers(0, len(GOOD_SHARD)),
                          st.binary(min_size=1, max_size=16)), min_size=1, max_size=3))
def test_fuzzed_shards_are_skipped_or_read_never_a_traceback(edits):
    """good.tar (PNGs and captions inside), cut short, overwritten or padded at random places."""
    data = GOOD_SHARD
    for op, at, blob in edits:
        at = min(at, len(data))
        data = {"cut": data[:at], "overwrite": data[:at] + blob + data[at + len(blob):],
                "insert": data[:at] + blob + data[at:]}[op]
    _fuzz_reader(data, ".tar")


LEAVES, SECTIONS = all_keys(), all_keys(sections=True)
keys = st.sampled_from(LEAVES) | st.sampled_from(LEAVES) | st.sampled_from(SECTIONS) | any_text
scalars = st.one_of(any_text, st.integers(), st.floats(), st.booleans(), st.none(),
                    st.sampled_from(["[1, 2]", "{a: 1}", "null", "???", "${run.out_dir}", "${nope}", "1e999", "-1",
                                     "tiny", "/nonexistent", "jsonl", "auto", "clip", "0.5"]))
documents = st.dictionaries(keys, scalars | st.lists(scalars, max_size=3), max_size=5)


def _nest(flat: dict) -> dict:
    """{'data.path': 1} -> {'data': {'path': 1}}; a later key may turn an earlier scalar into a section."""
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return out


def _load(path, overrides) -> None:
    """load_config returns a Config or raises a one-line ConfigError; anything else fails the test."""
    try:
        assert isinstance(load_config(path, overrides), Config)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


@FUZZ
@given(st.lists(st.builds("{}={}".format, keys, scalars) | st.builds("{}={}".format, keys, scalars) | any_text,
                max_size=3))
def test_fuzzed_overrides_give_a_config_or_a_config_error(overrides):
    _load(None, overrides)


@FUZZ
@given(st.one_of(documents.map(lambda flat: json.dumps(_nest(flat)).encode()),
                 documents.map(lambda flat: json.dumps(_nest(flat)).encode()),
                 st.binary(max_size=80), any_text.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_fuzzed_yaml_gives_a_config_or_a_config_error(document):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_bytes(document)
        _load(path, [])
