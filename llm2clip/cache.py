"""The embedding cache: caption embeddings of the frozen stage-1 LLM, computed once, served by key.

Layout of a cache folder:

    parts/r{rank:03d}-{n:06d}.safetensors   one tensor per caption field, [rows, D] (bf16 by default),
                                            plus '{field}.present' [rows] masks; metadata holds the
                                            sample keys and the fingerprint
    fingerprint.json                        what the vectors depend on (written before any part)
    index.json                              written last: fingerprint, dim, dtype, fields, and per part
                                            its file, row count and sha256; its presence marks a
                                            complete cache

Each part is written to a temporary file, fsynced and renamed, so a killed precompute leaves only
whole parts; a rerun skips the keys they hold. Under torchrun each rank embeds every world-th
sample into its own parts, and rank 0 writes the index once all ranks are done.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .data.readers import CaptionReader, DataConfig
from .distributed import init_from_env
from .embedder import CaptionEmbedder, EmbedderConfig
from .errors import ConfigError, DataError

INDEX, FINGERPRINT = "index.json", "fingerprint.json"
# Embedder fields that cannot change the vectors (padding side is tested to be invariant).
_NEUTRAL = {"padding_side", "attn_implementation", "device", "batch_size", "trust_remote_code"}
_FULL_HASH_BYTES = 256 << 20


@dataclass
class CacheConfig:
    out: str = "${run.out_dir}/cache"
    data: list[str] = field(default_factory=lambda: ["${run.out_dir}/data/train.jsonl",
                                                     "${run.out_dir}/data/test.jsonl"])
    # caption fields to embed: what stage 2 trains on (the data's short/long caption keys, or any text
    # column); evaluation embeds fields the cache lacks (e.g. second-language captions) live
    fields: list[str] = field(default_factory=lambda: ["short_caption", "long_caption", "long_caption_2"])
    dtype: str = "bfloat16"  # storage: bfloat16 | float16 | float32
    part_size: int = 2048  # samples per part file
    verify: bool = True  # check every part's sha256 when the cache is opened

    def validate(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError("cache.dtype must be bfloat16, float16 or float32")
        if not self.fields or self.part_size < 1:
            raise ConfigError("cache.fields must name at least one caption field and cache.part_size be >= 1")


class MissingEmbedding(DataError, KeyError):
    """A sample key (or one of its caption fields) that the cache does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# -- fingerprint -------------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    """sha256 of a file; above 256 MiB, of its size, first 1 MiB and 16 evenly spaced 1 MiB chunks
    (weights are checked for identity, not tampering, and a full pass over 16 GB costs minutes)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(17):
                f.seek(0 if i == 0 else (size - (1 << 20)) * i // 16)
                h.update(f.read(1 << 20))
    return h.hexdigest()


def content_hash(ref: str) -> str:
    """Identity of a model or adapter: hash of its config and weight files; a hub id stays as it is."""
    folder = Path(ref)
    if not folder.is_dir():
        return ref
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.suffix in (".json", ".safetensors", ".bin", ".model") and p.name != "embedder_config.json":
            h.update(p.name.encode())
            h.update(_file_digest(p).encode())
    return h.hexdigest()[:16]


def fingerprint(emb_cfg: EmbedderConfig, storage_dtype: str) -> dict:
    """Everything that changes the cached vectors; compared key by key when a cache is opened."""
    out = {k: v for k, v in emb_cfg.saved_fields().items() if k not in _NEUTRAL}
    out["model"] = content_hash(emb_cfg.model)
    out["adapters"] = [content_hash(a) for a in emb_cfg.adapters]
    out["storage_dtype"] = storage_dtype
    return out


def check_fingerprint(found: dict, expected: dict, where: str) -> None:
    diffs = [f"{k}: cache has {found.get(k)!r}, expected {expected.get(k)!r}"
             for k in sorted(set(found) | set(expected)) if found.get(k) != expected.get(k)]
    if diffs:
        raise ConfigError(f"{where} was built with another embedder setup ({'; '.join(diffs)}). Fix: rebuild it "
                          "(llm2clip cache build --force) or point cache.out at a new folder")


# -- writing -----------------------------------------------------------------------------------------
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _texts(sample, name: str, data_cfg: DataConfig) -> str | None:
    if name == data_cfg.short_caption_key:
        return sample.short_caption
    if name in data_cfg.long_caption_keys:
        i = data_cfg.long_caption_keys.index(name)
        return sample.long_captions[i] if i < len(sample.long_captions) else None
    value = sample.meta.get(name)
    return value.strip() or None if isinstance(value, str) else None


def _read_parts_keys(parts: Path, rank: int, expected_fp: dict) -> set[str]:
    """Keys already embedded by this rank (a resumed run); parts of another setup are refused."""
    from safetensors import safe_open

    done: set[str] = set()
    for p in sorted(parts.glob(f"r{rank:03d}-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
        check_fingerprint(json.loads(meta["fingerprint"]), expected_fp, str(p))
        done.update(json.loads(meta["keys"]))
    return done


def build_cache(cfg: CacheConfig, emb_cfg: EmbedderConfig, data_cfg: DataConfig | None = None, *,
                force: bool = False, progress: bool = True, embedder: CaptionEmbedder | None = None) -> dict:
    """Embed every caption field of every sample in cfg.data into cfg.out; resumable, rank-sharded."""
    from safetensors.torch import save

    cfg.validate()
    rank, world_size = init_from_env()
    out = Path(cfg.out)
    expected = fingerprint(emb_cfg, cfg.dtype)
    if (out / INDEX).is_file() and not force:
        index = json.loads((out / INDEX).read_text())
        check_fingerprint(index["fingerprint"], expected, str(out))
        return {"reused": True, **{k: index[k] for k in ("num_keys", "dim", "fields")}}
    if rank == 0:
        if force:
            for p in [*out.glob("parts/*"), out / INDEX, out / FINGERPRINT]:
                p.unlink(missing_ok=True)
        (out / "parts").mkdir(parents=True, exist_ok=True)
        if (out / FINGERPRINT).is_file():
            check_fingerprint(json.loads((out / FINGERPRINT).read_text()), expected, str(out))
        _atomic_write_bytes(out / FINGERPRINT, json.dumps(expected, indent=1).encode())
    _barrier(world_size)

    done = _read_parts_keys(out / "parts", rank, expected)
    base = data_cfg or DataConfig()
    todo, seen, skipped = [], set(), 0
    for path in cfg.data:
        reader = CaptionReader(replace(base, path=path, format="auto"), load_images=False, key="cache.data")
        for i, sample in enumerate(reader):
            if sample.key in seen:
                raise DataError(f"{sample.source}: key '{sample.key}' appears twice in cache.data; keys must be "
                                "unique across all files")
            seen.add(sample.key)
            if i % world_size == rank and sample.key not in done:
                todo.append(sample)
        skipped += reader.stats.skipped
    emb = embedder or CaptionEmbedder.load(emb_cfg)
    dtype = getattr(torch, cfg.dtype)
    next_part = len(list((out / "parts").glob(f"r{rank:03d}-*.safetensors")))
    nonfinite = 0
    bar = tqdm(total=len(todo), desc="cache", unit="sample", disable=not progress or rank != 0)
    for start in range(0, len(todo), cfg.part_size):
        chunk = todo[start:start + cfg.part_size]
        tensors = {}
        for name in cfg.fields:
            texts = [_texts(s, name, base) for s in chunk]
            present = torch.tensor([t is not None for t in texts])
            vectors = torch.zeros(len(chunk), emb.dim, dtype=dtype)
            if present.any():
                vectors[present] = emb.encode([t for t in texts if t is not None]).to(dtype)  # [n, D]
            # NaN/inf (an overflow in the LLM, or in a float16 store) is never served: absent, counted
            bad = present & ~torch.isfinite(vectors).all(dim=1)
            for i in bad.nonzero().flatten().tolist():
                if base.strict:
                    raise DataError(f"{chunk[i].source}: the '{name}' embedding of key '{chunk[i].key}' is not finite "
                                    f"(NaN/inf). Fix: embed in float32 or bfloat16 (embedder.dtype, cache.dtype), "
                                    "or set data.strict=false to leave it out and count it")
                nonfinite += 1
                vectors[i] = 0
            present &= ~bad
            tensors[name], tensors[f"{name}.present"] = vectors, present.to(torch.uint8)
        meta = {"keys": json.dumps([s.key for s in chunk]), "fingerprint": json.dumps(expected)}
        _atomic_write_bytes(out / "parts" / f"r{rank:03d}-{next_part:06d}.safetensors", save(tensors, meta))
        next_part += 1
        bar.update(len(chunk))
    bar.close()
    _barrier(world_size)
    if rank == 0:
        index = write_index(out, expected, emb.dim, cfg)
        return {"reused": False, "num_keys": index["num_keys"], "dim": emb.dim, "fields": cfg.fields,
                "embedded_now": len(todo), "skipped_samples": skipped, "truncated_texts": emb.stats["truncated"],
                "nonfinite_vectors": nonfinite}
    return {"reused": False, "embedded_now": len(todo), "nonfinite_vectors": nonfinite}


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch.distributed.barrier()


def write_index(out: Path, expected: dict, dim: int, cfg: CacheConfig) -> dict:
    """Merge every rank's parts into index.json; a key held twice is an error."""
    from safetensors import safe_open

    parts, owner = [], {}
    for p in sorted((out / "parts").glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            keys = json.loads(f.metadata()["keys"])
        for k in keys:
            if k in owner:
                raise DataError(f"cache {out}: key '{k}' is in both {owner[k]} and {p.name}")
            owner[k] = p.name
        parts.append({"file": f"parts/{p.name}", "rows": len(keys), "sha256": _file_digest(p)})
    index = {"fingerprint": expected, "dim": dim, "dtype": cfg.dtype, "fields": list(cfg.fields),
             "num_keys": len(owner), "parts": parts}
    _atomic_write_bytes(out / INDEX, json.dumps(index, indent=1).encode())
    return index


# -- reading -----------------------------------------------------------------------------------------
class EmbeddingCache:
    """Serves cached vectors by sample key: `lookup(keys, field) -> [B, D]`."""

    def __init__(self, folder: Path, index: dict, tensors: dict[str, torch.Tensor], rows: dict[str, int]):
        self.folder, self.index = folder, index
        self._tensors = tensors  # field -> [N, D]; field.present -> [N]
        self._rows = rows  # key -> row

    @classmethod
    def open(cls, folder: str | os.PathLike, expect: dict | None = None, verify: bool = True) -> EmbeddingCache:
        """Load a complete cache. `expect`: a fingerprint that must match (see `fingerprint`)."""
        from safetensors.torch import load

        folder = Path(folder)
        if not (folder / INDEX).is_file():
            raise ConfigError(f"{folder} holds no complete embedding cache (no {INDEX}). Fix: build it with "
                              "`llm2clip cache build` (a killed build resumes where it stopped)")
        index = json.loads((folder / INDEX).read_text())
        if expect is not None:
            check_fingerprint(index["fingerprint"], expect, str(folder))
        chunks: dict[str, list[torch.Tensor]] = {}
        rows: dict[str, int] = {}
        for part in index["parts"]:
            path = folder / part["file"]
            data = path.read_bytes() if path.is_file() else b""
            if verify and hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise DataError(f"cache part {path} is corrupt or truncated (sha256 mismatch). Fix: delete it and "
                                "its index.json, then rerun `llm2clip cache build` to re-embed its samples")
            try:
                tensors = load(data)
                from safetensors import safe_open  # metadata is not returned by load()

                with safe_open(str(path), framework="pt") as f:
                    keys = json.loads(f.metadata()["keys"])
            except Exception as e:  # safetensors raises its own error types for malformed headers
                raise DataError(f"cache part {path} cannot be read ({type(e).__name__}: {e})") from None
            for k in keys:
                rows[k] = len(rows)
            for name, t in tensors.items():
                chunks.setdefault(name, []).append(t)
        merged = {name: torch.cat(ts) for name, ts in chunks.items()}
        return cls(folder, index, merged, rows)

    @property
    def dim(self) -> int:
        return self.index["dim"]

    @property
    def fields(self) -> list[str]:
        return self.index["fields"]

    @property
    def keys(self) -> list[str]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def has(self, key: str, field_name: str) -> bool:
        row = self._rows.get(key)
        present = self._tensors.get(f"{field_name}.present")
        return row is not None and present is not None and bool(present[row])

    def lookup(self, keys: Sequence[str], field_name: str) -> torch.Tensor:
        """[B, D] in the storage dtype. Raises MissingEmbedding naming the first key it lacks."""
        if field_name not in self.fields:
            raise MissingEmbedding(f"cache {self.folder} has no field '{field_name}' (it has {self.fields})")
        rows = []
        for k in keys:
            if not self.has(k, field_name):
                raise MissingEmbedding(f"cache {self.folder} has no '{field_name}' embedding for sample key '{k}'")
            rows.append(self._rows[k])
        return self._tensors[field_name][torch.tensor(rows, dtype=torch.long)]
