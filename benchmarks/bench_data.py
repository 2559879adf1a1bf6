"""Stage 2 at real scale (issue #19): memory flat in dataset size, the data pipeline against open_clip's,
and the embedding cache at a million keys. Driven by `python -m benchmarks --rows data`.

    python benchmarks/bench_data.py rss SHARDS CACHE STEPS BATCH WORKERS   # one streamed stage-2 run,
                                                                            # prints its peak RSS (JSON)

- Memory: the same streamed stage-2 run (the library's training loop: DataLoader workers, shuffle buffer,
  memory-mapped cache, tiny vision tower) over a 10k-sample and a 200k-sample webdataset, each with its
  cache, in a fresh process; peak RSS of the process and its workers summed, sampled every 20 ms.
  Samples repeat one small PNG under distinct keys, and vectors are random: making the data must not
  dominate, and the question is only what the run holds per sample.
- Data pipeline: images/s of one DataLoader worker (read shard, decode, CLIPImageProcessor, cache
  lookup) against open_clip's `get_wds_dataset` (its eval transform: same resize, crop and normalisation)
  on the same shards of 500x375 JPEGs, in open_clip's own venv (benchmarks/peer_open_clip_data.py).
- Cache: a 1M-key cache written with CacheWriter (random bf16 vectors); batched lookups/s of random keys,
  time from `EmbeddingCache.open` to the first batch of vectors (sha256 of the parts it touches
  included), and the key index's bytes per key.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIELDS = ["short_caption", "long_caption"]


# -- data --------------------------------------------------------------------------------------------------
def png_bytes(size: int = 32, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int = 500, height: int = 375, n: int = 16) -> list[bytes]:
    """`n` photo-sized JPEGs (CC3M's median is about 500x375): smooth gradients plus noise, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(0.1, 0.4)) % 256] * 3, -1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_shards(folder: Path, n: int, shard_size: int, images: list[bytes], ext: str) -> str:
    """img2dataset-style shards: {key}.{ext}, {key}.txt (short caption) and {key}.json (long caption)."""
    folder.mkdir(parents=True, exist_ok=True)

    def member(tar, name: str, data: bytes):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    shards = (n + shard_size - 1) // shard_size
    for s in range(shards):
        with tarfile.open(folder / f"{s:06d}.tar", "w") as tar:
            for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                key = f"{i:09d}"
                member(tar, f"{key}.{ext}", images[i % len(images)])
                member(tar, f"{key}.txt", f"a red square number {i}".encode())
                member(tar, f"{key}.json", json.dumps({"long_caption": f"a long caption about sample {i}"}).encode())
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


def write_cache(folder: Path, n: int, dim: int, part_size: int, fields=FIELDS, seed: int = 0) -> Path:
    """A complete cache of `n` keys (the shards' keys) with random vectors, written as build_cache writes."""
    from llm2clip.cache import CacheConfig, CacheWriter, write_index

    fingerprint = {"model": "synthetic", "dim": dim}
    writer = CacheWriter(folder, fingerprint, "bfloat16", dim, fields)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, part_size):
        keys = [f"{i:09d}" for i in range(start, min(n, start + part_size))]
        writer.write_part(keys, {f: torch.randn(len(keys), dim, generator=g) for f in fields})
    write_index(folder, fingerprint, dim, CacheConfig(out=str(folder), fields=list(fields), dtype="bfloat16"))
    return folder


# -- memory flat in dataset size -----------------------------------------------------------------------------
def stage2_run(shards: str, cache_dir: str, steps: int, batch: int, workers: int) -> dict:
    """A streamed LLM2CLIP stage-2 run through the library's loop (what `llm2clip stage2 train` runs with
    stage2.streaming=true), on a tiny vision tower."""
    from functools import partial

    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llm2clip.cache import EmbeddingCache
    from llm2clip.data.readers import DataConfig
    from llm2clip.data.stream import StreamConfig, StreamDataset
    from llm2clip.model import LLM2CLIP, ModelConfig
    from llm2clip.stage2.batches import StreamBatches
    from llm2clip.stage2.data import CachedVectors, CaptionSampler
    from llm2clip.stage2.train import TrainConfig, train_contrastive

    torch.manual_seed(0)
    cache = EmbeddingCache.open(cache_dir)
    data_cfg = DataConfig(path=shards, long_caption_keys=["long_caption"], image_size=32)
    loader = StreamConfig(workers=workers, shuffle_buffer=1000)
    make = partial(StreamDataset, data_cfg, shuffle_buffer=loader.shuffle_buffer, key="stage2.train_data")
    data, _ = StreamBatches(make, loader).only_cached(cache, strict=False, fields=FIELDS)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8))
    model = LLM2CLIP(vision, cache.dim, ModelConfig(embed_dim=32, adapter_depth=1))
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-4, warmup_steps=2, checkpoint_every=0,
                          precision="fp32", out=out)
        sampler = CaptionSampler("short_caption", ["long_caption"], 0.5, seed=0)
        summary = train_contrastive(model, CachedVectors(cache), data, sampler, cfg, name="llm2clip", progress=False,
                                    device=torch.device("cpu"))
    return {"images_per_s": summary["images_per_s"], "samples_seen": steps * batch}


