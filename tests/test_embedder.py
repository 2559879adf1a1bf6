import json

import pytest
import torch

from llm2clip.embedder import CaptionEmbedder, EmbedderConfig, check_bidirectional
from llm2clip.errors import ConfigError
from llm2clip.pooling import pool
from llm2clip.tiny import LLM_FAMILIES
from tests.helpers import save_tiny_llm

FAMILY_BACKENDS = [(f, a) for f in LLM_FAMILIES for a in ("sdpa", "eager") if (f, a) != ("gemma2", "sdpa")]


@pytest.fixture(scope="module")
def llm_dirs(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("llms")
    return {f: save_tiny_llm(root / f, world / "tokenizer", family=f) for f in LLM_FAMILIES}


def _embedder(path, **kw) -> CaptionEmbedder:
    return CaptionEmbedder.load(EmbedderConfig(model=str(path), device="cpu", **kw))


def _token0_change(model, ids, attention_mask, first_real):
    changed = ids.clone()
    changed[:, -2] = (changed[:, -2] + 1) % 100 + 5  # a late token, inside every row
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        b = model(input_ids=changed, attention_mask=attention_mask).last_hidden_state
    rows = torch.arange(ids.shape[0])
    return (a[rows, first_real] - b[rows, first_real]).abs().amax(-1)  # [B]


@pytest.mark.parametrize("family,backend", FAMILY_BACKENDS)
def test_bidirectional_for_every_family_and_backend(llm_dirs, family, backend):
    model = _embedder(llm_dirs[family], attn_implementation=backend, autocast=False).model
    ids = torch.randint(5, 100, (2, 9))
    # unpadded, batch size 1
    assert _token0_change(model, ids[:1], torch.ones(1, 9, dtype=torch.long), torch.tensor([0])).min() > 1e-4
    # left-padded batch: row 1 starts at position 3
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    assert _token0_change(model, ids, mask, torch.tensor([0, 3])).min() > 1e-4
    # right-padded batch: the late token (position 7) is real in both rows
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 8:] = 0
    assert _token0_change(model, ids, mask, torch.tensor([0, 0])).min() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_causal_option_keeps_token0_fixed(llm_dirs, family):
    model = _embedder(llm_dirs[family], bidirectional=False, autocast=False).model
    ids = torch.randint(5, 100, (1, 9))
    assert _token0_change(model, ids, torch.ones(1, 9, dtype=torch.long), torch.tensor([0])).max() == 0


def test_a_model_that_stays_causal_is_refused(llm_dirs):
    model = _embedder(llm_dirs["llama"], bidirectional=False).model  # stands in for a family ignoring is_causal
    with pytest.raises(ConfigError, match=r"'llama' stayed causal.*embedder.bidirectional=false"):
        check_bidirectional(model, vocab_size=100)


def test_gemma2_sdpa_is_refused_not_silently_causal(llm_dirs):
    with pytest.raises(ValueError, match=r"(?i)sdpa|scaled_dot_product"):
        _embedder(llm_dirs["gemma2"], attn_implementation="sdpa")


# -- pooling -----------------------------------------------------------------------------------------

def test_pooling_against_hand_computed_reference():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)  # [B=2, T=4, D=2]
    attn = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])  # row 0 left-padded, row 1 right-padded
    text = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])  # instruction tokens excluded
    h0, h1 = hidden[0], hidden[1]
    torch.testing.assert_close(pool(hidden, attn, text, "mean"),
                               torch.stack([(h0[2] + h0[3]) / 2, (h1[1] + h1[2]) / 2]))
    torch.testing.assert_close(pool(hidden, attn, text, "weighted_mean"),
                               torch.stack([(1 * h0[2] + 2 * h0[3]) / 3, (1 * h1[1] + 2 * h1[2]) / 3]))
    torch.testing.assert_close(pool(hidden, attn, text, "eos"), torch.stack([h0[3], h1[2]]))
    with pytest.raises(ValueError, match=r"unknown pooling"):
        pool(hidden, attn, text, "max")


@pytest.mark.parametrize("pooling", ["mean", "weighted_mean", "eos"])
def test_padding_side_does_not_change_embeddings(llm_dirs, pooling):
    texts = ["a red circle", "a large striped blue hexagon in the top left corner of the image", "star"]
    left = _embedder(llm_dirs["llama"], pooling=pooling, padding_side="left", autocast=False).encode(texts)
    right = _embedder(llm_dirs["llama"], pooling=pooling, padding_side="right", autocast=False).encode(texts)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


def test_instruction_is_attended_but_not_pooled(llm_dirs):
    emb = _embedder(llm_dirs["llama"], autocast=False)
    batch = emb.batch(["a small green cross"], instruction="Retrieve a caption")
    n_text = len(emb.tokenizer("a small green cross", add_special_tokens=False)["input_ids"])
    assert batch["pool_mask"].sum() == n_text
    assert batch["attention_mask"].sum() > n_text
    with torch.no_grad():
        hidden = emb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        torch.testing.assert_close(emb(**batch)[0], hidden[0, -n_text:].mean(0))
    # the instruction still shapes the text tokens' states (attended to)
    other = emb.encode(["a small green cross"], instruction="Something else entirely")
    assert not torch.allclose(emb.encode(["a small green cross"], instruction="Retrieve a caption"), other)


