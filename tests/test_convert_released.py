"""Import of released LLM2CLIP checkpoints (llm2clip/convert.py, docs/CHECKPOINTS.md).

A tiny checkpoint in the released layout is written by `Released`, a reference module built from the
public description of microsoft/LLM2CLIP-Openai-* (HF CLIP vision transformer under `vision_model`,
`visual_projection` without bias, `text_adapter.adaptor` = residual blocks (ln; fn = Linear, GELU,
Dropout, Linear), LayerNorm, Linear; get_text_features L2-normalises its input first), independently
of llm2clip.model, so the converted model is checked against other code."""

import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from llm2clip.convert import convert_released_llm2clip
from llm2clip.errors import ConfigError
from llm2clip.model import LLM2CLIP

LLM_DIM, EMBED_DIM, DEPTH = 24, 16, 2
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8, "projection_dim": EMBED_DIM, "dropout": 0.0,
          "model_type": "clip_vision_model"}


class _LinearBlock(nn.Module):
    def __init__(self, dim: int, expansion: int = 2):
        super().__init__()
        self.fn = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(0.0),
                                nn.Linear(expansion * dim, dim))
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.fn(self.ln(x))


class _Adapter(nn.Module):
    def __init__(self):
        super().__init__()
        self.adaptor = nn.Sequential(*[_LinearBlock(LLM_DIM) for _ in range(DEPTH)], nn.LayerNorm(LLM_DIM),
                                     nn.Linear(LLM_DIM, EMBED_DIM))

    def forward(self, x):
        return self.adaptor(x)


class Released(nn.Module):
    """The released LLM2CLIPModel's inference paths, at toy size."""

    def __init__(self):
        super().__init__()
        self.vision_model = CLIPVisionModel(CLIPVisionConfig(**VISION))
        self.visual_projection = nn.Linear(32, EMBED_DIM, bias=False)
        self.text_adapter = _Adapter()
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def get_image_features(self, pixel_values):  # [B, 3, 32, 32] -> [B, E]
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    def get_text_features(self, vectors):  # [B, D] LLM vectors -> [B, E]
        return self.text_adapter(F.normalize(vectors, p=2, dim=-1))

    def released_state(self) -> dict:
        """The key names of the released checkpoints (vision keys under 'vision_model.')."""
        vision = {f"vision_model.{k.removeprefix('vision_model.')}": v
                  for k, v in self.vision_model.state_dict().items()}
        rest = {k: v for k, v in self.state_dict().items() if not k.startswith("vision_model.")}
        return {k: v.detach().clone().contiguous() for k, v in {**vision, **rest}.items()}


def _config() -> dict:
    return {"_name_or_path": "LLM2CLIP-Openai-L-14", "architectures": ["LLM2CLIPModel"],
            "auto_map": {"AutoConfig": "configuration_clip.CLIPConfig", "AutoModel": "modeling_clip.LLM2CLIPModel"},
            "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip",
            "projection_dim": EMBED_DIM, "text_config": {"model_type": "clip_text_model"}, "torch_dtype": "float32",
            "transformers_version": "4.40.2", "vision_config": dict(VISION)}


@pytest.fixture(scope="module")
def released():
    torch.manual_seed(0)
    ref = Released().eval()
    with torch.no_grad():  # no identity LayerNorms or zero biases: every tensor must land in the right place
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def _write(folder: pathlib.Path, state: dict, config: dict | None = None, pickle_file: bool = False) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or _config()))
    if pickle_file:
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g), torch.randn(3, LLM_DIM, generator=g) * 7  # unnormalised vectors


