"""The embedding cache: exact vectors by key, fingerprint refusal, resume, corruption, rank sharding."""

import json
from dataclasses import replace

import pytest
import torch

from llm2clip.cache import CacheConfig, EmbeddingCache, MissingEmbedding, build_cache, fingerprint
from llm2clip.data.readers import CaptionReader, DataConfig
from llm2clip.embedder import CaptionEmbedder, EmbedderConfig
from llm2clip.errors import ConfigError, DataError
from tests.helpers import save_tiny_llm

FIELDS = ["short_caption", "long_caption", "long_caption_zh"]


@pytest.fixture(scope="module")
def emb_cfg(world, tmp_path_factory):
    lm = save_tiny_llm(tmp_path_factory.mktemp("lm") / "lm", world / "tokenizer")
    return EmbedderConfig(model=str(lm), device="cpu", max_length=128)


def _cfg(world, out, **kw):
    return CacheConfig(out=str(out), data=[str(world / "train.jsonl"), str(world / "test.jsonl")], fields=FIELDS,
                       part_size=16, **kw)


def test_cache_serves_the_embedders_vectors_by_key(world, emb_cfg, tmp_path):
    summary = build_cache(_cfg(world, tmp_path / "c", dtype="float32"), emb_cfg, progress=False)
    cache = EmbeddingCache.open(tmp_path / "c", expect=fingerprint(emb_cfg, "float32"))
    samples = list(CaptionReader(DataConfig(path=str(world / "test.jsonl")), load_images=False))
    n_train = len(list(CaptionReader(DataConfig(path=str(world / "train.jsonl")), load_images=False)))
    assert summary["num_keys"] == len(cache) == n_train + len(samples) and cache.dim == 64
    expected = CaptionEmbedder.load(emb_cfg).encode([s.meta["long_caption_zh"] for s in samples])
    torch.testing.assert_close(cache.lookup([s.key for s in samples], "long_caption_zh"), expected)
    assert build_cache(_cfg(world, tmp_path / "c", dtype="float32"), emb_cfg, progress=False)["reused"]


def test_bf16_storage_halves_the_bytes(world, emb_cfg, tmp_path):
    build_cache(_cfg(world, tmp_path / "c"), emb_cfg, progress=False)
    cache = EmbeddingCache.open(tmp_path / "c")
    assert cache.lookup(list(cache.iter_keys())[:3], "short_caption").dtype == torch.bfloat16


@pytest.mark.parametrize("change", [{"pooling": "eos"}, {"instruction": "Embed this"}, {"max_length": 64}])
def test_a_cache_of_another_setup_is_refused_naming_what_differs(world, emb_cfg, tmp_path, change):
    build_cache(_cfg(world, tmp_path / "c"), emb_cfg, progress=False)
    other = replace(emb_cfg, **change)
    key = next(iter(change))
    with pytest.raises(ConfigError, match=key):
        EmbeddingCache.open(tmp_path / "c", expect=fingerprint(other, "bfloat16"))
    with pytest.raises(ConfigError, match=key):
        build_cache(_cfg(world, tmp_path / "c"), other, progress=False)


def test_other_weights_change_the_fingerprint(world, emb_cfg, tmp_path):
    other = save_tiny_llm(tmp_path / "lm2", world / "tokenizer", seed=1)
    assert fingerprint(emb_cfg, "bfloat16")["model"] != fingerprint(replace(emb_cfg, model=str(other)),
                                                                    "bfloat16")["model"]


def test_a_killed_build_resumes_without_missing_or_duplicated_keys(world, emb_cfg, tmp_path):
    cfg = _cfg(world, tmp_path / "c")
    build_cache(cfg, emb_cfg, progress=False)
    full = EmbeddingCache.open(tmp_path / "c")
    keys = list(full.iter_keys())
    vectors = full.lookup(keys, "long_caption")  # read now: the resumed build rewrites later parts
    # a kill after the first two parts: later parts and the index never got written
    parts = sorted((tmp_path / "c/parts").glob("*.safetensors"))
    for p in parts[2:]:
        p.unlink()
    (tmp_path / "c/index.json").unlink()
    (tmp_path / "c/parts/r000-000002.safetensors.tmp").write_bytes(b"half a file")  # the part being written
    summary = build_cache(cfg, emb_cfg, progress=False)
    assert summary["embedded_now"] == len(full) - 2 * 16
    resumed = EmbeddingCache.open(tmp_path / "c")
    index = json.loads((tmp_path / "c/index.json").read_text())
    assert sorted(resumed.iter_keys()) == sorted(keys) and sum(p["rows"] for p in index["parts"]) == len(full)
    torch.testing.assert_close(resumed.lookup(keys, "long_caption"), vectors)


