"""A stage-2 training run for the kill-and-resume tests: the tiny LLM2CLIP and stand-in cache of
tests/test_stage2.py, a checkpoint every step; the final weights go to <out>/final.safetensors."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from llm2clip.stage2.data import CaptionSampler
from llm2clip.stage2.train import TrainConfig, train_contrastive
from tests.test_stage2 import Vectors, _images, _model

if __name__ == "__main__":
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    model = _model()
    cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=1, keep_checkpoints=2,
                      out=str(out))
    sampler = CaptionSampler("short_caption", ["long_caption"], 0.5, seed=0)
    train_contrastive(model, Vectors(), _images(), sampler, cfg, name="t", progress=False,
                      device=torch.device("cpu"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "final.safetensors"))
