"""The shipped paper preset, end to end on real-format inputs at toy size, with only path and size
overrides: `llm2clip run`, then `llm2clip export` (issue #18's rehearsal; the LLaVA part is separate)."""

import json

import pytest

from tests.rehearsal.inputs import SIZE, build

PRESET = "configs/llama3-8b_clip-vit-l14-336.yaml"


@pytest.fixture(scope="module")
def inputs(world, tmp_path_factory):
    return build(tmp_path_factory.mktemp("rehearsal"), world)


def _sets(inputs, out) -> list[str]:
    paths = [f"run.out_dir={out}", f"paths.data_root={inputs['data_root']}", f"embedder.model={inputs['llama']}",
             f"vision.model={inputs['clip']}"]
    # sizes only: the toy models' image size, steps and batches; fp32 and no compile on CPU
    sizes = [f"data.image_size={SIZE}", "embedder.max_length=64", "embedder.batch_size=16", "embedder.dtype=float32",
             "embedder.compile=false", "stage1.cc.steps=2", "stage1.cc.batch_size=4", "stage1.cc.warmup_steps=0",
             "stage2.model.embed_dim=16", "stage2.model.adapter_depth=1", "stage2.eval_batch_size=16",
             *(f"stage2.{r}.{k}" for r in ("clip_finetune", "llm2clip") for k in ("steps=2", "batch_size=8"))]
    return [x for s in paths + sizes for x in ("--set", s)]


@pytest.mark.slow
def test_paper_preset_runs_and_exports_on_real_formats(inputs, tmp_path, monkeypatch):
    from transformers import CLIPVisionModel

    from llm2clip.cli import main
    from llm2clip.model import LLM2CLIP

    monkeypatch.setenv("DS_BUILD_OPS", "0")
    out = tmp_path / "run"
    sets = _sets(inputs, out)
    assert main(["run", "--config", PRESET, "--no-progress", *sets]) == 0
    cra = json.loads((out / "stage1/cra.json").read_text())  # the COCO-style file, its `captions` list
    assert cra["num_images"] == 6 and {"raw", "cc"} <= set(cra) and 0 <= cra["cc"]["en"] <= 100
    assert json.loads((out / "cache/index.json").read_text())["num_keys"] == 54  # 48 shard samples + 6 eval
    results = json.loads((out / "results.json").read_text())
    assert set(results["retrieval"]) == {"clip_pretrained", "clip_finetuned", "llm2clip"}
    assert results["eval_images"] == 6 and results["cra"]["cc"] == cra["cc"]
    for per_set in results["retrieval"].values():
        assert all(0 <= v <= 100 for metrics in per_set.values() for v in metrics.values())
    model = LLM2CLIP.from_pretrained(out / "llm2clip")
    assert abs(model.logit_scale.item() - 4.0) < 0.01  # the pretrained CLIP's, two small steps later
    for tower in ("vision_tower", "clip_vision_tower"):
        assert CLIPVisionModel.from_pretrained(out / tower).config.image_size == SIZE
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["stage1"]["cc"]["world_size"] == 1  # ZeRO-2 from the preset, one plain process

    exported = tmp_path / "exported"
    assert main(["export", "--config", PRESET, "--no-progress", *sets, "--out", str(exported)]) == 0
    for folder in ("vision_tower", "llm2clip", "clip_vision_tower"):
        assert (exported / folder / "config.json").is_file()
