"""Two CPU processes (gloo) train like one process at the same global batch: stage-1 CC under torchrun.
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


def _cc(world, lm, out, batch_size: int, nproc: int) -> dict:
    sets = [f"embedder.model={lm}", "stage1.pretrain.enabled=false", f"stage1.cc.data={world}/train.jsonl",
            f"stage1.cc.text_pairs={world}/parallel.jsonl", "stage1.cc.steps=4", f"stage1.cc.batch_size={batch_size}",
            "stage1.cc.checkpoint_every=0", "stage1.cc.lora.dropout=0.0", "embedder.autocast=false",
            "stage1.cc.gradient_checkpointing=false", "embedder.max_length=64", f"run.out_dir={out}"]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                 "29547", "-m"] if nproc > 1 else [sys.executable, "-m"])
    cmd = [*launcher, "llm2clip", "stage1", "cc", "--config", "configs/tiny.yaml", "--no-progress",
           *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_stage1_cc_on_two_processes_equals_one_process_at_the_same_global_batch(world, tmp_path):
    lm = save_tiny_llm(tmp_path / "lm", world / "tokenizer", hidden_size=32, num_layers=1, causal_lm=True)
    one = _cc(world, lm, tmp_path / "one", batch_size=4, nproc=1)
    two = _cc(world, lm, tmp_path / "two", batch_size=2, nproc=2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("loss_first", "loss_last"):  # logged losses are the global batch's on both
        assert abs(one[key] - two[key]) < 1e-5, (key, one[key], two[key])
    a = load_file(str(tmp_path / "one/stage1/cc/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two/stage1/cc/adapter_model.safetensors"))
    deviation = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"stage 1, 1 vs 2 processes: max weight deviation {deviation:.2e}, loss deviation "
          f"{max(abs(one[k] - two[k]) for k in ('loss_first', 'loss_last')):.2e}")
    assert a.keys() == b.keys() and deviation < 1e-5, deviation
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # the adapter did train
