"""A missing path is reported under the key that named it (issue #18, point 6)."""

import pytest

from llm2clip.config import load_config
from llm2clip.errors import ConfigError


def _cfg(tmp_path, world, *sets):
    return load_config("configs/tiny.yaml", [f"run.out_dir={tmp_path}", f"data.path={world}/train.jsonl",
                                             "embedder.model=some/hub-id", *sets])


def _says(err, key):
    assert str(err.value).startswith(f"{key}: nothing found at '/nowhere") and "data synth" not in str(err.value)


def test_missing_cc_data_names_stage1_cc_data():
    from llm2clip.stage1.pairs import read_caption_groups

    with pytest.raises(ConfigError) as e:
        read_caption_groups("/nowhere/train.jsonl")
    _says(e, "stage1.cc.data")


def test_missing_cra_data_names_stage1_cra_data():
    from llm2clip.stage1.cra import collect_views

    with pytest.raises(ConfigError) as e:
        collect_views("/nowhere/coco.jsonl")
    _says(e, "stage1.cra_data")


def test_missing_eval_data_names_stage2_eval_data(tmp_path, world):
    from llm2clip.stage2.runs import load_images

    cfg = _cfg(tmp_path, world, "stage2.eval_data=/nowhere/eval.jsonl")
    with pytest.raises(ConfigError) as e:
        load_images(cfg, cfg.stage2.eval_data, progress=False)
    _says(e, "stage2.eval_data")


def test_missing_cache_data_names_cache_data(tmp_path, world):
    from llm2clip.cache import build_cache

    cfg = _cfg(tmp_path, world, f"cache.data=[{world}/train.jsonl,/nowhere/eval.jsonl]")
    with pytest.raises(ConfigError) as e:
        build_cache(cfg.cache, cfg.embedder, cfg.data, progress=False)
    _says(e, "cache.data")


@pytest.mark.parametrize("key", ["stage1.cc.data", "stage1.cra_data", "cache.data", "stage2.eval_data"])
def test_run_checks_every_path_key_before_any_work(tmp_path, world, key, capsys):
    from llm2clip.cli import main

    value = "[/nowhere/x.jsonl]" if key == "cache.data" else "/nowhere/x.jsonl"
    argv = ["run", "--config", "configs/tiny.yaml", "--no-progress", "--set", f"run.out_dir={tmp_path}",
            "--set", "synth.enabled=false", "--set", f"data.path={world}/train.jsonl",
            "--set", f"stage1.cc.data={world}/stage1_train.jsonl",
            "--set", f"stage1.cc.text_pairs={world}/parallel.jsonl", "--set", f"stage1.cra_data={world}/test.jsonl",
            "--set", f"cache.data=[{world}/train.jsonl]", "--set", f"stage2.eval_data={world}/test.jsonl",
            "--set", f"{key}={value}"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {key}: nothing found at '/nowhere/x.jsonl'")
    assert not any(tmp_path.iterdir())  # nothing was started
