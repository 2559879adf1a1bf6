import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip.data.readers import CaptionReader, DataConfig
from llm2clip.errors import DataError


def _read(**kw) -> tuple[list, CaptionReader]:
    reader = CaptionReader(DataConfig(**kw))
    return list(reader), reader


def _train_rows(world: Path) -> list[dict]:
    return [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("path,fmt", [
    ("train.jsonl", "jsonl"),
    ("train.csv", "csv"),
    ("wds/train-{000000..000002}.tar", "webdataset"),
    ("images/train", "imagefolder"),
])
def test_every_format_reads_the_same_samples(world, path, fmt):
    samples, reader = _read(path=str(world / path))
    assert reader.format == fmt
    assert reader.stats.skipped == 0
    expected = {r["key"]: r for r in _train_rows(world)}
    assert sorted(s.key for s in samples) == sorted(expected)
    for s in samples:
        r = expected[s.key]
        assert s.short_caption == r["short_caption"]
        assert s.long_captions == [r["long_caption"], r["long_caption_2"]]
        assert s.image.mode == "RGB" and s.image.size == (32, 32)
        assert s.meta["short_caption_zh"] == r["short_caption_zh"]


# -- deliberately broken inputs, one file per format -----------------------------------------------

def _png(size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bad_images(tmp_path) -> dict[str, Path]:
    good = _png()
    files = {"truncated": good[: len(good) // 2], "zero": b"", "text": b"this is not an image",
             "huge": _png((128, 128))}
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.png"
        out[name].write_bytes(data)
    return out


def test_jsonl_broken_rows_are_counted_exactly(world, tmp_path, bad_images):
    good = (world / "train.jsonl").read_bytes().splitlines()[:5]
    first = json.loads(good[0])

    def row(**kw) -> bytes:
        return json.dumps({**first, **kw}).encode()

    bad = [
        row(image=str(bad_images["truncated"])), row(image=str(bad_images["zero"])),
        row(image=str(bad_images["text"])), row(image=str(tmp_path / "missing.png")),
        row(image=str(bad_images["huge"])),
        row(short_caption="", long_caption="", long_caption_2=""),
        row(short_caption="  \n", long_caption=" ", long_caption_2="\t"),
        b'{"key": "x", ', b'\xff\xfe{"a": 1}', b"[1, 2, 3]",
        row(short_caption="word " * 200_000), row(image=None), row(short_caption=42),
        b"",  # blank lines are not samples
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(good + bad) + b"\n")
    samples, reader = _read(path=str(path), image_root=str(world), max_image_pixels=64 * 64)
    assert len(samples) == reader.stats.read == 5
    assert dict(reader.stats.counts) == {
        "unreadable image": 3, "missing image file": 1, "image too large": 1, "empty caption": 2,
        "malformed json": 1, "invalid utf-8": 1, "malformed row": 3, "caption too long": 1,
    }
    assert f"{path}:6" in reader.stats.summary()
    with pytest.raises(DataError, match=rf"{path}:6: unreadable image.*data.strict=false"):
        _read(path=str(path), image_root=str(world), strict=True)


def test_csv_broken_rows_are_counted_exactly(world, tmp_path):
    with open(world / "train.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header, *rows = list(reader)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows[:4])
    r = dict(zip(header, rows[0], strict=True))
    writer.writerow([*rows[0], "surplus"])  # extra field
    writer.writerow(rows[0][:3])  # missing fields
    writer.writerow([{**r, "short_caption": "BADBYTES"}[h] for h in header])
    writer.writerow([{**r, "short_caption": "", "long_caption": "", "long_caption_2": ""}[h] for h in header])
    writer.writerow([{**r, "image": "images/train/nope.png"}[h] for h in header])
    path = tmp_path / "bad.csv"
    path.write_bytes(buf.getvalue().encode().replace(b"BADBYTES", b"caption \xff\xfe"))
    no_columns = tmp_path / "cols.csv"
    no_columns.write_text("foo,bar\n1,2\n")
    samples, reader = _read(path=f"{tmp_path}/{{bad,cols}}.csv", image_root=str(world))
    assert len(samples) == 4
    assert dict(reader.stats.counts) == {"malformed row": 2, "invalid utf-8": 1, "empty caption": 1,
                                         "missing image file": 1, "missing column": 1}
    with pytest.raises(DataError, match=rf"{path}:6: malformed row"):
        _read(path=str(path), image_root=str(world), strict=True)
    with pytest.raises(DataError, match=r"cols.csv:1: missing column.*data.image_key"):
        _read(path=str(no_columns), strict=True)


def test_webdataset_broken_samples_and_shards(world, tmp_path):
    import webdataset as wds

    rows = _train_rows(world)[:3]
    path = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for r in rows:
            sink.write({"__key__": r["key"], "png": (world / r["image"]).read_bytes(),
                        "json": json.dumps(r).encode()})
        sink.write({"__key__": "b1", "json": json.dumps(rows[0]).encode()})  # no image
        sink.write({"__key__": "b2", "png": b"\x89PNG broken", "json": json.dumps(rows[0]).encode()})
        sink.write({"__key__": "b3", "png": _png()})  # key mismatch: image here ...
        sink.write({"__key__": "b4", "json": json.dumps(rows[0]).encode()})  # ... caption there
        sink.write({"__key__": "b5", "png": _png(), "json": b"{not json"})
        sink.write({"__key__": "b6", "png": _png(), "txt": b"\xff\xfe caption"})
    (tmp_path / "bad-000001.tar").write_bytes(b"not a tar archive" * 64)
    samples, reader = _read(path=f"{tmp_path}/bad-{{000000..000001}}.tar")
    assert sorted(s.key for s in samples) == sorted(r["key"] for r in rows)
    assert dict(reader.stats.counts) == {"missing image": 2, "unreadable image": 1, "empty caption": 1,
                                         "malformed json": 1, "invalid utf-8": 1, "corrupt shard": 1}
    with pytest.raises(DataError, match=r"bad-000000.tar:b1: missing image"):
        _read(path=str(path), strict=True)

    shard = (world / "wds/train-000000.tar").read_bytes()
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(shard[: len(shard) // 2 + 100])
    samples, reader = _read(path=str(truncated))
    assert 0 < len(samples) < 16 and reader.stats.counts["corrupt shard"] == 1
    with pytest.raises(DataError, match=r"trunc.tar: corrupt shard"):
        _read(path=str(truncated), strict=True)


def test_imagefolder_broken_samples(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        (folder / f"ok{i}.png").write_bytes(_png())
        (folder / f"ok{i}.txt").write_text("a red square")
    (folder / "nocaption.png").write_bytes(_png())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really")
    (folder / "corrupt.txt").write_text("a caption")
    (folder / "badjson.png").write_bytes(_png())
    (folder / "badjson.json").write_text("{oops")
    (folder / "lonely.txt").write_text("no image here")
    samples, reader = _read(path=str(folder))
    assert sorted(s.key for s in samples) == ["ok0", "ok1"]
    assert dict(reader.stats.counts) == {"empty caption": 1, "unreadable image": 1, "malformed json": 1}
    with pytest.raises(DataError, match=r"badjson.png: malformed json"):
        _read(path=str(folder), strict=True)


def test_unknown_format_is_a_config_error(tmp_path):
    from llm2clip.errors import ConfigError

    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match=r"set data.format"):
        CaptionReader(DataConfig(path=str(tmp_path / "data.parquet")))


# -- torch dataset -----------------------------------------------------------------------------------

def test_dataset_preprocesses_with_clip_processor_and_splits_workers(world):
    from torch.utils.data import DataLoader

    from llm2clip.data.dataset import ImageCaptionDataset, collate
    from llm2clip.data.images import OPENAI_CLIP_MEAN, make_image_processor

    ds = ImageCaptionDataset(DataConfig(path=str(world / "train.jsonl"), image_size=24))
    keys = []
    for batch in DataLoader(ds, batch_size=8, num_workers=2, collate_fn=collate):
        assert batch["pixel_values"].shape[1:] == (3, 24, 24)
        assert batch["pixel_values"].dtype == torch.float32
        keys += batch["key"]
    assert sorted(keys) == sorted(r["key"] for r in _train_rows(world))  # each sample exactly once

    # the processor normalises with OpenAI's mean/std: a mean-coloured image maps to ~0
    processor = make_image_processor(16)
    grey = Image.new("RGB", (20, 16), tuple(round(255 * m) for m in OPENAI_CLIP_MEAN))
    pixels = processor(images=grey, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 16, 16) and pixels.abs().max() < 0.02


def test_processor_settings_come_from_a_checkpoint_folder(tmp_path):
    from llm2clip.data.images import make_image_processor

    make_image_processor(40).save_pretrained(tmp_path)
    assert make_image_processor(224, pretrained=tmp_path).crop_size["height"] == 40
