"""The embedding cache: caption embeddings of the frozen stage-1 LLM, computed once, served by key.

Layout of a cache folder:

    parts/r{rank:03d}-{n:06d}.safetensors   one tensor per caption field, [rows, D] (bf16 by default),
                                            plus '{field}.present' [rows] uint8 masks; metadata holds the
                                            sample keys, the fingerprint and the rank position of row 0
    fingerprint.json                        what the vectors depend on (written before any part)
    keyindex/hash.npy, keyindex/row.npy     sorted 64-bit key hashes and their global rows (12 bytes/key)
    index.json                              written last: fingerprint, dim, dtype, fields, per part its file,
                                            row count and sha256, and the key-index files with their sha256;
                                            its presence marks a complete cache

Every file is written to a temporary name, fsynced and renamed, so a killed build leaves only whole
parts; a rerun skips the samples they cover. Under torchrun each rank embeds every world-th sample into
its own parts, and rank 0 indexes them once all ranks are done.

The cache is read, not loaded: parts are memory-mapped and a batch gathers only its rows; keys are found
through the key index (no dict of keys). Hash-collision risk and integrity checks: see keyindex.py and
read.py.

Modules: base (config, fingerprint, atomic writes), parts (part files, CacheWriter), keyindex (write_index,
KeyIndex), build (build_cache), read (EmbeddingCache).
"""

from .base import FINGERPRINT, INDEX, CacheConfig, MissingEmbedding, check_fingerprint, content_hash, fingerprint
from .build import build_cache
from .keyindex import hash_keys, write_index
from .parts import CacheWriter
from .read import EmbeddingCache

__all__ = ["FINGERPRINT", "INDEX", "CacheConfig", "CacheWriter", "EmbeddingCache", "MissingEmbedding", "build_cache",
           "check_fingerprint", "content_hash", "fingerprint", "hash_keys", "write_index"]
