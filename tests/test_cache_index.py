"""The cache's key index and mapped parts, on synthetic caches written by CacheWriter (no LLM): 1M keys,
collisions and duplicates refused, pickling into DataLoader workers, lazy integrity, the verify CLI."""

import pickle

import numpy as np
import pytest
import torch

from llm2clip.cache import CacheConfig, CacheWriter, EmbeddingCache, MissingEmbedding, write_index
from llm2clip.errors import DataError

FP = {"model": "synthetic"}


def _vectors(ids: np.ndarray, dim: int) -> torch.Tensor:
    """[n, dim] float32 that encode the row id: column 0 is the id, column j is id + j (exact below 2**24)."""
    return torch.from_numpy(ids.astype(np.float32)[:, None] + np.arange(dim, dtype=np.float32))


def _write(out, n: int, part_size: int, dim: int = 8, fields=("a", "b"), dtype: str = "float32") -> list[str]:
    """A synthetic cache: key img{i:07d} at row i; field 'b' is absent where i % 3 == 0."""
    writer = CacheWriter(out, FP, dtype, dim, list(fields))
    keys = [f"img{i:07d}" for i in range(n)]
    for start in range(0, n, part_size):
        ids = np.arange(start, min(n, start + part_size))
        v = _vectors(ids, dim)
        present = {"a": torch.ones(len(ids), dtype=torch.bool), "b": torch.from_numpy(ids % 3 != 0)}
        writer.write_part(keys[start:start + part_size], {f: v for f in fields}, present, start=start)
    write_index(out, FP, dim, CacheConfig(out=str(out), fields=list(fields), dtype=dtype))
    return keys


def test_a_million_keys_index_and_look_up_exactly(tmp_path):
    n = 1_000_000
    keys = _write(tmp_path / "c", n, part_size=65536)
    cache = EmbeddingCache.open(tmp_path / "c", expect=FP)
    assert len(cache) == n and cache.dim == 8 and cache.fields == ["a", "b"]
    ids = np.random.default_rng(0).choice(n, 10_000, replace=False)
    got = cache.lookup([keys[i] for i in ids], "a")  # [10000, 8]
    torch.testing.assert_close(got, _vectors(ids, 8), rtol=0, atol=0)
    assert cache.present([keys[i] for i in ids], "b").tolist() == (ids % 3 != 0).tolist()
    absent = [f"img{i:07d}x" for i in range(100)] + ["", "img9999999"]
    assert not cache.present(absent, "a").any() and not cache.has(absent[0], "a") and cache.has(keys[5], "a")
    with pytest.raises(MissingEmbedding, match="has no 'a' embedding for sample key 'img9999999'"):
        cache.lookup([keys[1], "img9999999"], "a")
    with pytest.raises(MissingEmbedding, match="'img0000003'"):  # present in the key index, not in field b
        cache.lookup([keys[1], keys[3]], "b")
    with pytest.raises(MissingEmbedding, match=r"no field 'c' \(it has \['a', 'b'\]\)"):
        cache.lookup(keys[:1], "c")
    spread = cache.spread_rows("b", 100)  # evenly spaced rows, the absent ones left out
    rows = np.unique(np.linspace(0, n - 1, 100).astype(np.int64))
    torch.testing.assert_close(spread, _vectors(rows[rows % 3 != 0], 8), rtol=0, atol=0)


def test_bf16_parts_are_served_as_bf16(tmp_path):
    keys = _write(tmp_path / "c", 300, part_size=128, dtype="bfloat16")
    got = EmbeddingCache.open(tmp_path / "c").lookup(keys[::-7], "a")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, _vectors(np.arange(300)[::-7], 8).to(torch.bfloat16), rtol=0, atol=0)


def test_iter_keys_yields_every_key_once_in_row_order(tmp_path):
    keys = _write(tmp_path / "c", 1000, part_size=64)
    assert list(EmbeddingCache.open(tmp_path / "c").iter_keys()) == keys


