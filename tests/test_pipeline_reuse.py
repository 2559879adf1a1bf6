"""`llm2clip run` reuses a step only while every input it reads is unchanged (issue #18, points 1 and 3)."""

import json
import os

import pytest

from llm2clip.config import load_config
from llm2clip.pipeline import _stage1, _step_inputs
from llm2clip.stamps import Ledger


def _fake_stage1(monkeypatch, calls):
    from llm2clip.stage1 import cli

    def cc(cfg, progress):
        calls.append("cc")
        os.makedirs(cfg.stage1.cc.out, exist_ok=True)
        with open(f"{cfg.stage1.cc.out}/embedder_config.json", "w") as f:
            f.write("{}")

    def cra(cfg, progress):
        calls.append("cra")
        with open(cfg.stage1.cra_out, "w") as f:
            json.dump({"data": cfg.stage1.cra_data}, f)

    monkeypatch.setattr(cli, "run_cc", cc)
    monkeypatch.setattr(cli, "run_eval_cra", cra)


def _run_stage1(tmp_path, *overrides):
    cfg = load_config("configs/tiny.yaml", [f"run.out_dir={tmp_path}", "stage1.pretrain.enabled=false",
                                            "embedder.model=some/hub-id", *overrides])
    return _stage1(cfg, Ledger(tmp_path), _step_inputs(cfg), False, False)


def _stage1_world(tmp_path, monkeypatch, files: dict[str, str]) -> list[str]:
    """Faked stage-1 steps recording their calls, the given input files, and the stage1 folder."""
    calls = []
    _fake_stage1(monkeypatch, calls)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    os.makedirs(tmp_path / "stage1")
    return calls


def test_a_changed_or_moved_cra_file_reruns_cra_and_nothing_else(tmp_path, monkeypatch):
    calls = _stage1_world(tmp_path, monkeypatch, {"a.jsonl": "one\n", "b.jsonl": "two\n"})
    _run_stage1(tmp_path, f"stage1.cra_data={tmp_path}/a.jsonl")
    assert calls == ["cc", "cra"]
    assert _run_stage1(tmp_path, f"stage1.cra_data={tmp_path}/a.jsonl") == {}  # everything current
    _run_stage1(tmp_path, f"stage1.cra_data={tmp_path}/b.jsonl")  # another path
    assert calls == ["cc", "cra", "cra"]
    assert json.loads((tmp_path / "stage1/cra.json").read_text())["data"].endswith("b.jsonl")
    (tmp_path / "b.jsonl").write_text("two, edited\n")  # same path, new content
    _run_stage1(tmp_path, f"stage1.cra_data={tmp_path}/b.jsonl")
    assert calls == ["cc", "cra", "cra", "cra"]
    _run_stage1(tmp_path, f"stage1.cra_data={tmp_path}/b.jsonl", "stage1.cra_caption_keys=[captions]")
    assert calls[-1] == "cra" and len(calls) == 5  # a changed key too


def test_changed_cc_data_reruns_cc_then_cra(tmp_path, monkeypatch):
    calls = _stage1_world(tmp_path, monkeypatch, {"cra.jsonl": "x\n", "train.jsonl": "x\n"})
    sets = [f"stage1.cra_data={tmp_path}/cra.jsonl", f"stage1.cc.data={tmp_path}/train.jsonl"]
    _run_stage1(tmp_path, *sets)
    os.utime(tmp_path / "train.jsonl", ns=(1, 1))
    _run_stage1(tmp_path, *sets)
    assert calls == ["cc", "cra", "cc", "cra"]  # CRA reads the new CC embedder


def test_cra_data_null_skips_cra_and_says_so(tmp_path, monkeypatch):
    calls = []
    _fake_stage1(monkeypatch, calls)
    out = _run_stage1(tmp_path, "stage1.cra_data=null")
    assert calls == ["cc"] and out["cra"] == "skipped (stage1.cra_data: null)"


def test_an_interrupted_stage2_step_resumes_and_a_changed_one_starts_over(tmp_path, monkeypatch):
    from llm2clip.pipeline import _train_step

    cfg = load_config("configs/tiny.yaml", [f"run.out_dir={tmp_path}", "embedder.model=some/hub-id",
                                            f"stage2.train_data={tmp_path}/train.jsonl"])
    (tmp_path / "train.jsonl").write_text("x\n")
    checkpoint = tmp_path / "stage2/clip_finetune/checkpoints/step-0000002"
    ledger, inputs = Ledger(tmp_path), {"clip_finetune": lambda: {"data": (tmp_path / "train.jsonl").read_text()}}

    def killed():
        checkpoint.mkdir(parents=True)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train_step("clip_finetune", cfg, ledger, inputs, False, killed)
    seen = []
    _train_step("clip_finetune", cfg, Ledger(tmp_path), inputs, False, lambda: seen.append(checkpoint.is_dir()))
    assert seen == [True]  # same inputs: the checkpoint is there to resume from
    (tmp_path / "train.jsonl").write_text("y\n")
    _train_step("clip_finetune", cfg, Ledger(tmp_path), inputs, False, lambda: seen.append(checkpoint.is_dir()))
    assert seen == [True, False]  # other inputs: started over
