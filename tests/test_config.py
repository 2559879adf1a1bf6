import pytest

from llm2clip.config import Config, all_keys, load_config, to_yaml
from llm2clip.errors import ConfigError
from tests.conftest import ROOT


def test_tiny_preset_parses_and_resolves_interpolation():
    cfg = load_config(ROOT / "configs/tiny.yaml")
    assert isinstance(cfg, Config)
    assert cfg.data.path == "runs/tiny/data/train.jsonl"  # ${run.out_dir} resolved
    assert cfg.embedder.model == "runs/tiny/stage1/lm" and cfg.embedder.trust_remote_code is False
    assert cfg.stage1.pretrain.enabled and cfg.stage1.pretrain.out == cfg.embedder.model


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_validates_and_accepts_overrides(preset):
    cfg = load_config(ROOT / "configs" / preset, ["run.seed=3"])
    assert isinstance(cfg, Config) and cfg.run.seed == 3


def test_gpu_preset_names_real_checkpoints():
    cfg = load_config(ROOT / "configs/llama3-8b_clip-vit-l14-336.yaml")
    assert cfg.embedder.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.vision.model == "openai/clip-vit-large-patch14-336"
    assert cfg.stage1.cc.deepspeed == "configs/deepspeed/zero2.json" and not cfg.stage1.pretrain.enabled
    assert cfg.data.format == "webdataset" and cfg.data.image_size == 336


def test_overrides_are_typed():
    cfg = load_config(None, ["synth.num_images=123", "data.long_caption_keys=[a,b,c]", "data.strict=true"])
    assert cfg.synth.num_images == 123
    assert cfg.data.long_caption_keys == ["a", "b", "c"]
    assert cfg.data.strict is True


def test_unknown_key_names_closest_valid_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth:\n  num_imagse: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'synth.num_imagse'; did you mean 'synth.num_images'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"'data.strcit'.*'data.strict'"):
        load_config(None, ["data.strcit=true"])
    with pytest.raises(ConfigError, match=r"unknown config key 'stage9'"):
        load_config(None, ["stage9.lr=1"])
    with pytest.raises(ConfigError, match=r"'stage1.cc.lora.rr'; did you mean 'stage1.cc.lora.r'"):
        load_config(None, ["stage1.cc.lora.rr=8"])


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match=r"bad value for config key 'synth.num_images'"):
        load_config(None, ["synth.num_images=many"])
    with pytest.raises(ConfigError, match=r"bad value for config key 'data.strict'"):
        load_config(None, ["data.strict=perhaps"])


def test_section_given_a_scalar_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: 5\n")
    with pytest.raises(ConfigError):
        load_config(bad)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"min_objects"):
        load_config(None, ["synth.min_objects=5", "synth.max_objects=3"])
    with pytest.raises(ConfigError, match=r"data.format"):
        load_config(None, ["data.format=parquet"])
    with pytest.raises(ConfigError, match=r"key=value"):
        load_config(None, ["synth.num_images"])


def test_missing_local_model_path_is_an_error_hub_ids_are_not():
    with pytest.raises(ConfigError, match=r"embedder.model: local path '/no/such/llama' does not exist"):
        load_config(None, ["embedder.model=/no/such/llama"])
    assert load_config(None, ["vision.model=openai/clip-vit-base-patch16"]).vision.model


def test_missing_data_path_is_an_error_when_required(tmp_path):
    from llm2clip.config import validate

    cfg = load_config(None, [f"data.path={tmp_path}/none.jsonl"])
    with pytest.raises(ConfigError, match=r"data.path: nothing found"):
        validate(cfg, require_data=True)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(bad)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["synth.seed=7"])
    path = tmp_path / "dump.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_every_key_is_documented():
    doc = (ROOT / "docs/CONFIG.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in doc]
    assert not missing, f"document these keys in docs/CONFIG.md: {missing}"
