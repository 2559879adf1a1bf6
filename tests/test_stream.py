"""llm2clip.data.stream: exactly-once splitting, seeded shuffling, bitwise resume, skips (issue #19)."""

import io
import json
import re
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

from llm2clip.data.images import ImageSkip, make_image_processor
from llm2clip.data.readers import CaptionReader, DataConfig, decode_sample
from llm2clip.data.stream import StreamConfig, StreamDataset, StreamPosition, iter_eval_batches, make_loader, shuffled
from llm2clip.errors import ConfigError, DataError

PROCESSOR = make_image_processor(16)  # shared: building one costs more than preprocessing these images


def _png(i: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (i * 37 % 256, i * 91 % 256, i * 13 % 256)).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(folder: Path, shards: int, per_shard: int, garbage: str | None = None,
                  uncaptioned: tuple[str, ...] = ()) -> list[str]:
    """`shards` webdataset shards of `per_shard` samples (key.png + key.json); -> all keys.
    `garbage`: the key whose .png holds bytes that are not an image; `uncaptioned`: keys with empty
    captions (skipped by the reader, before the shuffle buffer)."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        with wds.TarWriter(str(folder / f"s-{s:03d}.tar"), encoder=False) as w:
            for j in range(per_shard):
                key = f"s{s}_{j:02d}"
                row = {"short_caption": f"short {key}", "long_caption": f"long {key}", "zh": f"zh {key}"}
                if key in uncaptioned:
                    row = {"short_caption": " "}
                image = b"not an image at all" if key == garbage else _png(len(keys))
                w.write({"__key__": key, "png": image, "json": json.dumps(row).encode()})
                keys.append(key)
    return keys


def _cut(shard: Path) -> None:
    """Truncate a shard in the middle of a member: a download or copy cut short."""
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])


def _dataset(path, batch_size=4, strict=False, **kw) -> StreamDataset:
    return StreamDataset(DataConfig(path=str(path), image_size=16, strict=strict), batch_size, processor=PROCESSOR,
                         **kw)


def _skips(batches) -> Counter:
    return sum((Counter(b["skipped"]) for b in batches), Counter())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, list[str]]:
    """6 shards x 5 samples: at least as many files as 2 ranks x 2 workers (file split)."""
    folder = tmp_path_factory.mktemp("shards")
    return folder, _write_shards(folder, 6, 5)


# -- splitting -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["files", "rows"])
def test_each_sample_once_per_epoch_over_2_ranks_x_2_workers(shards, world, split):
    if split == "files":
        path, expected = shards[0], shards[1]
    else:  # one JSONL file: every consumer reads it, keeping rows r % 4 == c
        path = world / "train.jsonl"
        expected = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    keys, consumers = [], set()
    for rank in (0, 1):
        for batch in make_loader(_dataset(path, rank=rank, world_size=2, epochs=1, shuffle_buffer=3), 2):
            assert batch["pixels"].shape[1:] == (3, 16, 16) and len(batch["keys"]) == len(batch["pixels"])
            keys += batch["keys"]
            consumers.add(batch["consumer"])
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(expected)
    assert consumers == {0, 1, 2, 3}


def test_eval_batches_match_imageset_in_reading_order(world):
    from llm2clip.stage2.data import ImageSet

    cfg = DataConfig(path=str(world / "train.jsonl"), image_size=16)
    full = ImageSet.load(cfg, cfg.path, PROCESSOR, extra_fields=("short_caption_zh",))
    batches = list(iter_eval_batches(cfg, cfg.path, PROCESSOR, extra_fields=("short_caption_zh",), batch_size=20))
    assert [len(b["keys"]) for b in batches] == [20, 20, 8]  # the last partial batch comes too
    assert [k for b in batches for k in b["keys"]] == full.keys
    assert [c for b in batches for c in b["captions"]] == full.captions
    # workers send uint8 (resize + crop); rescale and normalise run on the batch: equal within float rounding
    torch.testing.assert_close(torch.cat([b["pixels"] for b in batches]), full.pixels, atol=1e-6, rtol=0)


# -- shuffling -----------------------------------------------------------------------------------------

def _keys(ds, n_batches: int) -> list[str]:
    return [k for b in islice(iter(ds), n_batches) for k in b["keys"]]


def test_shuffle_is_seeded_and_differs_between_epochs(shards):
    path, keys = shards
    one_epoch = len(keys) // 5  # batches of 5: epoch 0 = the first 6 batches
    a = _keys(_dataset(path, 5, seed=1, shuffle_buffer=8), 2 * one_epoch)
    epoch0, epoch1 = a[:len(keys)], a[len(keys):]
    assert sorted(epoch0) == sorted(epoch1) == sorted(keys) and epoch0 != epoch1
    assert epoch0 != keys  # shuffled, across shards too
    assert _keys(_dataset(path, 5, seed=1, shuffle_buffer=8), 2 * one_epoch) == a
    assert _keys(_dataset(path, 5, seed=2, shuffle_buffer=8), 2 * one_epoch) != a
    assert _keys(_dataset(path, 5, shuffle=False, epochs=1), one_epoch) == keys  # evaluation: reading order


def test_shuffle_buffer_keeps_every_record_once():
    out = list(shuffled(iter(range(100)), 10, __import__("random").Random(0)))
    assert sorted(out) == list(range(100)) and out != list(range(100))


class _CacheLike:
    """Stage 2's cache filter in miniature: drops the long caption of some keys and whole samples of others."""

    reason = "missing cache entry"

    def __call__(self, key: str, captions: dict[str, str]) -> dict[str, str] | None:
        if key.endswith("3"):
            return None
        return {k: v for k, v in captions.items() if not (key.endswith("1") and k == "long_caption")}


