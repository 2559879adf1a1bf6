"""llm2clip.evaluation.models: every folder kind loads for evaluation and encodes as its own model does.

Tiny folders are written through the code that writes real ones (LLM2CLIP / BaselineCLIP / KnowledgeCLIP
save_pretrained, transformers' save_pretrained for SigLIP), once per module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from llm2clip.data.images import make_image_processor
from llm2clip.embedder import CaptionEmbedder, EmbedderConfig, read_embedder_config
from llm2clip.errors import ConfigError
from llm2clip.evaluation.models import TextCache, detect_kind, load_eval_model
from tests.helpers import save_tiny_llm

LLM_DIM, EMBED_DIM = 32, 16
TEXTS = ["a red circle", "a large green hexagon next to a orange diamond on a black background", "two squares",
         "a red circle"]  # a repeat: embedded once, returned twice
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 16}


def build_folders(world: Path, root: Path) -> dict[str, Path]:
    """Tiny model folders of each kind (and a stage-1 embedder), as the package's own code saves them."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llm2clip.baseline import BaselineCLIP, TextTowerConfig
    from llm2clip.cache import fingerprint
    from llm2clip.knowledge.model import HeadsConfig, KnowledgeCLIP
    from llm2clip.model import LLM2CLIP, ModelConfig

    out = {"embedder": save_tiny_llm(root / "embedder", world / "tokenizer", hidden_size=LLM_DIM, num_layers=1)}
    # a stage-1 embedder folder as stage1/merge.py writes one: merged weights + embedder_config.json (model '.')
    saved = {**EmbedderConfig(max_length=64).saved_fields(), "model": ".", "adapters": []}
    (out["embedder"] / "embedder_config.json").write_text(json.dumps(saved))
    emb_cfg = read_embedder_config(out["embedder"])
    ref = {"config": emb_cfg.saved_fields(), "fingerprint": fingerprint(emb_cfg, "bfloat16")}  # as stage 2 records
    for name, record in (("llm2clip", ref), ("llm2clip_norecord", None)):  # no record: like a converted release
        torch.manual_seed(1)
        model = LLM2CLIP(CLIPVisionModel(CLIPVisionConfig(**VISION)), LLM_DIM,
                         ModelConfig(embed_dim=EMBED_DIM, adapter_depth=1), record)
        model.text_adapter.set_center(torch.randn(8, LLM_DIM))  # a non-zero centre must survive the round trip
        model.save_pretrained(root / name, make_image_processor(32))
        out[name] = root / name
    torch.manual_seed(2)
    base = BaselineCLIP.from_config(CLIPVisionConfig(**VISION), TextTowerConfig(
        hidden_size=32, num_layers=1, num_heads=2, tokenizer=str(world / "tokenizer")), EMBED_DIM)
    base.save_pretrained(root / "clip", make_image_processor(32))
    out["clip"] = root / "clip"
    KnowledgeCLIP.from_clip(base, HeadsConfig(llm_dim=LLM_DIM, num_concepts=4), seed=3).save_pretrained(
        root / "knowledge_clip", make_image_processor(32))
    out["knowledge_clip"] = root / "knowledge_clip"
    out["siglip"], out["siglip2"] = _siglip(world, root, 1), _siglip(world, root, 2)
    return out


def _siglip(world: Path, root: Path, version: int) -> Path:
    import transformers
    from transformers import AutoTokenizer

    from llm2clip.data.images import naflex_processor

    tokenizer = AutoTokenizer.from_pretrained(world / "tokenizer")
    prefix = "Siglip2" if version == 2 else "Siglip"
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 64, "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    vision = {k: v for k, v in VISION.items() if version == 1 or k != "image_size"}
    vision = {**vision, "num_patches": 4} if version == 2 else vision  # NaFlex: a 2x2 grid of 16 px patches
    config = getattr(transformers, f"{prefix}Config")(text_config=text, vision_config=vision)
    torch.manual_seed(4)
    folder = root / prefix.lower()
    getattr(transformers, f"{prefix}Model")(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    square = make_image_processor(32, family="siglip2" if version == 2 else "siglip")
    (naflex_processor(square, 16) if version == 2 else square).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(world, tmp_path_factory) -> dict[str, Path]:
    return build_folders(world, tmp_path_factory.mktemp("eval_models"))


def _pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))  # [B, 3, H, W]


def _unit(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(len(x)), atol=1e-5)


