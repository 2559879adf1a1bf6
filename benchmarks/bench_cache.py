"""Embedding-cache read path on a synthetic cache (no LLM): key-index build time, open() to first batch,
and lookups/s for random batches.

    python -m benchmarks.bench_cache --out /tmp/cache-bench --keys 1000000 --dim 256 --dtype bfloat16

Writes `keys` random vectors (one field) with CacheWriter, indexes them with write_index, then reads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from llm2clip.cache import CacheConfig, CacheWriter, EmbeddingCache, hash_keys, write_index

FP = {"model": "synthetic"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/llm2clip-cache-bench")
    p.add_argument("--keys", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--part-size", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=2000)
    a = p.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    keys = [f"img{i:09d}" for i in range(a.keys)]
    t = time.perf_counter()
    writer = CacheWriter(out, FP, a.dtype, a.dim, ["cap"])
    g = torch.Generator().manual_seed(0)
    for s in range(0, a.keys, a.part_size):
        n = min(a.part_size, a.keys - s)
        writer.write_part(keys[s:s + a.part_size], {"cap": torch.randn(n, a.dim, generator=g)}, start=s)
    r = {"keys": a.keys, "dim": a.dim, "dtype": a.dtype, "part_size": a.part_size,
         "write_parts_s": round(time.perf_counter() - t, 2)}
    t = time.perf_counter()
    h = hash_keys(keys)
    np.argsort(h, kind="stable")
    r["hash_and_sort_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    write_index(out, FP, a.dim, CacheConfig(out=str(out), fields=["cap"], dtype=a.dtype))
    r["write_index_s"] = round(time.perf_counter() - t, 2)  # key metadata, hashes, sort, sha256 of every part
    r["keyindex_bytes_per_key"] = sum(f.stat().st_size for f in (out / "keyindex").iterdir()) / a.keys
    rng = np.random.default_rng(0)
    batches = [[keys[i] for i in rng.integers(0, a.keys, a.batch)] for _ in range(a.batches)]
    for verify in (False, True):
        t = time.perf_counter()
        cache = EmbeddingCache.open(out, expect=FP, verify=verify)
        r[f"open_s_verify_{verify}"] = round(time.perf_counter() - t, 3)
        cache.lookup(batches[0], "cap")
        r[f"open_to_first_batch_s_verify_{verify}"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    for b in batches:  # verify=True cache: the first batches pay for each part's digest once
        cache.lookup(b, "cap")
    r["first_pass_lookups_per_s"] = round(a.batches * a.batch / (time.perf_counter() - t))
    t = time.perf_counter()
    for b in batches:
        cache.lookup(b, "cap")
    r["warm_lookups_per_s"] = round(a.batches * a.batch / (time.perf_counter() - t))
    r["warm_batches_per_s"] = round(a.batches / (time.perf_counter() - t), 1)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
