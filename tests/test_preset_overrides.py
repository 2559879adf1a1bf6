"""The paper preset points at a user's data with few overrides (issue #18, points 6, 8 and 9)."""

from pathlib import Path

import pytest

from llm2clip.config import load_config
from llm2clip.data.readers import CaptionReader, DataConfig
from llm2clip.errors import ConfigError

PRESET = "configs/llama3-8b_clip-vit-l14-336.yaml"


def test_one_data_root_moves_every_data_key_of_the_preset():
    cfg = load_config(PRESET, ["paths.data_root=/my/data"])
    paths = [cfg.data.path, cfg.stage1.mntp.text, cfg.stage1.cc.data, cfg.stage1.cra_data, *cfg.cache.data,
             cfg.stage2.train_data, cfg.stage2.eval_data]
    assert all(p.startswith("/my/data/") for p in paths), paths
    assert "/data/" not in Path(PRESET).read_text().replace("${paths.data_root}", "")  # no path left hard-coded


def test_brace_patterns_in_a_list_need_no_quotes():
    cfg = load_config("configs/tiny.yaml", ["cache.data=[a/{0..2}.tar,b/{x,y}.tar, c.jsonl]"])
    assert cfg.cache.data == ["a/{0..2}.tar", "b/{x,y}.tar", "c.jsonl"]
    quoted = load_config("configs/tiny.yaml", ["cache.data=['a/{0..2}.tar','b.jsonl']"])
    assert quoted.cache.data == ["a/{0..2}.tar", "b.jsonl"]
    with pytest.raises(ConfigError, match=r"cache\.data"):
        load_config("configs/tiny.yaml", ["cache.data=[a/{0..2.tar,b]"])  # unbalanced: still an error


def test_inspect_detects_the_format_of_the_path_it_is_given(world, capsys):
    from llm2clip.cli import main

    base = ["data", "inspect", "--config", PRESET, "--set", "data.short_caption_key=short_caption",
            "--set", "data.long_caption_keys=[long_caption]"]  # the preset says data.format: webdataset
    assert main([*base, str(world / "test.jsonl")]) == 0
    assert "(jsonl): read 6 samples, skipped 0" in capsys.readouterr().out
    assert main([*base, str(world / "wds")]) == 0  # a folder of shards is not an image folder
    out = capsys.readouterr().out
    assert "(webdataset): read 60 samples, skipped 0" in out


def test_a_path_of_another_format_names_data_format(world):
    with pytest.raises(ConfigError) as e:
        CaptionReader(DataConfig(path=str(world / "test.jsonl"), format="webdataset"))
    assert str(e.value).startswith("data.format: 'webdataset' (set) does not fit")
    assert "data.format=jsonl" in str(e.value)
