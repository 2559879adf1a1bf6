"""Kill and resume: each run is SIGKILLed at a seeded point (after its n-th checkpoint or cache part
appears, plus a seeded delay, so some kills land mid-write), then run again to completion. The final
weights must equal an uninterrupted run's bit for bit; the cache must hold every key exactly once."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.helpers import save_tiny_llm

pytestmark = pytest.mark.slow
KILL_SEEDS = (0, 1)  # the fixed seed list; each picks which checkpoint to wait for and a delay
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _run_and_kill(cmd: list[str], watch: Path, pattern: str, seed: int) -> int:
    """Start `cmd`, wait until `pattern` has n matches under `watch`, sleep, SIGKILL. Returns n."""
    rng = random.Random(seed)
    n, delay = rng.randint(1, 3), rng.choice((0.0, 0.01, 0.05))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while len(list(watch.glob(pattern))) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (n={n}): {proc.stderr.read()[-2000:]}"
    return n


def _same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


STAGE2_WORKER = [sys.executable, "-m", "tests.reliability.stage2_worker"]


@pytest.fixture(scope="module")
def stage2_straight(tmp_path_factory) -> Path:
    """The uninterrupted run every killed one is compared with (one run, shared by the kill seeds)."""
    out = tmp_path_factory.mktemp("stage2") / "straight"
    _run([*STAGE2_WORKER, str(out), "12"])
    return out


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_stage2_training_killed_and_resumed_is_bitwise_identical(tmp_path, seed, stage2_straight):
    worker = STAGE2_WORKER
    _run_and_kill([*worker, str(tmp_path / "killed"), "12"], tmp_path / "killed" / "checkpoints", "step-*", seed)
    _run([*worker, str(tmp_path / "killed"), "12"])
    _same_tensors(stage2_straight / "final.safetensors", tmp_path / "killed" / "final.safetensors")
    resumed = [json.loads(line)["step"] for line in (tmp_path / "killed" / "loss.jsonl").read_text().splitlines()]
    assert resumed == sorted(set(resumed)) and resumed[-1] == 11  # each step logged once, none after the end


@pytest.fixture(scope="module")
def lm(world, tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp("lm") / "lm", world / "tokenizer", hidden_size=32, num_layers=1,
                         causal_lm=True)


def _cc_cmd(world, lm, out: Path) -> list[str]:
    sets = [f"embedder.model={lm}", "stage1.pretrain.enabled=false", f"stage1.cc.data={world}/train.jsonl",
            f"stage1.cc.text_pairs={world}/parallel.jsonl", "stage1.cc.steps=10", "stage1.cc.batch_size=4",
            "stage1.cc.checkpoint_every=2", "stage1.cc.lora.dropout=0.1", "embedder.max_length=64",
            f"run.out_dir={out}"]
    return [sys.executable, "-m", "llm2clip", "stage1", "cc", "--config", "configs/tiny.yaml", "--no-progress",
            *[x for s in sets for x in ("--set", s)]]


def test_stage1_cc_killed_and_resumed_is_bitwise_identical(world, lm, tmp_path):
    """LoRA dropout on: the resumed run must restore the torch RNG as well as the pair sampler."""
    _run(_cc_cmd(world, lm, tmp_path / "straight"))
    n = _run_and_kill(_cc_cmd(world, lm, tmp_path / "killed"), tmp_path / "killed/stage1/cc-checkpoints", "step-*", 3)
    assert not (tmp_path / "killed/stage1/cc").exists() and n >= 1
    _run(_cc_cmd(world, lm, tmp_path / "killed"))
    _same_tensors(tmp_path / "straight/stage1/cc/adapter_model.safetensors",
                  tmp_path / "killed/stage1/cc/adapter_model.safetensors")
    assert not (tmp_path / "killed/stage1/cc-checkpoints").exists()  # removed once the adapter is written


def test_cache_build_killed_and_resumed_holds_every_key_once(world, lm, tmp_path):
    from llm2clip.cache import EmbeddingCache

    sets = [f"embedder.model={lm}", "stage1.pretrain.enabled=false", f"run.out_dir={tmp_path}",
            f"cache.data=[{world}/train.jsonl]", "cache.part_size=4", "embedder.max_length=64"]
    cmd = [sys.executable, "-m", "llm2clip", "cache", "build", "--config", "configs/tiny.yaml", "--no-progress",
           *[x for s in sets for x in ("--set", s)]]
    _run_and_kill(cmd, tmp_path / "cache", "parts/*.safetensors", 5)
    _run(cmd)
    cache = EmbeddingCache.open(tmp_path / "cache")
    expected = [json.loads(line)["key"] for line in (world / "train.jsonl").read_text().splitlines()]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    keys = list(cache.iter_keys())
    assert sorted(keys) == sorted(expected)  # 0 missing
    assert index["num_keys"] == len(expected) == len(set(keys))  # 0 duplicated


def _llava_cmd(parts, out: Path) -> list[str]:
    args = ["--model_name_or_path", str(parts["lm"]), "--vision_tower", str(parts["tower"]),
            "--image_folder", str(parts["data"]), "--output_dir", str(out), "--use_cpu", "True",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--disable_tqdm", "True", "--seed", "0",
            "--model_max_length", "160", "--mm_projector_type", "mlp2x_gelu", "--version", "v1",
            "--learning_rate", "3e-3", "--max_samples", "16", "--max_steps", "8", "--save_strategy", "steps",
            "--save_steps", "2", "--save_total_limit", "2", "--data_path",
            str(parts["data"] / "llava/train_instruct.json")]
    return [sys.executable, "-m", "llava_integration", "finetune", *args]


def test_llava_finetuning_killed_and_resumed_is_bitwise_identical(llava_parts, tmp_path):
    """HF Trainer checkpoints (its pickled optimizer and RNG files are read with weights_only=True);
    a checkpoint cut short (no trainer_state.json, written last) is passed over."""
    _run(_llava_cmd(llava_parts, tmp_path / "straight"))
    _run_and_kill(_llava_cmd(llava_parts, tmp_path / "killed"), tmp_path / "killed", "checkpoint-*/trainer_state.json",
                  4)
    (tmp_path / "killed" / "checkpoint-99").mkdir()  # what a kill mid-save leaves: no trainer_state.json
    _run(_llava_cmd(llava_parts, tmp_path / "killed"))
    files = sorted(p.name for p in (tmp_path / "straight").glob("*.safetensors"))
    assert files
    for name in files:
        _same_tensors(tmp_path / "straight" / name, tmp_path / "killed" / name)