# -- resume --------------------------------------------------------------------------------------------

def _run(dataset, n: int, workers: int = 2) -> list[dict]:
    loader = make_loader(dataset, workers)
    batches = list(islice(iter(loader), n))
    del loader  # workers end with it
    return batches


@pytest.mark.parametrize("split", ["files", "rows"])
def test_kill_and_resume_is_bitwise_identical(tmp_path, world, split):
    if split == "files":  # 2 consumers x 3 shards of 5; skips before and after the shuffle buffer
        _write_shards(tmp_path, 6, 5, garbage="s2_01", uncaptioned=("s0_00", "s1_04", "s4_02", "s5_00"))
        path = tmp_path
    else:  # 2 consumers x 24 rows of one JSONL file: about 5 batches per epoch each
        path = world / "train.jsonl"
    kw = dict(batch_size=4, seed=3, shuffle_buffer=4, keep=_CacheLike())
    full = _run(_dataset(path, **kw), 14)
    assert full[0]["state"]["epoch"] == 0 < full[-1]["state"]["epoch"]  # the run crosses epochs
    assert _skips(full)
    for k in (5, 8):  # 5: not a multiple of the 2 workers
        position = StreamPosition()
        for batch in _run(_dataset(path, **kw), k):
            position.update(batch)
        saved = json.loads(json.dumps(position.state()))  # as a checkpoint stores it
        assert saved["step"] == k
        resumed = _run(_dataset(path, **kw, resume=saved), 14 - k)
        for a, b in zip(full[k:], resumed, strict=True):
            assert a["consumer"] == b["consumer"] and a["keys"] == b["keys"] and a["captions"] == b["captions"]
            assert torch.equal(a["pixels"], b["pixels"])
            assert a["state"] == b["state"] and a["skipped"] == b["skipped"]


def test_resume_counts_each_skip_once(tmp_path):
    # the reader meets s0_02 (no caption) while drawing s0_03, the sample after batch 0: that skip
    # belongs to batch 1, before and after a resume at batch 1
    _write_shards(tmp_path, 2, 4, uncaptioned=("s0_02",))
    kw = dict(batch_size=2, shuffle=False)
    full = _run(_dataset(tmp_path, **kw), 4, workers=0)
    assert [b["skipped"] for b in full] == [{}, {"empty caption": 1}, {}, {}]
    position = StreamPosition()
    position.update(full[0])
    resumed = _run(_dataset(tmp_path, **kw, resume=position.state()), 3, workers=0)
    assert [b["keys"] for b in resumed] == [b["keys"] for b in full[1:]]
    assert [b["skipped"] for b in resumed] == [b["skipped"] for b in full[1:]]


def test_resume_with_other_worker_count_is_a_config_error(shards):
    position = StreamPosition()
    for batch in _run(_dataset(shards[0]), 3):
        position.update(batch)
    with pytest.raises(ConfigError, match=r"stage2\.loader"):
        next(iter(_dataset(shards[0], resume=position.state())))  # 1 consumer now, 2 before


