"""The shipped paper preset, end to end on real-format inputs at toy size, with only path and size
overrides: `llm2clip run`, then `llm2clip export`, then the exported tower in LLaVA by path
(pretrain, LoRA fine-tuning, eval, HF export): issue #18's rehearsal."""

import json
import os

import pytest
import torch
from PIL import Image

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


@pytest.fixture(scope="module")
def preset_run(inputs, tmp_path_factory):
    """`llm2clip run` of the shipped preset, once for the module: (inputs, run dir, the --set flags)."""
    from llm2clip.cli import main

    out = tmp_path_factory.mktemp("preset") / "run"
    sets = _sets(inputs, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS_BUILD_OPS", "0")
        assert main(["run", "--config", PRESET, "--no-progress", "--count-flops", *sets]) == 0
    return inputs, out, sets


@pytest.mark.slow
def test_paper_preset_runs_and_exports_on_real_formats(preset_run, tmp_path):
    from transformers import CLIPVisionModel

    from llm2clip.cli import main
    from llm2clip.model import LLM2CLIP

    _, out, sets = preset_run
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
    # --count-flops: every step that ran counted its matmuls, DeepSpeed's CC step and the cache included
    assert set(summary["flops"]) == set(summary["seconds"])
    assert summary["clip_pretrain"] is None and summary["flops"]["clip_pretrain"] == 0  # off in the preset
    ran = set(summary["seconds"]) - {"clip_pretrain"}
    assert all(summary["flops"][step] > 0 for step in ran), summary["flops"]

    exported = tmp_path / "exported"
    assert main(["export", "--config", PRESET, "--no-progress", *sets, "--out", str(exported)]) == 0
    for folder in ("vision_tower", "llm2clip", "clip_vision_tower"):
        assert (exported / folder / "config.json").is_file()


def _llava_inputs(root, world) -> dict:
    """LCS-558K (`<image>` after the instruction) and mix665k (multi-turn; one text-only) JSONs."""
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()][:8]
    images = root / "images"
    pretrain, instruct = [], []
    for i, row in enumerate(rows):
        name = f"{i:05d}/{row['key']}.jpg"
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.open(world / row["image"]).convert("RGB").save(images / name, quality=90)
        pretrain.append({"id": row["key"], "image": name, "conversations": [
            {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
            {"from": "gpt", "value": row["short_caption"]}]})
        instruct.append({"id": row["key"], "image": name, "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": row["short_caption"]},
            {"from": "human", "value": "Describe it in detail."}, {"from": "gpt", "value": row["long_caption"][:200]}]})
    instruct.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hello."},
                                                          {"from": "gpt", "value": "Hello."}]})
    (root / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(instruct))
    return {"pretrain": root / "blip_laion_cc_sbu_558k.json", "instruct": root / "llava_v1_5_mix665k.json",
            "images": images}


@pytest.mark.slow
def test_llava_pretrain_finetune_eval_export_by_path(preset_run, world, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from llava_integration.cli import main

    inputs, run, _ = preset_run
    data = _llava_inputs(tmp_path / "llava_data", world)
    common = ["--model_name_or_path", str(inputs["llama"]), "--vision_tower", "llm2clip",
              "--llm2clip_run_dir", str(run), "--image_folder", str(data["images"]), "--bf16", "False",
              "--per_device_train_batch_size", "4", "--max_steps", "2", "--model_max_length", "256",
              "--gradient_checkpointing", "False", "--dataloader_num_workers", "0"]
    pretrain = tmp_path / "llava-llm2clip-pretrain"
    assert main(["pretrain", *common, "--data_path", str(data["pretrain"]), "--output_dir", str(pretrain)]) == 0
    config = json.loads((pretrain / "config.json").read_text())
    tower = run / "vision_tower"  # the rehearsal's own tower, not runs/tiny's (issue #18 point 2)
    assert config["mm_vision_tower"] == os.path.abspath(tower)
    assert config["mm_hidden_size"] == json.loads((tower / "config.json").read_text())["hidden_size"]
    assert (pretrain / "mm_projector.bin").is_file()

    finetune = tmp_path / "llava-llm2clip-finetune-lora"
    assert main(["finetune", *common, "--data_path", str(data["instruct"]), "--output_dir", str(finetune),
                 "--pretrain_mm_mlp_adapter", str(pretrain / "mm_projector.bin"), "--lora_enable", "True",
                 "--lora_r", "4", "--lora_alpha", "8"]) == 0
    assert {"adapter_config.json", "non_lora_trainables.bin", "config.json"} <= {p.name for p in finetune.iterdir()}
    summary = json.loads((finetune / "summary.json").read_text())
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["train_loss"]))

    # a real LLaVA JSON holds no question this evaluator scores: a one-line error, not 0.0 with n=0
    assert main(["eval", "--model_path", str(finetune), "--data_path", str(data["instruct"]),
                 "--image_folder", str(data["images"])]) == 1
    assert "holds no question of a type this evaluator scores" in capsys.readouterr().err
    # the shapes world's typed questions, by path
    assert main(["eval", "--model_path", str(finetune), "--data_path", str(world / "llava/test_instruct.json"),
                 "--image_folder", str(world), "--max_images", "3"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(scores["n"].values()) > 0 and 0 <= scores["overall"] <= 100

    export = tmp_path / "hf_export"
    assert main(["export", "--model_path", str(finetune), "--out", str(export)]) == 0
    hf, info = LlavaForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.config.vision_config.hidden_size == config["mm_hidden_size"]