def test_converted_model_computes_what_the_released_model_computes(released, tmp_path):
    src = _write(tmp_path / "LLM2CLIP-Openai-tiny", released.released_state())
    out = convert_released_llm2clip(src, tmp_path / "llm2clip", vision_out=tmp_path / "vision_tower")
    model = LLM2CLIP.from_pretrained(out)
    pixels, vectors = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), released.get_image_features(pixels),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(vectors, normalize=False), released.get_text_features(vectors),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logit_scale, released.logit_scale)
    assert model.embedder_ref is None and model.cfg.adapter_depth == DEPTH and not model.text_adapter.center.any()
    with pytest.raises(ConfigError, match="pass LLM vectors to encode_text"):
        model.encode_text(["a red square"])
    conversion = json.loads((out / "conversion.json").read_text())
    assert conversion["ignored_keys"] == [] and conversion["llm_dim"] == LLM_DIM

    # the vision folder is a plain HF CLIP vision checkpoint
    tower = CLIPVisionModel.from_pretrained(tmp_path / "vision_tower").eval()
    with torch.no_grad():
        got = tower(pixel_values=pixels, output_hidden_states=True)
        want = released.vision_model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "vision_tower" / "preprocessor_config.json").is_file()


def test_a_converted_release_scores_through_llm2clip_eval_with_an_embedder(released, world, tmp_path):
    """`llm2clip eval --model CONVERTED --embedder EMBEDDER`: the released model's features, with the
    caption vectors of the embedder given (the released folders record none)."""
    from llm2clip.embedder import CaptionEmbedder, EmbedderConfig
    from llm2clip.evaluation.models import load_eval_model
    from tests.helpers import save_tiny_llm

    out = convert_released_llm2clip(_write(tmp_path / "LLM2CLIP-Openai-tiny", released.released_state()),
                                    tmp_path / "llm2clip")
    embedder = save_tiny_llm(tmp_path / "embedder", world / "tokenizer", hidden_size=LLM_DIM, num_layers=1)
    (embedder / "embedder_config.json").write_text(json.dumps(
        {**EmbedderConfig(max_length=64).saved_fields(), "model": ".", "adapters": []}))
    with pytest.raises(ConfigError, match="--embedder"):
        load_eval_model(out)
    model = load_eval_model(out, embedder=embedder, instruction="")
    texts, (pixels, _) = ["a red square", "a large blue circle with a small green star"], _inputs()
    vectors = CaptionEmbedder.from_pretrained(embedder, instruction="").encode(texts)  # [2, D]
    with torch.no_grad():
        want_texts = F.normalize(released.get_text_features(vectors), dim=-1)  # [2, E]
        want_images = F.normalize(released.get_image_features(pixels), dim=-1)  # [3, E]
    torch.testing.assert_close(model.encode_texts(texts), want_texts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.encode_images(pixels), want_images, atol=1e-5, rtol=1e-5)


def test_text_tower_leftovers_are_dropped_and_optional_keys_filled(released, tmp_path):
    state = released.released_state()
    state["text_projection.weight"] = torch.zeros(EMBED_DIM, 8)  # CLIP's text side: never used by the release
    del state["logit_scale"], state[f"text_adapter.adaptor.{DEPTH + 1}.bias"]
    out = convert_released_llm2clip(_write(tmp_path / "src", state), tmp_path / "out")
    conversion = json.loads((out / "conversion.json").read_text())
    assert conversion["ignored_keys"] == ["text_projection.weight"] and "logit_scale" in conversion
    assert not LLM2CLIP.from_pretrained(out).text_adapter.proj.bias.any()


def test_a_sharded_checkpoint_is_read_whole(released, tmp_path):
    state, src = released.released_state(), tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_config()))
    shards = {"model-00001-of-00002.safetensors": {}, "model-00002-of-00002.safetensors": {}}
    for i, (key, tensor) in enumerate(sorted(state.items())):
        shards[sorted(shards)[i % 2]][key] = tensor
    for name, part in shards.items():
        save_file(part, str(src / name), metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = LLM2CLIP.from_pretrained(convert_released_llm2clip(src, tmp_path / "out"))
    pixels = _inputs()[0]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(pixels, normalize=False), released.get_image_features(pixels),
                                   atol=1e-5, rtol=1e-5)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"weight shard model-00002-of-00002\.safetensors .* is missing"):
        convert_released_llm2clip(src, tmp_path / "out2")