def test_two_keys_with_one_hash_are_refused_naming_both(tmp_path, monkeypatch):
    from llm2clip.cache import keyindex

    real = keyindex.hash_keys

    def colliding(keys):  # img0000007 hashes like img0000100
        h = real(keys).copy()
        h[[k == "img0000007" for k in keys]] = real(["img0000100"])[0]
        return h

    monkeypatch.setattr(keyindex, "hash_keys", colliding)
    with pytest.raises(DataError, match=r"keys 'img0000007' \(r000-000000.safetensors\) and 'img0000100' "
                                        r"\(r000-000001.safetensors\) have the same 64-bit hash"):
        _write(tmp_path / "c", 200, part_size=64)


def test_a_key_in_two_parts_is_refused_naming_it_and_both_files(tmp_path):
    writer = CacheWriter(tmp_path / "c", FP, "float32", 4, ["a"])
    writer.write_part(["k1", "dup"], {"a": torch.zeros(2, 4)})
    writer.write_part(["dup", "k2"], {"a": torch.zeros(2, 4)})
    with pytest.raises(DataError, match=r"key 'dup' appears in both r000-000000\.safetensors and r000-000001"):
        write_index(tmp_path / "c", FP, 4, CacheConfig(out=str(tmp_path / "c"), fields=["a"], dtype="float32"))


def copy_fresh(cache):
    copy = pickle.loads(pickle.dumps(cache))
    assert not copy._open and copy._keyindex is None
    return copy


class _Lookups(torch.utils.data.Dataset):
    def __init__(self, cache, keys):
        self.cache, self.keys = cache, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.cache.lookup([self.keys[i]], "a")[0]  # [D], read in the worker


def test_the_cache_pickles_and_serves_dataloader_workers(tmp_path):
    keys = _write(tmp_path / "c", 500, part_size=64)
    cache = EmbeddingCache.open(tmp_path / "c")
    want = cache.lookup(keys[::5], "a")  # maps some parts: those must not travel
    copy = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 20_000
    torch.testing.assert_close(copy.lookup(keys[::5], "a"), want, rtol=0, atol=0)
    # the unpickled copy has nothing mapped yet: each worker maps the parts itself (spawn would pickle the
    # dataset too; fork, the default here, is what keeps this test fast)
    loader = torch.utils.data.DataLoader(_Lookups(copy_fresh(cache), keys[::5]), batch_size=10, num_workers=2)
    torch.testing.assert_close(torch.cat(list(loader)), want, rtol=0, atol=0)


def test_opening_reads_no_vector_and_a_bad_part_is_named_when_read(tmp_path):
    keys = _write(tmp_path / "c", 300, part_size=100)
    part = tmp_path / "c/parts/r000-000001.safetensors"
    data = bytearray(part.read_bytes())
    data[-50] ^= 0xFF  # same size: only a digest finds it
    part.write_bytes(bytes(data))
    cache = EmbeddingCache.open(tmp_path / "c", verify=True)
    assert cache.lookup(keys[:3] + keys[250:], "a").shape == (53, 8)  # parts 0 and 2
    with pytest.raises(DataError, match=r"r000-000001.safetensors is corrupt .*sha256.*llm2clip cache build"):
        cache.lookup([keys[150]], "a")
    with pytest.raises(DataError, match="r000-000001"):
        cache.verify_all()
    assert EmbeddingCache.open(tmp_path / "c", verify=False).lookup([keys[150]], "a").shape == (1, 8)


def test_few_parts_stay_mapped(tmp_path):
    keys = _write(tmp_path / "c", 640, part_size=16)  # 40 parts
    cache = EmbeddingCache.open(tmp_path / "c")
    cache.max_open_parts = 4
    torch.testing.assert_close(cache.lookup(keys[::-1], "a"), _vectors(np.arange(640)[::-1], 8), rtol=0, atol=0)
    assert len(cache._open) == 4


def test_verify_cli_passes_a_good_cache_and_names_a_bad_part(tmp_path, capsys):
    from llm2clip.cli import main

    _write(tmp_path / "c", 300, part_size=100)
    argv = ["cache", "verify", "--config", "configs/tiny.yaml", "--set", f"cache.out={tmp_path / 'c'}"]
    assert main(argv) == 0
    assert "ok (3 parts, 300 keys" in capsys.readouterr().out
    part = tmp_path / "c/parts/r000-000002.safetensors"
    part.write_bytes(part.read_bytes()[:-4])
    assert main(argv) != 0
    assert "r000-000002.safetensors" in capsys.readouterr().err
