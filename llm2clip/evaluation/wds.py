"""CLIP_benchmark's webdataset exports, read one shard at a time: what retrieval and classification
sets share (their members differ: `.txt` captions or a `.cls` class index beside the image)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..data.readers import SkipCounter, fail
from ..data.tar import tar_end_problem

WDS_IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's order when a key has several


def shard_samples(shard: Path, stats: SkipCounter, strict: bool) -> Iterator[tuple[dict, str, bytes]]:
    """(sample's members, 'shard:key', image bytes) per sample. A missing shard, a sample without an image
    and a cut or corrupt tar are counted (strict: raised). One sample behind: the last sample of a cut
    shard may have lost members, so it is dropped, not read."""
    import webdataset as wds

    if not shard.is_file():
        fail(stats, strict, "missing shard", str(shard), "listed by nshards.txt but not on disk")
        return
    # checked first: tar reads a cut at a member boundary as a clean end, so strict mode names the real problem
    broken: list[Exception] = tar_end_problem(str(shard))
    if broken and strict:
        fail(stats, strict, "corrupt shard", str(shard), str(broken[0]))

    def on_error(exn: Exception) -> bool:  # a broken tar stream: nothing after a bad header can be trusted
        broken.append(exn)
        return False

    # a list, not a string: webdataset would brace-expand a path holding '{'
    stream = wds.WebDataset([str(shard)], shardshuffle=False, handler=on_error, empty_check=False,
                            nodesplitter=None, workersplitter=None)
    last = None
    for raw in stream:
        if last is not None:
            yield from _with_image(shard, last, stats, strict)
        last = raw
    if last is not None and not broken:
        yield from _with_image(shard, last, stats, strict)
    if broken:  # its last sample was dropped above, not counted on its own
        exn = broken[0]
        fail(stats, strict, "corrupt shard", str(shard), f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")


def _with_image(shard: Path, raw: dict, stats: SkipCounter, strict: bool) -> Iterator[tuple[dict, str, bytes]]:
    where = f"{shard}:{raw.get('__key__', '?')}"
    image = next((raw[ext] for ext in WDS_IMAGE_EXTS if ext in raw), None)
    if image is None:
        fail(stats, strict, "missing image", where, f"no {'/'.join(WDS_IMAGE_EXTS)} member")
        return
    yield raw, where, bytes(image)