def peak_rss_of(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd`; the peak over time of its RSS plus its children's (DataLoader workers), in bytes."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak, watched = 0, psutil.Process(proc.pid)

    def sample():
        nonlocal peak
        while proc.poll() is None:
            try:
                tree = [watched, *watched.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample)
    thread.start()
    stdout, stderr = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"stage-2 run failed: {stderr.strip()[-500:]}")
    return peak, stdout.strip().splitlines()[-1]


def rss_ratio(tmp: Path, sizes=(10_000, 200_000), steps: int = 60, batch: int = 64, workers: int = 2) -> dict:
    image = png_bytes()
    detail = {"steps": steps, "batch": batch, "workers": workers, "image": "32 px PNG, repeated", "runs": {}}
    for n in sizes:
        t0 = time.perf_counter()
        shards = write_shards(tmp / f"wds{n}", n, 1000, [image], "png")
        cache = write_cache(tmp / f"cache{n}", n, dim=256, part_size=4096)
        made = time.perf_counter() - t0
        peak, line = peak_rss_of([sys.executable, str(Path(__file__)), "rss", shards, str(cache), str(steps),
                                  str(batch), str(workers)])
        detail["runs"][n] = {"peak_rss_mib": round(peak / 2**20, 1), "make_data_s": round(made, 1), **json.loads(line)}
    small, large = (detail["runs"][n]["peak_rss_mib"] for n in sizes)
    return {"data_rss_ratio": round(large / small, 3), "detail": detail}


# -- data pipeline vs open_clip ------------------------------------------------------------------------------
def our_loader_rate(shards: str, cache_dir: str, batch: int, batches: int, image_size: int = 224) -> dict:
    """Images/s of one DataLoader worker: shard reading, decode, CLIPImageProcessor (resize and crop in the
    worker, rescale and normalise on the batch in the consumer), cache lookup."""
    from llm2clip.cache import EmbeddingCache
    from llm2clip.data.images import make_image_processor
    from llm2clip.data.readers import DataConfig
    from llm2clip.data.stream import StreamDataset, make_loader
    from llm2clip.stage2.batches import CachedOnly

    cache = EmbeddingCache.open(cache_dir)
    data_cfg = DataConfig(path=shards, long_caption_keys=["long_caption"], image_size=image_size)
    dataset = StreamDataset(data_cfg, batch, processor=make_image_processor(image_size), shuffle_buffer=1000,
                            keep=CachedOnly(cache, FIELDS), key="bench")
    times, it = [], iter(make_loader(dataset, workers=1, prefetch_factor=2))
    next(it)  # warm-up: worker start, first shard
    start = time.perf_counter()
    for _ in range(batches):
        batch_dict = next(it)
        dataset.normalizer(batch_dict["pixels"])  # uint8 -> normalised float, as open_clip's batches arrive
        cache.lookup(batch_dict["keys"], "short_caption")  # the vectors the step reads
    times = time.perf_counter() - start
    return {"images_per_s": round(batch * batches / times, 1), "batches": batches, "batch": batch}


def loader_vs_open_clip(tmp: Path, python_of_peer, n: int = 4096, batch: int = 64, batches: int = 24) -> dict:
    shards = write_shards(tmp / "jpeg", n, 512, jpeg_bytes(), "jpg")
    cache = write_cache(tmp / "jpeg-cache", n, dim=256, part_size=4096)
    ours = our_loader_rate(shards, str(cache), batch, batches)
    detail = {"ours": ours, "shards": f"{n} samples of 500x375 JPEG (q90), 512 per shard", "workers": 1,
              "image_size": 224}
    if python_of_peer is None:
        return {"loader_vs_open_clip": None, "detail": detail}
    done = subprocess.run([str(python_of_peer), str(HERE / "peer_open_clip_data.py"), shards, str(n), str(batch),
                           str(batches)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                                                                              "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"open_clip data peer failed: {done.stderr.strip()[-800:]}")
    peer = json.loads(done.stdout.strip().splitlines()[-1])
    detail["open_clip"] = peer
    return {"loader_vs_open_clip": round(ours["images_per_s"] / peer["images_per_s"], 3), "detail": detail}


# -- the cache at a million keys -----------------------------------------------------------------------------
def cache_rows(tmp: Path, n: int = 1_000_000, dim: int = 256, batch: int = 256, batches: int = 200) -> dict:
    from llm2clip.cache import EmbeddingCache

    t0 = time.perf_counter()
    folder = write_cache(tmp / "cache1m", n, dim, part_size=16384, fields=["short_caption"])
    built = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    cache = EmbeddingCache.open(folder)  # verify=True: a part's sha256 is checked when first read
    first = cache.lookup([f"{i:09d}" for i in rng.integers(0, n, batch)], "short_caption")
    first_step = time.perf_counter() - start
    assert first.shape == (batch, dim)
    for _ in range(5):  # every part read once (and verified) before timing the steady state
        cache.lookup([f"{i:09d}" for i in rng.integers(0, n, 4096)], "short_caption")
    queries = [[f"{i:09d}" for i in rng.integers(0, n, batch)] for _ in range(batches)]
    start = time.perf_counter()
    for keys in queries:
        cache.lookup(keys, "short_caption")
    rate = batch * batches / (time.perf_counter() - start)
    index_bytes = cache._keys().nbytes()
    return {"cache_lookups_per_s": round(rate), "cache_first_step_s": round(first_step, 3),
            "cache_index_bytes_per_key": round(index_bytes / n, 2),
            "detail": {"keys": n, "dim": dim, "dtype": "bfloat16", "part_size": 16384, "batch": batch,
                       "write_and_index_s": round(built, 1), "key_index_bytes": index_bytes,
                       "first_step": "EmbeddingCache.open + one batch of random keys, sha256 of touched parts"}}


if __name__ == "__main__" and sys.argv[1] == "rss":
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    shards, cache_dir, steps, batch, workers = sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])
    print(json.dumps(stage2_run(shards, cache_dir, steps, batch, workers)))
