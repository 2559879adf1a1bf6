"""The main job end to end at micro size: `llm2clip run`, reuse, `stage2 eval`, `eval --dataset shapes`,
`ablate parts` and `ablate online` on its folders."""

import json

import pytest
from transformers import CLIPVisionModel

from llm2clip.model import LLM2CLIP


def test_main_job_end_to_end_micro_run(world, tmp_path, monkeypatch):
    """data -> stage 1 -> cache -> CLIP pretrain/fine-tune -> LLM2CLIP -> eval -> export, tiny budgets."""
    from llm2clip.cli import main
    from tests.helpers import micro_run_overrides

    # fp32 on every host: `llm2clip eval` batches texts and images differently from the main job, and
    # under bf16 (a CPU with native bf16) that rounding flipped one near-tie of 12 (R@k 91.67 vs 100)
    monkeypatch.setattr("llm2clip.precision.cpu_bf16_is_fast", lambda: False)

    # fp32 cache: `llm2clip eval`, which embeds live, must then reproduce the main job's figures exactly
    sets = [*micro_run_overrides(world, tmp_path), "cache.dtype=float32"]
    argv = ["run", "--config", "configs/tiny.yaml", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    assert main([*argv, "--set", "synth.enabled=false"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["retrieval"]) == {"clip_pretrained", "clip_finetuned", "llm2clip"}
    for per_set in results["retrieval"].values():
        assert set(per_set) == {"short", "long", "second_language"}
        for metrics in per_set.values():
            assert set(metrics) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
            assert all(0 <= v <= 100 for v in metrics.values())
    assert set(results["cra"]) == {"raw", "cc"} and results["wall_seconds"] > 0
    assert CLIPVisionModel.from_pretrained(tmp_path / "vision_tower").config.model_type == "clip_vision_model"
    assert LLM2CLIP.from_pretrained(tmp_path / "llm2clip").llm_dim == 32
    assert (tmp_path / "plots/training_curves.png").is_file() and (tmp_path / "plots/top5_long_captions.png").is_file()
    assert {"stage1.cc", "stage1.cra"} <= set(json.loads((tmp_path / "run_summary.json").read_text())["seconds"])
    assert main([*argv, "--set", "synth.enabled=false"]) == 0  # everything is reused
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["stage1"] == {} and summary["cache"]["reused"] and "reused" in summary["llm2clip"]
    assert set(summary["seconds"]) == {"cache", "clip_pretrain", "clip_finetune", "llm2clip", "eval"}  # stage 1 reused
    # evaluation into another file leaves the main run's results.json alone and reproduces its figures
    main_results = (tmp_path / "results.json").read_text()
    eval_argv = ["stage2", "eval", *argv[1:], "--set", "synth.enabled=false", "--results", str(tmp_path / "again.json")]
    assert main(eval_argv) == 0
    assert (tmp_path / "results.json").read_text() == main_results
    assert json.loads((tmp_path / "again.json").read_text())["retrieval"] == results["retrieval"]
    _check_benchmark_eval(tmp_path, world, results)
    _check_ablate_parts(argv, tmp_path, world)
    _check_ablate_online(argv, tmp_path)


def _check_benchmark_eval(tmp_path, world, results):
    """`llm2clip eval --dataset shapes` scores the main job's LLM2CLIP and CLIP folders through the same
    code as the main job (one command for both kinds) and gives its figures."""
    from llm2clip.cli import main

    out, models = tmp_path / "bench/results.json", {"llm2clip": tmp_path / "stage2/llm2clip/model",
                                                   "clip_finetuned": tmp_path / "stage2/clip_finetune/model"}
    argv = ["eval", "--dataset", "shapes", "--data-root", str(world), "--output", str(out), "--no-progress",
            "--text-cache", str(tmp_path / "text_vectors"), *[x for f in models.values() for x in ("--model", str(f))]]
    assert main(argv) == 0
    records = json.loads(out.read_text())
    assert len(records) == 6 and out.with_suffix(".md").is_file() and out.with_suffix(".csv").is_file()
    names = {str(f.resolve()): name for name, f in models.items()}
    for r in records:
        expected = results["retrieval"][names[r["pretrained"]]][r["dataset"].removeprefix("shapes/")]
        for k in (1, 5, 10):
            assert 100 * r["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(expected[f"i2t_r{k}"], abs=0.01)
            assert 100 * r["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(expected[f"t2i_r{k}"], abs=0.01)
    assert main(argv) == 0  # the second run reads the LLM's caption vectors from --text-cache
    assert json.loads(out.read_text()) == records


def _check_ablate_online(argv, tmp_path):
    """`llm2clip ablate online`: cached vs live vectors, same recipe; a rerun after the setup changed
    trains from step 0 instead of resuming the earlier setup's final checkpoint."""
    from llm2clip.cli import main

    online = ["ablate", "online", *argv[1:], "--set", "synth.enabled=false"]
    assert main(online) == 0
    path = tmp_path / "ablation/online_vs_offline.json"
    first = json.loads(path.read_text())
    assert set(first["offline"]["retrieval"]) == {"short", "long", "second_language"}
    assert first["offline"]["train"]["resumed_from"] == 0 and first["online"]["train"]["resumed_from"] == 0
    (tmp_path / "ablation/offline/inputs.json").write_text("{}")  # as if stage 1 had changed since
    assert main(online) == 0
    again = json.loads(path.read_text())
    assert again["offline"]["train"]["resumed_from"] == 0
    assert again["offline"]["retrieval"] == first["offline"]["retrieval"]  # same inputs, same seed


def _check_ablate_parts(argv, tmp_path, world):
    """`llm2clip ablate parts` on the finished micro run: stage 2 per variant and seed, on val."""
    from llm2clip.cli import main
    from llm2clip.stage2 import ablate

    variants = "clip_finetuned,llm2clip,raw_llm,no_adapter,long_only"
    parts = ["ablate", "parts", *argv[1:], "--set", "synth.enabled=false", "--variants", variants, "--seeds", "0,1"]
    assert main(parts) == 0
    done = json.loads((tmp_path / "ablation/val/parts.json").read_text())
    assert done["eval_data"] == str(world / "val.jsonl")
    assert set(done["runs"]) == set(variants.split(",")) and all(set(v) == {"0", "1"} for v in done["runs"].values())
    assert all(r["train_seconds"] > 0 for v in done["runs"].values() for r in v.values())
    assert (tmp_path / "ablation/raw_llm/cache/index.json").is_file()  # the raw LLM's own cache, shared
    table = ablate.summarise({v: {int(s): r for s, r in runs.items()} for v, runs in done["runs"].items()})
    for per_set in table.values():
        assert set(per_set) == {"short", "long", "second_language"}
        for row in per_set.values():
            assert row["min"] <= row["mean"] <= row["max"] and len(row["seeds"]) == 2
    # two seeds train two models: the seed reaches stage 2
    assert done["runs"]["llm2clip"]["0"]["retrieval"] != done["runs"]["llm2clip"]["1"]["retrieval"] or \
        (tmp_path / "ablation/val/llm2clip/seed0/model/model.safetensors").read_bytes() != \
        (tmp_path / "ablation/val/llm2clip/seed1/model/model.safetensors").read_bytes()
    # a rerun trains nothing: every (variant, seed) is already in parts.json
    def refuse(*a, **k):
        raise AssertionError("retrained a finished ablation run")
    ablate.run_variant, kept = refuse, ablate.run_variant
    try:
        assert main(parts) == 0
    finally:
        ablate.run_variant = kept
    # a stored run trained from other inputs (here: another stage-1 embedder) is trained again, alone
    path = tmp_path / "ablation/val/parts.json"
    done["runs"]["llm2clip"]["1"]["inputs"]["embedder"]["adapters"] = ["an older adapter"]
    path.write_text(json.dumps(done))
    stamp = tmp_path / "ablation/val/llm2clip/seed1/inputs.json"  # the run folder was that setup's too
    stamp.write_text(json.dumps(done["runs"]["llm2clip"]["1"]["inputs"]))
    calls = []
    def counted(cfg, variant, *a, **k):
        calls.append((variant, cfg.run.seed))
        return kept(cfg, variant, *a, **k)
    ablate.run_variant = counted
    try:
        assert main(parts) == 0
    finally:
        ablate.run_variant = kept
    assert calls == [("llm2clip", 1)]
    # trained again from step 0: the old run's final checkpoint was another setup's, so it was not resumed
    assert json.loads((tmp_path / "ablation/val/llm2clip/seed1/summary.json").read_text())["resumed_from"] == 0
    rerun = json.loads(path.read_text())["runs"]["llm2clip"]["1"]["inputs"]
    assert rerun["embedder"] == done["runs"]["llm2clip"]["0"]["inputs"]["embedder"]  # stamped with today's inputs
