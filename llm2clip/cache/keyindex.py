"""The key index: sample key -> global row, without a Python dict of keys.

    keyindex/hash.npy   uint64 [N]   blake2b-64 of each key (utf-8), sorted
    keyindex/row.npy    uint32 [N]   the global row of that key (rows count through the parts in index order)

12 bytes per key, opened with `np.load(mmap_mode="r")`. A batch is looked up by hashing its keys,
`np.searchsorted` on the hashes, and an equality check; global row -> (part, local row) goes through the
parts' cumulative row counts. Two keys with one hash are refused when the index is built; what remains is
an absent key whose hash equals a present key's (about N / 2**64 per lookup: 5e-12 at 100M keys), which
would serve that key's vector.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import sha256_file
from .base import INDEX, CacheConfig, atomic_write_bytes
from .parts import part_meta

HASH_FILE, ROW_FILE = "keyindex/hash.npy", "keyindex/row.npy"
KEY_HASH = "blake2b-64"
_MAX_ROWS = (1 << 32) - 1  # rows are stored as uint32


def hash_keys(keys: Sequence[str]) -> np.ndarray:
    """uint64 [B]: blake2b-64 of each key (hashing is per key; the rest is vectorised)."""
    blake2b = hashlib.blake2b
    blob = b"".join([blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest() for k in keys])
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64, copy=False)


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_at(parts: list[Path], starts: np.ndarray, row: int) -> tuple[str, str]:
    """(key, part file name) of a global row, read back from that part's metadata."""
    i = int(np.searchsorted(starts, row, side="right")) - 1
    return part_meta(parts[i])["keys"][row - int(starts[i])], parts[i].name


def write_index(out, expected: dict, dim: int, cfg: CacheConfig) -> dict:
    """Index every part of `out`: the key index, then index.json (the 'complete' marker, written last).

    Reads each part's key list once, one part at a time; memory is the hashes (8 bytes/key) and their
    sort order. A key held twice and two keys with one hash are refused, naming both."""
    out = Path(out)
    parts = sorted((out / "parts").glob("*.safetensors"))
    hashes, entries = [], []
    for p in parts:
        keys = part_meta(p)["keys"]
        hashes.append(hash_keys(keys))  # [rows]
        entries.append({"file": f"parts/{p.name}", "rows": len(keys), "sha256": sha256_file(p)})
    rows = np.array([e["rows"] for e in entries], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(rows)])  # [P + 1]
    n = int(starts[-1])
    if n > _MAX_ROWS:
        raise DataError(f"cache {out} holds {n} keys; the key index stores rows as uint32 (at most {_MAX_ROWS}). "
                        "Fix: split the data over several caches")
    h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)  # [N]
    order = np.argsort(h, kind="stable")  # [N] global rows in hash order
    h = h[order]
    same = np.flatnonzero(h[1:] == h[:-1])
    if same.size:
        a, b = sorted((int(order[same[0]]), int(order[same[0] + 1])))
        (ka, pa), (kb, pb) = _key_at(parts, starts, a), _key_at(parts, starts, b)
        if ka == kb:
            where = f"twice in {pa}" if pa == pb else f"in both {pa} and {pb}"
            raise DataError(f"cache {out}: key '{ka}' appears {where}; keys must be unique across all of cache.data. "
                            "Fix: make the keys unique, then rebuild (llm2clip cache build --force)")
        raise DataError(f"cache {out}: keys '{ka}' ({pa}) and '{kb}' ({pb}) have the same 64-bit hash, which the key "
                        "index cannot tell apart. Fix: rename one of them and rebuild (llm2clip cache build --force)")
    (out / "keyindex").mkdir(exist_ok=True)
    _atomic_save(out / HASH_FILE, h)
    _atomic_save(out / ROW_FILE, order.astype(np.uint32))
    index = {"fingerprint": expected, "dim": dim, "dtype": cfg.dtype, "fields": list(cfg.fields), "num_keys": n,
             "parts": entries, "key_hash": KEY_HASH,
             "keyindex": {name: {"file": f, "sha256": sha256_file(out / f)}
                          for name, f in (("hash", HASH_FILE), ("row", ROW_FILE))}}
    atomic_write_bytes(out / INDEX, json.dumps(index, indent=1).encode())
    return index


class KeyIndex:
    """The mapped key index of one cache: `rows(keys)` -> global rows, -1 where a key is absent."""

    def __init__(self, folder: Path, index: dict):
        self.folder = folder
        ki = index.get("keyindex")
        if ki is None or index.get("key_hash") != KEY_HASH:
            raise DataError(f"cache {folder} has no key index (built by an older llm2clip). Fix: rerun "
                            "`llm2clip cache build`: it indexes the existing parts without embedding again")
        try:
            # plain ndarray views of the maps: np.memmap's subclass hooks cost more than a lookup's reads
            self.hash = np.load(folder / ki["hash"]["file"], mmap_mode="r").view(np.ndarray)  # uint64 [N], sorted
            self.row = np.load(folder / ki["row"]["file"], mmap_mode="r").view(np.ndarray)  # uint32 [N]
        except (OSError, ValueError) as e:
            raise self.corrupt(f"{type(e).__name__}: {e}") from None
        if self.hash.shape != (index["num_keys"],) or self.row.shape != self.hash.shape:
            raise self.corrupt(f"{self.hash.shape[0]} hashes and {self.row.shape[0]} rows for "
                               f"{index['num_keys']} keys")
        self.files = {name: (folder / e["file"], e["sha256"]) for name, e in ki.items()}

    def corrupt(self, why: str) -> DataError:
        return DataError(f"the key index of cache {self.folder} is corrupt ({why}). Fix: delete "
                         f"{self.folder / 'keyindex'} and {self.folder / INDEX}, then rerun `llm2clip cache build` "
                         "(it re-indexes the parts without embedding again)")

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p, _ in self.files.values())

    def verify(self) -> None:
        for path, digest in self.files.values():
            if sha256_file(path) != digest:
                raise self.corrupt(f"{path.name}: sha256 mismatch")

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """int64 [B]: the global row of each key, -1 where the cache lacks it."""
        h = hash_keys(keys)  # [B]
        if not len(self.hash):
            return np.full(len(h), -1, np.int64)
        order = np.argsort(h)  # searching in sorted order walks the mapped index forward: fewer page misses
        pos = np.empty_like(order)
        pos[order] = np.minimum(np.searchsorted(self.hash, h[order]), len(self.hash) - 1)  # [B]
        found = self.hash[pos] == h
        return np.where(found, self.row[pos].astype(np.int64), -1)