@pytest.mark.parametrize("change,message", [
    ("missing", r"released key 'text_adapter\.adaptor\.1\.fn\.3\.weight' is missing .*Fix:"),
    ("missing_vision", r"released key 'vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias' is missing"),
    ("extra", r"unknown key 'text_adapter\.extra_scale' in the checkpoint.*Fix:"),
    ("shape", r"released key 'visual_projection\.weight' has shape \[16, 31\], expected \[16, 32\].*Fix:"),
    ("adapter_shape", r"'text_adapter\.adaptor\.0\.fn\.3\.weight' has shape \[24, 47\], expected \[24, 48\]"),
])
def test_a_damaged_checkpoint_is_refused_with_a_one_line_error(released, tmp_path, change, message):
    state = released.released_state()
    if change == "missing":
        del state["text_adapter.adaptor.1.fn.3.weight"]
    elif change == "missing_vision":
        del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    elif change == "extra":
        state["text_adapter.extra_scale"] = torch.ones(1)
    elif change == "shape":
        state["visual_projection.weight"] = torch.zeros(EMBED_DIM, 31)
    else:
        state["text_adapter.adaptor.0.fn.3.weight"] = torch.zeros(LLM_DIM, 47)
    with pytest.raises(ConfigError, match=message) as err:
        convert_released_llm2clip(_write(tmp_path / "src", state), tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_pickle_only_folder_needs_allow_pickle_and_is_read_weights_only(released, tmp_path):
    src = _write(tmp_path / "src", released.released_state(), pickle_file=True)
    with pytest.raises(ConfigError, match=r"only pytorch_model\.bin found, a pickle.*--allow-pickle"):
        convert_released_llm2clip(src, tmp_path / "out")
    model = LLM2CLIP.from_pretrained(convert_released_llm2clip(src, tmp_path / "out", allow_pickle=True))
    vectors = _inputs()[1]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(vectors, normalize=False), released.get_text_features(vectors),
                                   atol=1e-5, rtol=1e-5)


class _Touch:
    """Unpickling this would create `marker` (pathlib, no shell): what a malicious checkpoint would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_crafted_pickle_never_runs(tmp_path):
    import pickle

    src, marker = tmp_path / "src", tmp_path / "pwned"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(_config()))
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"logit_scale": _Touch(marker)}))
    with pytest.raises(ConfigError, match="allow-pickle"):
        convert_released_llm2clip(src, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"refused by torch\.load\(weights_only=True\)"):
        convert_released_llm2clip(src, tmp_path / "out", allow_pickle=True)
    assert not marker.exists()


def test_eva02_and_foreign_layouts_get_a_clear_error(released, tmp_path):
    eva = _config()
    eva["auto_map"] = {"AutoConfig": "configuration_evaclip.EvaCLIPConfig",
                       "AutoModel": "modeling_evaclip.EvaCLIPModel"}
    with pytest.raises(ConfigError, match=r"EVA02 release .* not an HF CLIPVisionTransformer.*LLM2CLIP-Openai"):
        convert_released_llm2clip(_write(tmp_path / "eva", released.released_state(), eva), tmp_path / "out")
    eva_keys = _config()
    eva_keys["vision_config"].update(rope=True, naiveswiglu=True)
    with pytest.raises(ConfigError, match=r"EVA02 release"):
        convert_released_llm2clip(_write(tmp_path / "eva2", released.released_state(), eva_keys), tmp_path / "out")
    siglip = dict(_config(), model_type="siglip")
    with pytest.raises(ConfigError, match=r"expected the microsoft/LLM2CLIP-Openai-\* .*found model_type 'siglip'"):
        convert_released_llm2clip(_write(tmp_path / "siglip", released.released_state(), siglip), tmp_path / "out")


def test_cli_converts_and_reports_errors_on_one_line(released, tmp_path, capsys):
    from llm2clip.cli import main

    src = _write(tmp_path / "src", released.released_state())
    assert main(["convert", "released", str(src), "--out", str(tmp_path / "m"), "--vision-out",
                 str(tmp_path / "v")]) == 0
    assert LLM2CLIP.from_pretrained(tmp_path / "m").llm_dim == LLM_DIM
    assert (tmp_path / "v" / "config.json").is_file()
    (src / "model.safetensors").unlink()
    torch.save(released.released_state(), src / "pytorch_model.bin")
    capsys.readouterr()  # drop the first run's progress bars
    assert main(["convert", "released", str(src), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "--allow-pickle" in err
