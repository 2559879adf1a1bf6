"""Two CPU processes (gloo) train like one process at the same global batch: stage-1 CC under torchrun
and under `accelerate launch`.
(Stage 2's equivalence, DDP and DeepSpeed, is in tests/test_stage2.py; the two-rank cache build in
tests/test_cache.py.)"""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.helpers import save_tiny_llm

pytestmark = pytest.mark.slow


# The same entry point, unchanged, under each launcher (2 CPU processes, gloo); each list ends with the
# flag that precedes the module name. accelerate's --multi_gpu path is torchrun underneath (its --cpu
# multi-process mode needs mpirun); the deepspeed launcher adds --local_rank=N, which the CLI accepts.
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
                 "-m"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29548", "-m"],
    "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29549",
                  "--module"],
}


def _cc(world, lm, out, batch_size: int, launcher: str | None = None) -> dict:
    sets = [f"embedder.model={lm}", "stage1.pretrain.enabled=false", f"stage1.cc.data={world}/train.jsonl",
            f"stage1.cc.text_pairs={world}/parallel.jsonl", "stage1.cc.steps=4", f"stage1.cc.batch_size={batch_size}",
            "stage1.cc.checkpoint_every=0", "stage1.cc.lora.dropout=0.0", "embedder.autocast=false",
            "stage1.cc.gradient_checkpointing=false", "embedder.max_length=64", f"run.out_dir={out}"]
    cmd = [*(LAUNCHERS[launcher] if launcher else [sys.executable, "-m"]), "llm2clip", "stage1", "cc",
           "--config", "configs/tiny.yaml", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_BUILD_OPS": "0"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _summary(done.stdout)


def _summary(stdout: str) -> dict:
    """The run's JSON summary among whatever the launcher prints before and after it."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i, c in enumerate(stdout) if c == "{" and (i == 0 or stdout[i - 1] == "\n")]):
        try:
            found = decoder.raw_decode(stdout, start)[0]
        except ValueError:
            continue
        if isinstance(found, dict) and "world_size" in found:
            return found
    raise AssertionError(f"no run summary in the output: {stdout[-2000:]}")


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """The reference: one process at global batch 4 (shared by every launcher's test)."""
    tmp = tmp_path_factory.mktemp("one_process")
    lm = save_tiny_llm(tmp / "lm", world / "tokenizer", hidden_size=32, num_layers=1, causal_lm=True)
    return lm, _cc(world, lm, tmp / "one", batch_size=4), tmp / "one/stage1/cc/adapter_model.safetensors"


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_stage1_cc_on_two_processes_equals_one_process_at_the_same_global_batch(world, tmp_path, launcher,
                                                                                 one_process):
    lm, one, one_adapter = one_process
    two = _cc(world, lm, tmp_path / "two", batch_size=2, launcher=launcher)
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("loss_first", "loss_last"):  # logged losses are the global batch's on both
        assert abs(one[key] - two[key]) < 1e-5, (key, one[key], two[key])
    a = load_file(str(one_adapter))
    b = load_file(str(tmp_path / "two/stage1/cc/adapter_model.safetensors"))
    deviation = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"stage 1, 1 vs 2 processes ({launcher}): max weight deviation {deviation:.2e}, loss deviation "
          f"{max(abs(one[k] - two[k]) for k in ('loss_first', 'loss_last')):.2e}")
    assert a.keys() == b.keys() and deviation < 1e-5, deviation
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # the adapter did train
