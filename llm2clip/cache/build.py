"""Building a cache: stream the samples of cache.data, embed `part_size` of them at a time, write a part.

Under torchrun rank r embeds the samples at positions i with i % world_size == r (i counted within each
file, files in order), so a rank's samples are a fixed sequence. Each part records the position of its
first row in that sequence (`start`), so a resumed build skips the positions its parts cover by count:
the data must not change between runs. That is checked as the data streams by: each skipped sample's
key must be the key its part holds at that row (one part's key list in memory at a time), else the
build stops and says to rebuild with --force. Memory does not grow with the data: no list of samples,
no set of keys; a key held twice is found when the parts are indexed (`write_index`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.readers import CaptionReader, DataConfig
from ..distributed import init_from_env
from ..embedder import CaptionEmbedder, EmbedderConfig
from ..errors import DataError
from .base import FINGERPRINT, INDEX, CacheConfig, atomic_write_bytes, check_fingerprint, fingerprint
from .keyindex import write_index
from .parts import CacheWriter, part_meta


def _texts(sample, name: str, data_cfg: DataConfig) -> str | None:
    if name == data_cfg.short_caption_key:
        return sample.short_caption
    if name in data_cfg.long_caption_keys:
        i = data_cfg.long_caption_keys.index(name)
        return sample.long_captions[i] if i < len(sample.long_captions) else None
    value = sample.meta.get(name)
    return value.strip() or None if isinstance(value, str) else None


def _covered(parts: Path, rank: int, expected_fp: dict) -> dict[int, tuple[int, Path]]:
    """What this rank's existing parts cover: start position -> (rows, part). Parts of another setup are
    refused; parts written before `start` was recorded are taken to follow each other."""
    covered, position = {}, 0
    for p in sorted(parts.glob(f"r{rank:03d}-*.safetensors")):
        meta = part_meta(p)  # one part's header at a time
        check_fingerprint(meta["fingerprint"], expected_fp, str(p))
        start = position if meta["start"] is None else meta["start"]
        if meta["keys"]:
            covered[start] = (len(meta["keys"]), p)
        position = start + len(meta["keys"])
    return covered


def _changed(out: Path, part: str, position: int, found: str | None, want: str) -> DataError:
    seen = f"key '{found}'" if found is not None else "the end of the data"
    return DataError(f"cache {out}: part {part} holds key '{want}' at sample {position} of this rank, but cache.data "
                     f"now has {seen} there: the data changed since the part was written. Fix: rebuild the cache "
                     "(llm2clip cache build --force), or restore the data it was begun on")


def _rank_samples(cfg: CacheConfig, base: DataConfig, rank: int, world_size: int, counts: dict):
    """This rank's samples, in order; counts['skipped'] gathers the readers' skipped lines."""
    for path in cfg.data:
        reader = CaptionReader(replace(base, path=path, format="auto"), load_images=False, key="cache.data")
        for i, sample in enumerate(reader):
            if i % world_size == rank:
                yield sample
        counts["skipped"] += reader.stats.skipped


def build_cache(cfg: CacheConfig, emb_cfg: EmbedderConfig, data_cfg: DataConfig | None = None, *,
                force: bool = False, progress: bool = True, embedder: CaptionEmbedder | None = None) -> dict:
    """Embed every caption field of every sample in cfg.data into cfg.out; resumable, rank-sharded.
    Captions are embedded with cfg.instruction (null: emb_cfg.instruction), also by a given `embedder`."""
    cfg.validate()
    emb_cfg = cfg.apply_instruction(emb_cfg)
    base = data_cfg or DataConfig()
    for path in cfg.data:  # every file must exist before any work (the embedder load, the first part)
        CaptionReader(replace(base, path=path, format="auto"), load_images=False, key="cache.data")
    rank, world_size = init_from_env()
    out = Path(cfg.out)
    expected = fingerprint(emb_cfg, cfg.dtype)
    if (out / INDEX).is_file() and not force:
        index = json.loads((out / INDEX).read_text())
        check_fingerprint(index["fingerprint"], expected, str(out))
        if "keyindex" not in index and rank == 0:  # a cache from before the key index: index its parts
            index = write_index(out, expected, index["dim"], replace(cfg, dtype=index["dtype"],
                                                                       fields=index["fields"]))
        _barrier(world_size)
        return {"reused": True, **{k: index[k] for k in ("num_keys", "dim", "fields")}}
    if rank == 0:
        if force:
            for p in [*out.glob("parts/*"), *out.glob("keyindex/*"), out / INDEX, out / FINGERPRINT]:
                p.unlink(missing_ok=True)
        (out / "parts").mkdir(parents=True, exist_ok=True)
        if (out / FINGERPRINT).is_file():
            check_fingerprint(json.loads((out / FINGERPRINT).read_text()), expected, str(out))
        atomic_write_bytes(out / FINGERPRINT, json.dumps(expected, indent=1).encode())
    _barrier(world_size)

    covered = _covered(out / "parts", rank, expected)
    emb = embedder or CaptionEmbedder.load(emb_cfg)
    writer = CacheWriter(out, expected, cfg.dtype, emb.dim, cfg.fields, rank)
    counts = {"skipped": 0, "nonfinite": 0, "embedded": 0}
    bar = tqdm(desc="cache", unit="sample", disable=not progress or rank != 0)
    chunk, chunk_start = [], 0
    skip_start, skip_keys, skip_part = 0, [], None  # the existing part being skipped, and its keys
    position = -1
    for position, sample in enumerate(_rank_samples(cfg, base, rank, world_size, counts)):
        if position in covered:  # an existing part begins here: flush what is pending, then skip its rows
            _flush(writer, emb, chunk, chunk_start, base, cfg, counts, bar, emb_cfg.instruction)
            chunk = []
            skip_start, skip_part = position, covered[position][1]
            skip_keys = part_meta(skip_part)["keys"]
        if position < skip_start + len(skip_keys):
            want = skip_keys[position - skip_start]
            if sample.key != want:
                raise _changed(out, skip_part.name, position, sample.key, want)
            continue
        if not chunk:
            chunk_start = position
        chunk.append(sample)
        if len(chunk) == cfg.part_size:
            _flush(writer, emb, chunk, chunk_start, base, cfg, counts, bar, emb_cfg.instruction)
            chunk = []
    _flush(writer, emb, chunk, chunk_start, base, cfg, counts, bar, emb_cfg.instruction)
    n = position + 1  # this rank's samples in the data as it is now
    for start, (rows, part) in covered.items():
        if start + rows > n:  # the data ends before this part does
            at = max(start, n)
            raise _changed(out, part.name, at, None, part_meta(part)["keys"][at - start])
    bar.close()
    _barrier(world_size)
    if rank == 0:
        index = write_index(out, expected, emb.dim, cfg)
        return {"reused": False, "num_keys": index["num_keys"], "dim": emb.dim, "fields": cfg.fields,
                "embedded_now": counts["embedded"], "skipped_samples": counts["skipped"],
                "truncated_texts": emb.stats["truncated"], "nonfinite_vectors": counts["nonfinite"]}
    return {"reused": False, "embedded_now": counts["embedded"], "nonfinite_vectors": counts["nonfinite"]}


def _flush(writer: CacheWriter, emb, chunk: list, start: int, base: DataConfig, cfg: CacheConfig, counts: dict,
           bar, instruction: str) -> None:
    """Embed one chunk of samples and write it as a part (nothing when the chunk is empty)."""
    if not chunk:
        return
    vectors, present = {}, {}
    for name in cfg.fields:
        texts = [_texts(s, name, base) for s in chunk]
        mask = torch.tensor([t is not None for t in texts])  # [n]
        v = torch.zeros(len(chunk), writer.dim, dtype=writer.dtype)  # [n, D]
        if mask.any():
            v[mask] = emb.encode([t for t in texts if t is not None], instruction=instruction).to(writer.dtype)
        # NaN/inf (an overflow in the LLM, or in a float16 store) is never served: absent, counted
        bad = mask & ~torch.isfinite(v).all(dim=1)
        for i in bad.nonzero().flatten().tolist():
            if base.strict:
                raise DataError(f"{chunk[i].source}: the '{name}' embedding of key '{chunk[i].key}' is not finite "
                                f"(NaN/inf). Fix: embed in float32 or bfloat16 (embedder.dtype, cache.dtype), "
                                "or set data.strict=false to leave it out and count it")
            counts["nonfinite"] += 1
            v[i] = 0
        vectors[name], present[name] = v, mask & ~bad
    writer.write_part([s.key for s in chunk], vectors, present, start=start)
    counts["embedded"] += len(chunk)
    bar.update(len(chunk))


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()
