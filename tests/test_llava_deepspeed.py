"""LLaVA instruction tuning under DeepSpeed ZeRO-3 on two CPU processes (gloo): the pretrained projector
loads, training runs, and the saved LLM and projector are whole tensors gathered from the partitions."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from llava_integration.projector import build_vision_projector, save_projector
from tests.conftest import ROOT


def test_zero3_finetune_with_pretrained_projector(llava_parts, tmp_path):
    from types import SimpleNamespace

    from llava_integration.checkpoint import load_pretrained_model

    torch.manual_seed(0)
    projector = build_vision_projector(SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=32,
                                                       hidden_size=64))
    save_projector(projector, tmp_path / "pretrain")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "zero3"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "tests/llava_ds_worker.py"),
           "--model_name_or_path", str(llava_parts["lm"]), "--vision_tower", str(llava_parts["tower"]),
           "--version", "v1", "--data_path", str(llava_parts["data"] / "llava/train_instruct.json"),
           "--image_folder", str(llava_parts["data"]), "--max_samples", "16", "--model_max_length", "192",
           "--pretrain_mm_mlp_adapter", str(tmp_path / "pretrain/mm_projector.bin"), "--output_dir", str(out),
           "--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"), "--per_device_train_batch_size", "2",
           "--max_steps", "3", "--learning_rate", "1e-3", "--bf16", "True", "--use_cpu", "True",
           "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "True"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0 and "SUMMARY" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
    _, model, _, _ = load_pretrained_model(out, dtype=torch.float32)
    weight = model.mm_projector[0].weight
    assert weight.shape == (64, 32)  # gathered, not a [0]-sized partition
    assert not torch.allclose(weight, projector[0].weight)  # trained from the pretrained start
    assert (weight - projector[0].weight).abs().max() < 0.1
    lm_weights = [p for p in model.language_model.parameters()]
    assert all(p.numel() > 0 for p in lm_weights) and all(torch.isfinite(p).all() for p in lm_weights)
