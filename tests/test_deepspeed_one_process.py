"""A DeepSpeed config in one plain process (no torchrun, no deepspeed launcher) trains, as docs/SCALING.md
says, instead of failing on mpi4py (issue #18, point 5)."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.test_stage2 import _train


@pytest.mark.slow
def test_zero2_in_one_plain_process_trains_like_one_plain_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(DS_BUILD_OPS="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "tests/stage2_ds_worker.py", str(tmp_path / "ds"), "configs/deepspeed/zero2.json"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ds_state = load_file(str(tmp_path / "ds/checkpoints/step-0000003/model.safetensors"))
    single = _train(tmp_path / "one", steps=3, resume=False, precision="fp32").state_dict()
    for name, value in single.items():
        torch.testing.assert_close(ds_state[name], value, atol=2e-5, rtol=1e-4, msg=name)