# -- skips ---------------------------------------------------------------------------------------------

def test_corrupt_shard_mid_stream_is_counted_and_the_rest_arrives(tmp_path):
    keys = _write_shards(tmp_path, 3, 6)
    _cut(tmp_path / "s-001.tar")
    batches = list(_dataset(tmp_path, shuffle=False, epochs=1))
    got = [k for b in batches for k in b["keys"]]
    assert _skips(batches)["corrupt shard"] == 1
    assert [k for k in keys if not k.startswith("s1_")] == [k for k in got if not k.startswith("s1_")]
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "s-001.tar"))):
        list(_dataset(tmp_path, strict=True, shuffle=False, epochs=1))


def test_undecodable_image_is_skipped_after_the_buffer(tmp_path):
    keys = _write_shards(tmp_path, 2, 5, garbage="s1_02")
    batches = list(make_loader(_dataset(tmp_path, shuffle_buffer=4, epochs=1), 2))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(set(keys) - {"s1_02"})
    assert _skips(batches) == {"unreadable image": 1}
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "s-001.tar")) + ":s1_02: unreadable image"):
        list(_dataset(tmp_path, strict=True, epochs=1))


def test_keep_filter_drops_and_counts(shards):
    path, keys = shards
    batches = list(_dataset(path, keep=_CacheLike(), extra_fields=("zh",), epochs=1))
    captions = {k: c for b in batches for k, c in zip(b["keys"], b["captions"], strict=True)}
    assert sorted(captions) == sorted(k for k in keys if not k.endswith("3"))
    assert captions["s0_01"] == {"short_caption": "short s0_01", "zh": "zh s0_01"}
    assert captions["s0_02"] == {"short_caption": "short s0_02", "long_caption": "long s0_02", "zh": "zh s0_02"}
    assert _skips(batches) == {"missing cache entry": 6}
    with pytest.raises(DataError, match="missing cache entry"):  # raised in a worker, re-raised here
        list(make_loader(_dataset(path, strict=True, keep=_CacheLike(), epochs=1), 2))


def test_endless_stream_with_an_empty_consumer_is_an_error(tmp_path):
    _write_shards(tmp_path, 1, 1)  # one sample, two consumers: consumer 1 would spin forever
    with pytest.raises(DataError, match=r"consumer 1 of 2 .* no usable sample"):
        next(iter(_dataset(tmp_path, rank=1, world_size=2)))


def test_reader_defers_image_decoding(shards, world):
    for path, kind in ((shards[0], bytes), (world / "train.jsonl", Path)):
        cfg = DataConfig(path=str(path))
        raw = list(CaptionReader(cfg, decode_images=False))
        decoded = list(CaptionReader(cfg))
        assert all(isinstance(s.image, kind) for s in raw)
        for r, d in zip(raw[:3], decoded[:3], strict=True):
            assert decode_sample(r, cfg.max_image_pixels).image.tobytes() == d.image.tobytes()
    bad = raw[0].__class__("k", b"garbage", None, ["x"], {}, "here")
    with pytest.raises(ImageSkip, match="unreadable image"):
        decode_sample(bad, 1 << 20)


# -- config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("workers", -1), ("workers", True), ("shuffle_buffer", 0),
                                         ("prefetch_factor", 0), ("pin_memory", "yes")])
def test_bad_loader_config_names_the_key(field, value):
    StreamConfig().validate()
    with pytest.raises(ConfigError, match=rf"stage2\.loader\.{field}"):
        StreamConfig(**{field: value}).validate()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_deferred_normalisation_equals_the_image_processor(family):
    """Workers run the processor without its rescale/normalise steps; PixelNormalizer finishes the batch."""
    import numpy as np

    from llm2clip.data.stream import PixelNormalizer

    processor = make_image_processor(48, family=family)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (61, 83, 3), dtype=np.uint8))
    full = processor(images=image, return_tensors="pt")["pixel_values"]  # [1, 3, 48, 48]
    raw = processor(images=image, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    assert raw.dtype == torch.uint8
    torch.testing.assert_close(PixelNormalizer.of(processor)(raw), full, atol=1e-6, rtol=0)
