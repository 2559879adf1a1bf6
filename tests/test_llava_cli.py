"""The LLaVA command line: preset layering, results file, errors, documented flags."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llava_integration import preset
from llava_integration.arguments import ModelArguments, TrainingArguments, parse
from llava_integration.cli import main
from llava_integration.data import DataArguments
from llm2clip.errors import ConfigError
from tests.conftest import ROOT


def test_every_flag_is_documented():
    doc = (ROOT / "docs/LLAVA.md").read_text()
    own = {f.name for f in dataclasses.fields(TrainingArguments)} - {
        f.name for f in dataclasses.fields(TrainingArguments.__mro__[1])}
    names = [f.name for f in dataclasses.fields(ModelArguments)] + [f.name for f in dataclasses.fields(DataArguments)]
    missing = [n for n in names + sorted(own) + ["output_dir", "optim", "report_to"] if f"`--{n}`" not in doc]
    assert not missing, f"document these flags in docs/LLAVA.md: {missing}"


def test_preset_layers_recipe_tiny_and_user_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM2CLIP_RUN_DIR", str(tmp_path))
    argv = preset.training_argv("pretrain", ["--vision-tower", "clip", "--learning_rate", "5e-3"])
    model_args, data_args, training_args = parse(argv)
    assert model_args.vision_tower == "clip" and model_args.version == "plain" and model_args.tune_mm_mlp_adapter
    assert training_args.learning_rate == 5e-3  # the user's flag wins over the recipe's 1e-3
    assert data_args.data_path == str(tmp_path / "data/llava/train_pretrain.json")
    assert training_args.output_dir == str(tmp_path / "llava/clip/llava-clip-pretrain")  # stock LLaVA's routing
    with pytest.raises(ConfigError, match=r"llava_pretrain\.sh --vision-tower llm2clip"):
        preset.training_argv("finetune", [])  # no pretrained projector yet
    (tmp_path / "llava/llm2clip/llava-llm2clip-pretrain").mkdir(parents=True)
    (tmp_path / "llava/llm2clip/llava-llm2clip-pretrain/mm_projector.bin").write_bytes(b"")
    model_args, _, training_args = parse(preset.training_argv("finetune", []))
    assert model_args.pretrain_mm_mlp_adapter.endswith("llava/llm2clip/llava-llm2clip-pretrain/mm_projector.bin")
    assert model_args.version == "v1" and training_args.max_steps > 0
    # batches of similar lengths: Q&A conversations and descriptions are separate samples (issue #20)
    assert training_args.group_by_length and training_args.train_sampling_strategy == "group_by_length"
    _, _, lora_args = parse(preset.training_argv("finetune", ["--lora_enable", "True"]))
    assert lora_args.output_dir.endswith("llava/llm2clip/llava-llm2clip-finetune-lora")
    # with a model and data of your own, the tiny preset stays out of the way
    own = preset.training_argv("finetune", ["--model_name_or_path", "/m", "--data_path", "/d.json"])
    assert str(tmp_path) not in " ".join(own) and "--learning_rate" in own


def test_results_file_merges_towers(tmp_path):
    scores = {"overall": 50.0, "color": 40.0, "count": 60.0, "position": 10.0, "existence": 90.0, "n": {}}
    preset.record_vqa(tmp_path / "results.json", "llm2clip", scores)
    preset.record_vqa(tmp_path / "results.json", "clip", {**scores, "overall": 45.0})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == {"vqa": {"llm2clip": {k: scores[k] for k in ("overall", "color", "count", "position",
                                                                 "existence")},
                            "clip": {**{k: scores[k] for k in ("color", "count", "position", "existence")},
                                     "overall": 45.0}}}


def test_cli_reports_errors_without_traceback(capsys):
    assert main(["finetune", "--model_name_or_path", "/m", "--data_path", "/d", "--no_such_flag", "1"]) == 1
    assert "unknown arguments ['--no_such_flag', '1']" in capsys.readouterr().err
    assert main(["bogus"]) == 2


def test_llava_integration_uses_only_public_llm2clip_names():
    import ast

    for path in (ROOT / "llava_integration").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm2clip"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and "._" not in node.module, f"{path.name} imports {node.module}: {private}"


@pytest.mark.parametrize("name", ["llava-1.5-7b_pretrain", "llava-1.5-7b_finetune"])
def test_gpu_presets_parse_and_validate_with_command_line_flags_winning(name):
    from llava_integration.arguments import expand_config, validate

    path = ROOT / f"configs/llava/{name}.yaml"
    cpu = ["--use_cpu", "True"]  # bf16 on a machine without a GPU needs it (training_argv adds it there)
    model_args, data_args, training_args = parse(["--config", str(path), "--learning_rate", "3e-4", *cpu])
    validate(model_args, data_args, training_args)
    assert model_args.model_name_or_path == "lmsys/vicuna-7b-v1.5" and training_args.bf16
    assert model_args.vision_tower.endswith("/vision_tower") and model_args.attn_implementation == "sdpa"
    assert training_args.learning_rate == 3e-4  # the command line wins over the preset
    assert training_args.deepspeed.startswith("configs/deepspeed/") and (ROOT / training_args.deepspeed).is_file()
    kind = "finetune" if "finetune" in name else "pretrain"
    argv = preset.training_argv(kind, expand_config(["--config", str(path)]))
    assert str(preset.run_dir()) not in " ".join(argv)  # a preset names its model and data: not the tiny one


def test_a_bad_preset_file_is_a_one_line_config_error(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n")
    (tmp_path / "typo.yaml").write_text("lerning_rate: 1e-3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse(["--config", str(tmp_path / "list.yaml")])
    with pytest.raises(ConfigError, match=r"cannot read it as YAML \(FileNotFoundError\)"):
        parse(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match=r"unknown arguments \[.--lerning_rate."):
        parse(["--config", str(tmp_path / "typo.yaml")])


def test_deepspeed_launcher_local_rank_is_accepted_by_both_clis(monkeypatch):
    """`deepspeed --module X` runs `python -m X --local_rank=N <command> ...`."""
    from llava_integration.cli import command_first
    from llm2clip.cli import build_parser

    assert command_first(["--local_rank=1", "finetune", "--bf16", "True"]) == ["finetune", "--local_rank=1", "--bf16",
                                                                                "True"]
    assert command_first(["finetune", "--x"]) == ["finetune", "--x"]
    flags = command_first(["--local_rank=0", "finetune"])[1:]
    _, _, training_args = parse(["--model_name_or_path", "/m", "--data_path", "/d.json", "--vision_tower", "clip",
                                 "--output_dir", "/o", "--use_cpu", "True", *flags])
    assert training_args.local_rank == 0
    args = build_parser().parse_args(["--local_rank=1", "config", "keys"])
    assert args.local_rank == 1 and args.group == "config"


def test_the_cpu_preset_uses_bf16_only_where_this_cpu_runs_it_natively(monkeypatch):
    from llm2clip import precision

    for fast in (True, False):
        monkeypatch.setattr(precision, "cpu_bf16_is_fast", lambda fast=fast: fast)
        argv = preset.training_argv("pretrain", ["--model_name_or_path", "/m", "--data_path", "/d.json"])
        if "--use_cpu" in argv:  # no GPU: the CPU preset decides, after the recipe's --bf16 True
            assert argv[argv.index("--use_cpu") + 2:argv.index("--use_cpu") + 4] == ["--bf16", str(fast)]
            assert parse([*argv, "--vision_tower", "clip", "--output_dir", "/o"])[2].bf16 is fast
