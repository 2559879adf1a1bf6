"""Shared pieces of the embedding cache: its config, the fingerprint of what the vectors depend on,
atomic writes and digests. See the package docstring for the folder layout."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..embedder import EmbedderConfig
from ..errors import ConfigError, DataError
from ..files import atomic_write_bytes  # noqa: F401  (re-exported: the cache modules write through it)

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
    # the instruction captions are embedded with, here and wherever stage 2 embeds texts live (online
    # training, evaluation, LLM2CLIP.encode_text): null = the embedder's (embedder.instruction); "" = none
    instruction: str | None = None
    part_size: int = 2048  # samples per part file
    verify: bool = True  # check each part's sha256 the first time a process reads it

    def validate(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ConfigError("cache.dtype must be bfloat16, float16 or float32")
        if not self.fields or self.part_size < 1:
            raise ConfigError("cache.fields must name at least one caption field and cache.part_size be >= 1")
        if self.instruction and not self.instruction.strip():
            raise ConfigError(f"cache.instruction is blank ({self.instruction!r}). Fix: \"\" for no instruction, "
                              "null for the embedder's (embedder.instruction), or the instruction's text")

    def apply_instruction(self, emb_cfg: EmbedderConfig) -> EmbedderConfig:
        """The embedder as the cache and stage 2 run it: `emb_cfg` with `instruction` set to
        cache.instruction (null: unchanged). The fingerprint records it, so a cache embedded with
        another instruction is refused."""
        return emb_cfg if self.instruction is None else replace(emb_cfg, instruction=self.instruction)


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


# -- files -------------------------------------------------------------------------------------------
def corrupt_part(path: Path, why: str) -> DataError:
    return DataError(f"cache part {path} is corrupt or truncated ({why}). Fix: delete it and the cache's {INDEX}, "
                     "then rerun `llm2clip cache build` to re-embed its samples")