@pytest.mark.parametrize("kind", ["llm2clip", "knowledge_clip", "clip", "siglip", "siglip2"])
def test_each_kind_loads_and_encodes_unit_vectors(folders, kind):
    model = load_eval_model(folders[kind], batch_size=2)  # batches smaller than the inputs
    assert model.kind == detect_kind(folders[kind]) == kind
    assert model.describe()["model"] == folders[kind].name and model.describe()["pretrained"] == str(folders[kind])
    image = Image.fromarray((torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(6)) * 255).byte().numpy())
    pixels = model.processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    images, texts = model.encode_images(_pixels()), model.encode_texts(TEXTS)
    assert images.dtype == texts.dtype == torch.float32 and images.shape[1] == texts.shape[1]
    assert images.shape[0] == 3 and texts.shape[0] == len(TEXTS) and _unit(images) and _unit(texts)
    torch.testing.assert_close(texts[0], texts[3])
    texts /= 2  # outputs are plain tensors, usable outside inference mode
    assert model.encode_texts([]).shape == (0, images.shape[1])


def test_llm2clip_features_equal_the_model_on_its_embedders_vectors(folders):
    from llm2clip.model import LLM2CLIP

    model = load_eval_model(folders["llm2clip"], batch_size=3)
    ref = LLM2CLIP.from_pretrained(folders["llm2clip"])
    vectors = CaptionEmbedder.load(EmbedderConfig(**ref.embedder_ref["config"], device="cpu")).encode(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_texts(TEXTS), ref.encode_text(vectors), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_images(_pixels()), ref.encode_image(_pixels()), atol=1e-5, rtol=1e-5)
    assert model.describe()["embedder"]["instruction"] == ref.embedder_ref["config"]["instruction"]


def test_a_folder_without_a_recorded_embedder_needs_one(folders):
    from llm2clip.model import LLM2CLIP

    with pytest.raises(ConfigError, match="--embedder"):
        load_eval_model(folders["llm2clip_norecord"])
    model = load_eval_model(folders["llm2clip_norecord"], embedder=folders["embedder"])
    ref = LLM2CLIP.from_pretrained(folders["llm2clip_norecord"])
    vectors = CaptionEmbedder.from_pretrained(folders["embedder"], device="cpu").encode(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_texts(TEXTS), ref.encode_text(vectors), atol=1e-5, rtol=1e-5)


def test_an_embedder_given_for_a_clip_folder_is_not_used(folders, caplog):
    """`llm2clip eval --embedder E --model LLM2CLIP --model CLIP` scores both: CLIP has its own text tower."""
    plain = load_eval_model(folders["clip"]).encode_texts(TEXTS)
    with caplog.at_level("WARNING"):
        given = load_eval_model(folders["clip"], embedder=folders["embedder"])
    assert "not used" in caplog.text and given.embedder is None
    torch.testing.assert_close(given.encode_texts(TEXTS), plain)


def test_clip_features_equal_clipmodel_features_text_by_text(folders):
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(folders["clip"]).eval()
    tok = AutoTokenizer.from_pretrained(folders["clip"])
    model = load_eval_model(folders["clip"], batch_size=2)
    with torch.no_grad():
        for text, mine in zip(TEXTS, model.encode_texts(TEXTS), strict=True):  # unpadded, one at a time
            body = tok(text, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[tok.bos_token_id, *body, tok.eos_token_id]])  # [1, T]
            theirs = clip.get_text_features(input_ids=ids)
            torch.testing.assert_close(mine, F.normalize(getattr(theirs, "pooler_output", theirs), dim=-1)[0],
                                       atol=1e-5, rtol=1e-5)
        theirs = clip.get_image_features(pixel_values=_pixels())
        torch.testing.assert_close(model.encode_images(_pixels()),
                                   F.normalize(getattr(theirs, "pooler_output", theirs), dim=-1), atol=1e-5, rtol=1e-5)


