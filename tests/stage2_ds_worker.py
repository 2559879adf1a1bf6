"""Run by tests/test_stage2.py under torch.distributed.run: stage-2 training with DeepSpeed on CPU.

    python -m torch.distributed.run --nproc_per_node 2 tests/stage2_ds_worker.py OUT_DIR ZERO_JSON
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llm2clip.distributed import shutdown
from llm2clip.stage2.data import CaptionSampler
from llm2clip.stage2.train import TrainConfig, train_contrastive
from tests.test_stage2 import Vectors, _images, _model


def main(out: str, zero_config: str) -> None:
    torch.set_num_threads(1)
    model = _model()
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, warmup_steps=2, checkpoint_every=3, out=out,  # as _train
                      precision="fp32", deepspeed=zero_config, adam_eps=1e-6)
    sampler = CaptionSampler("short_caption", ["long_caption"], 0.5, seed=0)
    summary = train_contrastive(model, Vectors(), _images(), sampler, cfg, name="ds", progress=False,
                                device=torch.device("cpu"))
    print(json.dumps(summary))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
