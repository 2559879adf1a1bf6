"""CRA reads the configured caption columns, list columns and COCO-style files (issue #18, point 1)."""

import json

import pytest

from llm2clip.config import load_config
from llm2clip.data.readers import DataConfig
from llm2clip.errors import ConfigError, DataError
from llm2clip.stage1.cra import collect_views


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cra_reads_a_coco_style_list_column(tmp_path):
    rows = [{"image": f"{i}.jpg", "captions": [f"cap {i} a", f"cap {i} b", f"cap {i} c"]} for i in range(4)]
    views, info = collect_views(_jsonl(tmp_path / "coco.jsonl", rows), DataConfig(), ["captions"])
    assert views["en"] == ([f"cap {i} a" for i in range(4)], [f"cap {i} b" for i in range(4)])
    assert info["num_images"] == 4 and set(info["views_skipped"]) == {"cross_lingual", "short_long"}


def test_cra_reads_the_data_sections_caption_columns(tmp_path):
    """The preset's DreamLIP columns: data.short_caption_key and data.long_caption_keys."""
    rows = [{"image": f"{i}.jpg", "shortSV_captions": f"short {i}", "longSV_captions": [f"long {i}", f"other {i}"]}
            for i in range(3)]
    data = DataConfig(short_caption_key="shortSV_captions", long_caption_keys=["longSV_captions"])
    views, info = collect_views(_jsonl(tmp_path / "d.jsonl", rows), data, [], second_language_key=None)
    assert views["en"] == ([f"long {i}" for i in range(3)], [f"other {i}" for i in range(3)])
    assert views["short_long"] == ([f"short {i}" for i in range(3)], [f"long {i}" for i in range(3)])
    assert info["views_skipped"] == {"cross_lingual": "stage1.cra_second_language_key is null"}


def test_cra_with_fewer_than_two_captions_per_image_says_so_in_one_line(tmp_path):
    rows = [{"image": "0.jpg", "caption": "only one"}, {"image": "1.jpg", "caption": "just one"}]
    with pytest.raises(DataError) as e:
        collect_views(_jsonl(tmp_path / "one.jsonl", rows), DataConfig(long_caption_keys=["caption"]))
    assert "\n" not in str(e.value) and "two captions" in str(e.value) and "stage1.cra_caption_keys" in str(e.value)


def test_cra_on_the_shapes_world_keeps_every_view(world):
    views, info = collect_views(str(world / "test.jsonl"))
    assert set(views) == {"en", "cross_lingual", "short_long"} and info["views_skipped"] == {}
    assert len(views["en"][0]) == info["num_images"] > 0


def test_cra_data_null_is_accepted_and_refused_by_eval_cra():
    from llm2clip.stage1.cli import run_eval_cra

    cfg = load_config("configs/tiny.yaml", ["stage1.cra_data=null"])
    assert cfg.stage1.cra_data is None
    with pytest.raises(ConfigError, match=r"stage1\.cra_data is null"):
        run_eval_cra(cfg)