def test_clip_text_is_truncated_at_77_tokens(folders):
    model = load_eval_model(folders["clip"])
    long = " ".join(["a red circle next to a blue square"] * 30)  # far beyond 77 tokens
    a, b = model.encode_texts([long, long + " and a green triangle"])
    torch.testing.assert_close(a, b)  # the tail past the context window is cut


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_siglip_text_is_padded_to_max_length_without_a_mask(folders, kind):
    import transformers

    folder = folders[kind]
    ref = getattr(transformers, "Siglip2Model" if kind == "siglip2" else "SiglipModel").from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = load_eval_model(folder)
    together = model.encode_texts(TEXTS)
    with torch.no_grad():
        for text, mine in zip(TEXTS, together, strict=True):
            text = text.lower() if kind == "siglip2" else text
            ids = tok([text], padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
            theirs = ref.get_text_features(input_ids=ids)
            torch.testing.assert_close(mine, F.normalize(getattr(theirs, "pooler_output", theirs), dim=-1)[0],
                                       atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_texts(TEXTS[:1]), together[:1], atol=1e-5, rtol=1e-5)  # batch-invariant


def _no_llm(*args, **kwargs):
    raise AssertionError("the LLM was loaded although every caption is cached")


def test_the_text_cache_serves_a_second_evaluation_without_the_llm(folders, tmp_path, monkeypatch):
    first = load_eval_model(folders["llm2clip"], text_cache=tmp_path / "tc")
    expected = first.encode_texts(TEXTS)
    assert first.module.llm_text.embedded == 3  # distinct texts only
    (sub,) = (tmp_path / "tc").iterdir()
    assert json.loads((sub / "fingerprint.json").read_text()) == first.describe()["embedder"]["fingerprint"]
    assert all(p.suffix in (".json", ".safetensors") for p in sub.iterdir())  # no pickles

    monkeypatch.setattr(CaptionEmbedder, "load", _no_llm)
    second = load_eval_model(folders["llm2clip"], text_cache=tmp_path / "tc")
    assert torch.equal(second.encode_texts(list(reversed(TEXTS))), expected.flip(0))
    assert second.module.llm_text.embedded == 0
    monkeypatch.undo()
    second.encode_texts(["a new caption", TEXTS[0]])  # only the new text is embedded and added
    assert second.module.llm_text.embedded == 1 and len(list(sub.glob("vectors-*"))) == 2


def test_a_cache_of_another_embedder_setup_is_never_read(folders, tmp_path, monkeypatch):
    cache = tmp_path / "tc"
    a = load_eval_model(folders["llm2clip"], text_cache=cache)
    va = a.encode_texts(TEXTS)
    b = load_eval_model(folders["llm2clip"], text_cache=cache, instruction="Given a sentence, retrieve it")
    vb = b.encode_texts(TEXTS)  # another instruction: another fingerprint, its own folder
    assert b.module.llm_text.embedded == 3 and not torch.allclose(va, vb, atol=1e-4)
    assert len(list(cache.iterdir())) == 2

    # a folder named for B's fingerprint that holds A's vectors and fingerprint is not read
    sub_b = b.module.llm_text.cache.folder
    shutil.rmtree(sub_b)
    shutil.copytree(a.module.llm_text.cache.folder, sub_b)
    c = load_eval_model(folders["llm2clip"], text_cache=cache, instruction="Given a sentence, retrieve it")
    assert not c.module.llm_text.cache.usable
    torch.testing.assert_close(c.encode_texts(TEXTS), vb)
    assert c.module.llm_text.embedded == 3 and len(list(sub_b.glob("vectors-*"))) == 1  # nor written to


def test_a_damaged_cache_file_is_recomputed(folders, tmp_path):
    a = load_eval_model(folders["llm2clip"], text_cache=tmp_path / "tc")
    expected = a.encode_texts(TEXTS)
    (shard,) = a.module.llm_text.cache.folder.glob("vectors-*")
    shard.write_bytes(shard.read_bytes()[:40])  # truncated
    b = load_eval_model(folders["llm2clip"], text_cache=tmp_path / "tc")
    torch.testing.assert_close(b.encode_texts(TEXTS), expected)
    assert b.module.llm_text.embedded == 3


def test_cache_keys_are_the_exact_text(tmp_path):
    cache = TextCache(tmp_path, {"model": "x"})
    cache.put(["a", "a "], torch.tensor([[1.0, 0.0], [0.0, float("nan")]]))  # the non-finite row is left out
    assert set(TextCache(tmp_path, {"model": "x"}).get(["a", "a ", "b"])) == {"a"}
    assert TextCache(tmp_path, {"model": "y"}).get(["a"]) == {}


def test_a_changed_or_missing_recorded_embedder_is_refused(folders, tmp_path):
    moved = tmp_path / "llm2clip"
    shutil.copytree(folders["llm2clip"], moved)
    config = json.loads((moved / "config.json").read_text())
    config["embedder"]["config"]["model"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"gone .*does not exist\). Fix: restore it, or pass --embedder"):
        load_eval_model(moved)
    config["embedder"]["config"]["model"] = str(folders["knowledge_clip"])  # another folder: other weights
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="changed since training"):
        load_eval_model(moved)
    assert load_eval_model(moved, embedder=folders["embedder"]).encode_texts(TEXTS[:1]).shape == (1, EMBED_DIM)


def test_unknown_folders_are_refused_with_the_fix(folders, tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_eval_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match=r"model_type 'bert'.*Fix: point --model"):
        load_eval_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(ConfigError, match="vision tower alone"):
        load_eval_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["LLM2CLIPModel"]}))
    with pytest.raises(ConfigError, match="llm2clip convert released"):
        load_eval_model(tmp_path)
