"""Reading a cache: `EmbeddingCache` maps parts and the key index, and gathers a batch's rows.

Opening reads index.json and maps the key index; no vector is read. Parts are mapped on first use and
at most `max_open_parts` stay mapped (least recently used goes first; 100M keys are tens of thousands
of parts and each map holds a file descriptor). A part's parsed header is kept once read (its tensor
layout only, a few hundred bytes), so remapping an evicted part costs an mmap, not a JSON parse.

With verify=True a part's sha256 is checked the first time this process maps it, so the first batches
of a run pay for reading the parts they touch once (per process: each DataLoader worker checks the
parts it reads). The key index is checked at open when it is at most 256 MiB (about 22M keys), and
otherwise only by `verify_all()` (`llm2clip cache verify`), which checks every part and the key index.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..files import sha256_file
from .base import INDEX, MissingEmbedding, check_fingerprint, corrupt_part
from .keyindex import KeyIndex
from .parts import PartFile, part_layout, part_meta, to_torch

_VERIFY_INDEX_AT_OPEN = 256 << 20


def _open_parts_limit() -> int:
    """How many parts may stay mapped: each holds a descriptor; a random batch of a big cache touches as many
    parts as it has keys, so more maps mean fewer remaps."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return EmbeddingCache.max_open_parts
    return max(EmbeddingCache.max_open_parts, min(1024, soft // 4)) if soft != resource.RLIM_INFINITY else 1024


class EmbeddingCache:
    """Serves cached vectors by sample key: `lookup(keys, field) -> [B, D]`. Picklable (for DataLoader
    workers): the pickle holds the folder, settings and parsed index.json, and each process maps on its own."""

    max_open_parts = 128  # raised to a quarter of the file-descriptor limit, up to 1024, where allowed

    def __init__(self, folder: Path, index: dict, expect: dict | None = None, verify: bool = True):
        self.folder, self.index, self.expect, self.verify = Path(folder), index, expect, verify
        self._starts = np.concatenate([[0], np.cumsum([p["rows"] for p in index["parts"]], dtype=np.int64)])
        self._keyindex: KeyIndex | None = None
        self.max_open_parts = _open_parts_limit()
        self._open: OrderedDict[int, PartFile] = OrderedDict()  # part number -> mapped part, LRU order
        self._verified: set[int] = set()
        self._layouts: dict[int, tuple] = {}  # part number -> its parsed header (tensors only, no keys)

    @classmethod
    def open(cls, folder: str | os.PathLike, expect: dict | None = None, verify: bool = True) -> EmbeddingCache:
        """Open a complete cache (reads index.json, maps the key index). `expect`: a fingerprint that must
        match (see `fingerprint`). `verify`: check each part's sha256 when first read."""
        folder = Path(folder)
        if not (folder / INDEX).is_file():
            raise ConfigError(f"{folder} holds no complete embedding cache (no {INDEX}). Fix: build it with "
                              "`llm2clip cache build` (a killed build resumes where it stopped)")
        index = json.loads((folder / INDEX).read_text())
        if expect is not None:
            check_fingerprint(index["fingerprint"], expect, str(folder))
        cache = cls(folder, index, expect, verify)
        keyindex = cache._keys()
        if verify and keyindex.nbytes() <= _VERIFY_INDEX_AT_OPEN:
            keyindex.verify()
        return cache

    # -- pickling: settings and index.json only; maps are reopened lazily in the new process ---------------
    def __getstate__(self) -> dict:
        return {"folder": str(self.folder), "index": self.index, "expect": self.expect, "verify": self.verify}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Path(state["folder"]), state["index"], state["expect"], state["verify"])

    # -- index.json -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.index["dim"]

    @property
    def fields(self) -> list[str]:
        return self.index["fields"]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def iter_keys(self) -> Iterator[str]:
        """Every key once, in row order, read part by part from the parts' metadata."""
        for part in self.index["parts"]:
            yield from part_meta(self.folder / part["file"])["keys"]

    # -- mapping ------------------------------------------------------------------------------------------
    def _keys(self) -> KeyIndex:
        if self._keyindex is None:
            self._keyindex = KeyIndex(self.folder, self.index)
        return self._keyindex

    def _part(self, i: int) -> PartFile:
        part = self._open.get(i)
        if part is not None:
            self._open.move_to_end(i)
            return part
        entry = self.index["parts"][i]
        path = self.folder / entry["file"]
        if self.verify and i not in self._verified:
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise corrupt_part(path, "sha256 mismatch" if path.is_file() else "the file is missing")
            self._verified.add(i)
        if i not in self._layouts:
            layout = part_layout(path)
            if any(shape[:1] != [entry["rows"]] for _, shape, _, _ in layout[2].values()):
                raise corrupt_part(path, f"its tensors do not hold the {entry['rows']} rows of index.json")
            self._layouts[i] = layout
        part = PartFile(path, self._layouts[i])
        self._open[i] = part
        while len(self._open) > self.max_open_parts:
            self._open.popitem(last=False)[1].close()
        return part

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global rows [B] -> (part number [B], row within the part [B])."""
        part = np.searchsorted(self._starts, rows, side="right") - 1
        return part, rows - self._starts[part]

    def _gather(self, names: list[str], rows: np.ndarray) -> list[tuple[np.ndarray, torch.dtype]]:
        """Rows [B] of each tensor in `names`, one pass over the parts they fall in: numpy [B, ...] and the
        torch dtype to view it as, per name."""
        if not len(rows):
            raise ValueError("no rows to gather")
        part, local = self._locate(rows)
        order = np.argsort(part, kind="stable")  # rows grouped per part
        part, local = part[order], local[order]
        bounds = np.flatnonzero(np.diff(part)) + 1
        outs: list = [None] * len(names)  # filled in part order, each part's rows one contiguous slice
        for lo, hi in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [len(rows)])), strict=True):
            tensors = self._part(int(part[lo])).tensors
            for j, name in enumerate(names):
                src, dtype = tensors[name]
                if outs[j] is None:
                    outs[j] = (np.empty((len(rows), *src.shape[1:]), src.dtype), dtype)
                np.take(src, local[lo:hi], axis=0, out=outs[j][0][lo:hi])  # reads only these rows of the map
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return [(out[inverse], dtype) for out, dtype in outs]

    # -- lookups ----------------------------------------------------------------------------------------
    def _present_rows(self, keys: Sequence[str], field_name: str) -> np.ndarray:
        """Present mask [B] bool."""
        rows = self._keys().rows(keys)  # [B], -1 where absent
        present = rows >= 0
        if field_name in self.fields and present.any():
            present[present] = self._gather([f"{field_name}.present"], rows[present])[0][0].astype(bool)
        else:
            present[:] = False
        return present

    def present(self, keys: Sequence[str], field_name: str) -> torch.Tensor:
        """BoolTensor [B]: whether the cache holds a `field_name` vector for each key."""
        return torch.from_numpy(self._present_rows(keys, field_name))

    def has(self, key: str, field_name: str) -> bool:
        return bool(self._present_rows([key], field_name)[0])

    def lookup(self, keys: Sequence[str], field_name: str) -> torch.Tensor:
        """[B, D] in the storage dtype. Raises MissingEmbedding naming the first key it lacks."""
        if field_name not in self.fields:
            raise MissingEmbedding(f"cache {self.folder} has no field '{field_name}' (it has {self.fields})")
        if not len(keys):
            return torch.empty(0, self.dim, dtype=getattr(torch, self.index["dtype"]))
        rows = self._keys().rows(keys)  # [B]
        present = rows >= 0
        if present.all():  # vectors and masks in one pass over the parts
            (flags, _), vectors = self._gather([f"{field_name}.present", field_name], rows)
            present = flags.astype(bool)
        if not present.all():
            key = keys[int(np.flatnonzero(~present)[0])]
            raise MissingEmbedding(f"cache {self.folder} has no '{field_name}' embedding for sample key '{key}'")
        return to_torch(*vectors)  # [B, D]

    def spread_rows(self, field_name: str, n: int) -> torch.Tensor:
        """[n', D], n' <= n: the present `field_name` vectors among n evenly spaced global rows (a sample of
        the cache, e.g. to centre an adapter, read without touching the data)."""
        if field_name not in self.fields:
            raise MissingEmbedding(f"cache {self.folder} has no field '{field_name}' (it has {self.fields})")
        total = len(self)
        rows = np.unique(np.linspace(0, total - 1, num=min(n, total)).astype(np.int64)) if total else \
            np.zeros(0, np.int64)
        if not len(rows):
            return torch.empty(0, self.dim, dtype=getattr(torch, self.index["dtype"]))
        rows = rows[self._gather([f"{field_name}.present"], rows)[0][0].astype(bool)]
        if not len(rows):
            return torch.empty(0, self.dim, dtype=getattr(torch, self.index["dtype"]))
        return to_torch(*self._gather([field_name], rows)[0])

    def verify_all(self) -> dict:
        """Check every part's sha256 and header, and the key index; raises DataError naming the first bad file."""
        self._keys().verify()
        nbytes = 0
        for i, entry in enumerate(self.index["parts"]):
            path = self.folder / entry["file"]
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise corrupt_part(path, "sha256 mismatch" if path.is_file() else "the file is missing")
            self._verified.add(i)
            nbytes += path.stat().st_size
            PartFile(path).close()  # header and size agree
        return {"parts": len(self.index["parts"]), "keys": len(self), "bytes": nbytes + self._keys().nbytes()}
