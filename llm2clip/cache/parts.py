"""Part files: safetensors written whole (tmp + fsync + rename) and read back through a memory map.

A part `parts/r{rank:03d}-{n:06d}.safetensors` holds, for its `rows` samples,

    {field}           [rows, D]  the caption embeddings (BF16, F16 or F32)
    {field}.present   [rows]     U8, 1 where the sample has that caption and its vector is finite

and its metadata: `keys` (JSON list, one per row, in row order), `fingerprint` (JSON) and `start`
(the position of its first row among the samples of its rank, which is what a resumed build skips).

Reading parses the safetensors header by hand (8-byte little-endian length, then JSON with each
tensor's `dtype`, `shape` and `data_offsets` relative to the data section at 8 + length) and maps the
data section with one `numpy.memmap` per part, so a lookup touches only the rows it gathers, and a
part costs one file descriptor however many fields it has.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from .base import atomic_write_bytes, corrupt_part

# safetensors dtype -> (numpy dtype of the mapped bytes, torch dtype served); 16-bit floats are gathered
# as uint16 (numpy has no bfloat16) and reinterpreted by torch after the gather
NP_DTYPES = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.uint16, torch.float16),
             "F32": (np.float32, torch.float32), "U8": (np.uint8, torch.uint8), "BOOL": (np.uint8, torch.bool)}
_MAX_HEADER = 1 << 30  # a header longer than this is garbage, not keys


def part_name(rank: int, n: int) -> str:
    return f"r{rank:03d}-{n:06d}.safetensors"


def read_header(path: Path) -> tuple[dict, int]:
    """The parsed safetensors header of `path` and the byte offset of its data section."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise corrupt_part(path, "no header")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise corrupt_part(path, "header length out of range")
            text = f.read(length)
    except FileNotFoundError:
        raise corrupt_part(path, "the file is missing") from None
    if len(text) < length:
        raise corrupt_part(path, "header cut short")
    try:
        header = json.loads(text)
    except ValueError:
        raise corrupt_part(path, "header is not JSON") from None
    return header, 8 + length


def part_meta(path: Path) -> dict:
    """The metadata of a part: keys (list), fingerprint (dict), start (int or None)."""
    meta = read_header(path)[0].get("__metadata__") or {}
    if "keys" not in meta:
        raise corrupt_part(path, "no keys in its metadata")
    return {"keys": json.loads(meta["keys"]), "fingerprint": json.loads(meta.get("fingerprint", "{}")),
            "start": int(meta["start"]) if "start" in meta else None}


def part_layout(path: Path) -> tuple[int, int, dict[str, tuple[str, list[int], int, int]]]:
    """(data start, data length, name -> (dtype, shape, begin, end)) of a part, checked against its size.
    Small and kept per part by the reader, so remapping an evicted part does not parse its keys again."""
    header, data_start = read_header(path)
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    size = path.stat().st_size
    if data_start + end != size:
        raise corrupt_part(path, f"{size} bytes where its header describes {data_start + end}")
    for name, t in header.items():
        if t["dtype"] not in NP_DTYPES:
            raise corrupt_part(path, f"tensor '{name}' has dtype {t['dtype']}")
    return data_start, end, {name: (t["dtype"], t["shape"], *t["data_offsets"]) for name, t in header.items()}


class PartFile:
    """One part mapped read-only: `tensors[name]` is (numpy view [rows, ...], torch dtype to serve)."""

    def __init__(self, path: Path, layout: tuple | None = None):
        self.path = path
        data_start, end, tensors = layout or part_layout(path)
        if path.stat().st_size != data_start + end:  # replaced since the layout was read
            raise corrupt_part(path, f"{path.stat().st_size} bytes where its header describes {data_start + end}")
        # one map over the whole data section (one file descriptor); each tensor is a view into it
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(end,)) if end else None
        self.tensors: dict[str, tuple[np.ndarray, torch.dtype]] = {}
        # plain ndarray views of the map: np.memmap's subclass hooks cost more than the row copies they wrap
        data = self._data.view(np.ndarray) if self._data is not None else None
        for name, (dtype, shape, lo, hi) in tensors.items():
            np_dtype, torch_dtype = NP_DTYPES[dtype]
            view = data[lo:hi].view(np_dtype).reshape(shape) if data is not None else np.zeros(shape, np_dtype)
            self.tensors[name] = (view, torch_dtype)

    def rows(self, name: str) -> np.ndarray:
        return self.tensors[name][0]

    def close(self) -> None:
        # the views hold the map; dropping them lets numpy unmap and close the descriptor
        self.tensors.clear()
        self._data = None


def to_torch(arr: np.ndarray, torch_dtype: torch.dtype) -> torch.Tensor:
    """Gathered rows (a fresh numpy array) as a tensor of the storage dtype, without a copy."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.view(torch_dtype) if t.dtype != torch_dtype else t


class CacheWriter:
    """Writes the parts of one rank. `write_part(keys, vectors, present)` with vectors[field] [n, D] and
    present[field] [n] bool (all True when left out); parts are numbered on from what the folder holds.

    Used by `build_cache`, and by benchmarks that write synthetic caches without an LLM:

        writer = CacheWriter(out, fingerprint_dict, "bfloat16", dim, fields)
        writer.write_part(keys, {"short_caption": vectors})
        write_index(out, fingerprint_dict, dim, CacheConfig(out=str(out), fields=fields, dtype="bfloat16"))
    """

    def __init__(self, out, fingerprint: dict, dtype: str, dim: int, fields: list[str], rank: int = 0):
        self.out, self.fingerprint, self.dim, self.fields, self.rank = Path(out), fingerprint, dim, list(fields), rank
        self.dtype = getattr(torch, dtype)
        self.parts = self.out / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name[5:11]) for p in self.parts.glob(f"r{rank:03d}-*.safetensors")]
        self.next_part = max(numbers, default=-1) + 1

    def write_part(self, keys: list[str], vectors: dict[str, torch.Tensor],
                   present: dict[str, torch.Tensor] | None = None, start: int | None = None) -> Path:
        from safetensors.torch import save

        n = len(keys)
        tensors = {}
        for name in self.fields:
            v = vectors[name].to(self.dtype).contiguous()  # [n, D]
            if any(v.data_ptr() == t.data_ptr() for t in tensors.values()):
                v = v.clone()  # safetensors refuses tensors that share memory
            if tuple(v.shape) != (n, self.dim):
                raise ValueError(f"field '{name}': vectors of shape {tuple(v.shape)}, expected ({n}, {self.dim})")
            mask = present[name] if present is not None and name in present else torch.ones(n, dtype=torch.bool)
            tensors[name], tensors[f"{name}.present"] = v, mask.to(torch.uint8).contiguous()  # [n]
        meta = {"keys": json.dumps(list(keys)), "fingerprint": json.dumps(self.fingerprint)}
        if start is not None:
            meta["start"] = str(start)
        path = self.parts / part_name(self.rank, self.next_part)
        atomic_write_bytes(path, save(tensors, meta))
        self.next_part += 1
        return path