@pytest.mark.parametrize("change", ["rename", "drop"])
def test_a_resumed_build_over_changed_data_is_refused(world, emb_cfg, tmp_path, change):
    """Resuming skips the samples the parts cover by count; a renamed or dropped sample is caught."""
    lines = (world / "train.jsonl").read_text().splitlines()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = replace(_cfg(world, tmp_path / "c"), data=[str(data)])
    build_cache(cfg, emb_cfg, progress=False)
    (tmp_path / "c/index.json").unlink()
    row = json.loads(lines[5])
    if change == "rename":  # inside the first part
        lines[5] = json.dumps({**row, "key": row["key"] + "-renamed"})
        match = rf"r000-000000.safetensors holds key '{row['key']}' at sample 5 of this rank, but .*-renamed'"
    else:  # the data now ends inside the last part
        lines = lines[:-3]
        match = r"r000-00000\d.safetensors holds key .* but cache.data now has the end of the data there"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match + r".*llm2clip cache build --force"):
        build_cache(cfg, emb_cfg, progress=False)


def test_a_corrupted_or_truncated_part_is_named_when_first_read(world, emb_cfg, tmp_path):
    """Opening reads no vector: a bad part is found by the first lookup that reads it, and by verify_all."""
    from llm2clip.cache.parts import part_meta

    build_cache(_cfg(world, tmp_path / "c"), emb_cfg, progress=False)
    parts = sorted((tmp_path / "c/parts").glob("*.safetensors"))
    part, good = parts[1], part_meta(parts[0])["keys"][:4]
    bad = part_meta(part)["keys"][:2]
    data = bytearray(part.read_bytes())
    data[-10] ^= 0xFF  # same size, one flipped byte
    part.write_bytes(bytes(data))
    cache = EmbeddingCache.open(tmp_path / "c")
    assert cache.lookup(good, "short_caption").shape == (4, 64)
    with pytest.raises(DataError, match=part.name):
        cache.lookup(bad, "short_caption")
    with pytest.raises(DataError, match=part.name):
        EmbeddingCache.open(tmp_path / "c").verify_all()
    part.write_bytes(bytes(data[: len(data) // 2]))
    for verify in (True, False):  # the size check needs no digest
        with pytest.raises(DataError, match="truncated"):
            EmbeddingCache.open(tmp_path / "c", verify=verify).lookup(bad, "short_caption")


def test_a_missing_key_or_field_is_named(world, emb_cfg, tmp_path):
    build_cache(_cfg(world, tmp_path / "c"), emb_cfg, progress=False)
    cache = EmbeddingCache.open(tmp_path / "c")
    first = next(cache.iter_keys())
    with pytest.raises(MissingEmbedding, match="'no-such-key'"):
        cache.lookup([first, "no-such-key"], "short_caption")
    with pytest.raises(MissingEmbedding, match="no field 'long_caption_2'"):
        cache.lookup([first], "long_caption_2")


def test_duplicate_keys_across_files_are_refused(world, emb_cfg, tmp_path):
    cfg = CacheConfig(out=str(tmp_path / "c"), data=[str(world / "test.jsonl")] * 2, fields=FIELDS)
    with pytest.raises(DataError, match="appears twice"):
        build_cache(cfg, emb_cfg, progress=False)


def _rank_worker(rank, world_size, port, cfg, emb_cfg):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    build_cache(cfg, emb_cfg, progress=False)  # joins the process group from the environment
    dist.destroy_process_group()


def test_two_ranks_split_the_work_and_cover_every_key_once(world, emb_cfg, tmp_path):
    import torch.multiprocessing as mp

    cfg = _cfg(world, tmp_path / "c")
    mp.spawn(_rank_worker, args=(2, 29551, cfg, emb_cfg), nprocs=2, join=True)
    index = json.loads((tmp_path / "c/index.json").read_text())
    assert {p["file"].split("/")[1][:4] for p in index["parts"]} == {"r000", "r001"}
    cache = EmbeddingCache.open(tmp_path / "c")
    build_cache(_cfg(world, tmp_path / "one"), emb_cfg, progress=False)
    single = EmbeddingCache.open(tmp_path / "one")
    keys = list(single.iter_keys())
    assert sorted(cache.iter_keys()) == sorted(keys) and sum(p["rows"] for p in index["parts"]) == len(single)
    torch.testing.assert_close(cache.lookup(keys, "short_caption").float(),
                               single.lookup(keys, "short_caption").float())


class _OverflowingEmbedder:
    """The real embedder, except that captions containing `word` come out as NaN (an fp16 overflow)."""

    def __init__(self, emb_cfg, word: str):
        self.inner, self.word = CaptionEmbedder.load(emb_cfg), word
        self.dim, self.stats = self.inner.dim, self.inner.stats

    def encode(self, texts, instruction=None):
        out = self.inner.encode(texts, instruction=instruction).float().clone()
        out[[i for i, t in enumerate(texts) if self.word in t]] = float("nan")
        return out


def test_non_finite_vectors_are_left_out_and_counted_or_named_in_strict_mode(world, emb_cfg, tmp_path):
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    word = rows[0]["short_caption"].split()[-1]  # some short captions contain it
    hit = [r["key"] for r in rows if word in r["short_caption"]]
    cfg = replace(_cfg(world, tmp_path / "c"), data=[str(world / "train.jsonl")])
    summary = build_cache(cfg, emb_cfg, progress=False, embedder=_OverflowingEmbedder(emb_cfg, word))
    cache = EmbeddingCache.open(tmp_path / "c")
    assert summary["nonfinite_vectors"] >= len(hit) > 0
    assert not any(cache.has(k, "short_caption") for k in hit)
    served = [k for k in cache.iter_keys() if cache.has(k, "long_caption")]
    assert torch.isfinite(cache.lookup(served, "long_caption").float()).all()
    strict = DataConfig(strict=True)
    with pytest.raises(DataError, match=r"embedding of key '.+' is not finite"):
        build_cache(replace(cfg, out=str(tmp_path / "s")), emb_cfg, strict, progress=False,
                    embedder=_OverflowingEmbedder(emb_cfg, word))


def test_cache_instruction_embeds_every_caption_with_it_and_is_part_of_the_fingerprint(world, emb_cfg, tmp_path):
    """cache.instruction "" (the official LLM2CLIP's: no instruction) overrides embedder.instruction, also
    for an embedder handed in; a cache of another instruction is refused, opened or resumed."""
    embedder = CaptionEmbedder.load(emb_cfg)
    assert embedder.cfg.instruction  # the embedder's own is not empty: "" must win over it
    build_cache(_cfg(world, tmp_path / "c", dtype="float32", instruction=""), emb_cfg, progress=False,
                embedder=embedder)
    samples = list(CaptionReader(DataConfig(path=str(world / "test.jsonl")), load_images=False))
    texts = [s.long_captions[0] for s in samples]
    none = CacheConfig(instruction="").apply_instruction(emb_cfg)
    assert none.instruction == "" and fingerprint(none, "float32")["instruction"] == ""
    cache = EmbeddingCache.open(tmp_path / "c", expect=fingerprint(none, "float32"))
    stored = cache.lookup([s.key for s in samples], "long_caption")
    torch.testing.assert_close(stored, embedder.encode(texts, instruction=""))
    assert not torch.allclose(stored, embedder.encode(texts), atol=1e-3)  # the default instruction differs
    for other in (None, "Embed this caption"):
        cfg = CacheConfig(instruction=other)
        with pytest.raises(ConfigError, match="instruction"):
            EmbeddingCache.open(tmp_path / "c", expect=fingerprint(cfg.apply_instruction(emb_cfg), "float32"))
        with pytest.raises(ConfigError, match="instruction"):
            build_cache(_cfg(world, tmp_path / "c", dtype="float32", instruction=other), emb_cfg, progress=False)


def test_stage2_reads_texts_with_the_cache_instruction_everywhere(world, emb_cfg, tmp_path):
    """Training (cached or online), the trained model's encode_text and evaluation embed with one
    instruction: stage2_embedder_config's, which the model saves; evaluation refuses a model trained
    with another."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llm2clip.config import load_config
    from llm2clip.model import LLM2CLIP, ModelConfig
    from llm2clip.stage2.data import Caption
    from llm2clip.stage2.evaluate import llm2clip_text_side
    from llm2clip.stage2.runs import embedder_config, stage2_embedder_config

    sets = [f"embedder.model={emb_cfg.model}", "embedder.device=cpu", "embedder.max_length=128",
            f"stage1.cc.out={tmp_path / 'no_cc'}", f"cache.out={tmp_path / 'c'}", "cache.dtype=float32"]
    cfg = load_config("configs/tiny.yaml", [*sets, 'cache.instruction=""'])
    stage2 = stage2_embedder_config(cfg)
    assert (stage2.instruction, embedder_config(cfg).instruction) == ("", cfg.embedder.instruction)
    default = load_config("configs/tiny.yaml", sets)  # cache.instruction: null = the embedder's
    assert stage2_embedder_config(default).instruction == default.embedder.instruction

    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=16, patch_size=8))
    ref = {"config": stage2.saved_fields(), "fingerprint": fingerprint(stage2, "float32")}  # as run_llm2clip saves
    model = LLM2CLIP(vision, 64, ModelConfig(embed_dim=8, adapter_depth=1), ref).eval()
    texts = ["a large red circle", "two small blue squares"]
    vectors = CaptionEmbedder.load(emb_cfg).encode(texts, instruction="")
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(texts), model.encode_text(vectors))
    live = llm2clip_text_side(cfg, model)  # no cache built: the live LLM, through the model's embedder
    torch.testing.assert_close(live(["k0", "k1"], [Caption("long_caption", t) for t in texts]), vectors)
    with pytest.raises(ConfigError, match=r"cache\.instruction"):
        llm2clip_text_side(default, model)