def test_per_text_instructions_equal_one_instruction_per_batch(llm_dirs):
    """Mixed-direction CC batches give each query its own instruction in one padded batch."""
    emb = _embedder(llm_dirs["llama"], autocast=False)
    texts, insts = ["a red circle", "two blue stars on a white background"], ["Retrieve a caption", "Other"]
    with torch.no_grad():
        mixed = emb(**emb.batch(texts, instruction=insts))
        alone = torch.cat([emb(**emb.batch([t], instruction=i)) for t, i in zip(texts, insts, strict=True)])
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="2 instructions for 1 texts"):
        emb.batch(texts[:1], instruction=insts)


def test_encode_keeps_input_order_and_matches_single_items(llm_dirs):
    emb = _embedder(llm_dirs["mistral"], autocast=False)
    texts = ["short", "a much longer caption about a purple pentagon and a cyan star", "medium sized caption",
             "x " * 30]
    batched = emb.encode(texts, batch_size=3)
    single = torch.cat([emb.encode([t], batch_size=1) for t in texts])
    assert batched.shape == (4, emb.dim) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_encoding_matches_eager_and_keeps_training_eager(llm_dirs):
    """embedder.compile: encode() runs a torch.compile graph (one graph over batch sizes and lengths);
    the compiled wrapper is no submodule, so state_dict and training are untouched."""
    texts = ["short", "a much longer caption about a purple pentagon and a cyan star", "medium sized caption",
             "x " * 30, "two blue stars"]
    eager = _embedder(llm_dirs["llama"], autocast=False)
    compiled = _embedder(llm_dirs["llama"], autocast=False, compile=True)
    out = compiled.encode(texts, batch_size=2)  # batches of 2 and 1, three lengths
    torch.testing.assert_close(out, eager.encode(texts, batch_size=2), atol=1e-5, rtol=1e-5)
    assert type(compiled._compiled).__name__ == "OptimizedModule"
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert "compile" not in compiled.cfg.saved_fields()  # how it runs, not what it computes
    batch = compiled.batch(texts[:2])
    compiled(**batch).sum().backward()  # training goes through the eager model
    assert any(p.grad is not None for p in compiled.model.parameters())


def test_bf16_autocast_stays_close_to_fp32(llm_dirs):
    texts = ["a red circle on a black background", "two blue stars"]
    fp32 = _embedder(llm_dirs["llama"], autocast=False).encode(texts)
    bf16 = _embedder(llm_dirs["llama"], autocast=True).encode(texts)
    assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99


def test_bad_text_input_is_handled_and_counted(llm_dirs):
    emb = _embedder(llm_dirs["llama"], max_length=64)
    assert emb.encode([]).shape == (0, emb.dim)
    out = emb.encode(["   ", "a red circle", "word " * 200])
    assert torch.isfinite(out).all()
    assert emb.stats == {"empty": 1, "truncated": 1}


def test_bad_config_values_are_refused():
    with pytest.raises(ConfigError, match=r"embedder.pooling"):
        EmbedderConfig(pooling="max").validate()
    with pytest.raises(ConfigError, match=r"local path '/nope/llama' does not exist"):
        CaptionEmbedder.load(EmbedderConfig(model="/nope/llama"))


def test_llm2vec_config_fields_are_mapped(llm_dirs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = str(llm_dirs["llama"])
    peft_model = get_peft_model(AutoModel.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for p in peft_model.parameters():  # non-zero LoRA so the adapter visibly changes outputs
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(tmp_path)
    (tmp_path / "llm2vec_config.json").write_text(json.dumps(
        {"pooling_mode": "weighted_mean", "max_length": 64, "doc_max_length": 400, "skip_instruction": True}))
    loaded = CaptionEmbedder.from_pretrained(tmp_path, autocast=False, device="cpu")
    assert loaded.cfg.pooling == "weighted_mean" and loaded.cfg.max_length == 64 and loaded.cfg.model == base
    merged = peft_model.merge_and_unload()
    plain = _embedder(base, pooling="weighted_mean", max_length=64, instruction_format="{instruction}",
                      autocast=False)
    plain.model.load_state_dict(merged.state_dict())
    torch.testing.assert_close(loaded.encode(["a pink diamond"]), plain.encode(["a pink diamond"]))
    unadapted = _embedder(base, autocast=False).encode(["a pink diamond"])
    assert not torch.allclose(loaded.encode(["a pink diamond"]), unadapted)


def test_adapter_for_another_base_model_is_refused(llm_dirs, world, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    wide = save_tiny_llm(tmp_path / "wide", world / "tokenizer", hidden_size=128)
    get_peft_model(AutoModel.from_pretrained(wide), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    with pytest.raises(ConfigError, match=r"adapter '.*adapter' \(trained on '.*wide'\) does not fit base model "
                                          r"'.*llama'"):
        _embedder(llm_dirs["llama"], adapters=[str(tmp_path / "adapter")])
