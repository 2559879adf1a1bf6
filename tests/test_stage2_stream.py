"""Stage 2 on streamed shards: the training loop's kill and resume is bitwise identical mid-epoch, two
gloo processes see every sample exactly once per epoch, and the main job runs streamed end to end."""

import io
import json
import tarfile
from functools import partial

import pytest
import torch
from PIL import Image

from llm2clip.data.readers import DataConfig
from llm2clip.data.stream import StreamConfig, StreamDataset
from llm2clip.stage2.batches import StreamBatches
from llm2clip.stage2.data import CaptionSampler
from llm2clip.stage2.train import TrainConfig, train_contrastive
from tests.test_stage2 import LLM_DIM, _model

N, SHARDS = 48, 8  # 6 samples a shard: 2 ranks x 2 workers take 2 shards (12 samples) each per epoch


def write_shards(folder, n: int = N, shards: int = SHARDS) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    per = n // shards
    for s in range(shards):
        with tarfile.open(folder / f"{s:06d}.tar", "w") as tar:
            for i in range(s * per, (s + 1) * per):
                buffer = io.BytesIO()
                Image.new("RGB", (32, 32), (i * 5 % 256, 40, 200 - i)).save(buffer, format="PNG")
                for name, data in ((f"k{i}.png", buffer.getvalue()), (f"k{i}.txt", f"short {i}".encode()),
                                   (f"k{i}.json", json.dumps({"long_caption": f"long {i}"}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


class KeyedVectors:
    """A stand-in cache (a fixed vector per key and field) that records the keys each step reads and
    can fail at a given call, as a killed process would."""

    def __init__(self, fail_at_call: int | None = None, log=None):
        self.table = torch.randn(N, 2, LLM_DIM, generator=torch.Generator().manual_seed(2))
        self.calls, self.fail_at_call, self.log = 0, fail_at_call, log

    def __call__(self, keys, captions):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("killed")
        if self.log is not None:
            self.log.append(list(keys))
        return torch.stack([self.table[int(k[1:]), int(c.field == "long_caption")]
                            for k, c in zip(keys, captions, strict=True)])


def streamed(pattern: str, workers: int = 2) -> StreamBatches:
    data_cfg = DataConfig(path=pattern, long_caption_keys=["long_caption"], image_size=32)
    loader = StreamConfig(workers=workers, shuffle_buffer=8)
    return StreamBatches(partial(StreamDataset, data_cfg, shuffle_buffer=loader.shuffle_buffer), loader)


def _train(pattern, out, steps, batch=8, fail_at_call=None, log=None, **kw):
    model = _model()
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=2, out=str(out), precision="fp32", **kw)
    sampler = CaptionSampler("short_caption", ["long_caption"], 0.5, seed=0)
    summary = train_contrastive(model, KeyedVectors(fail_at_call, log), streamed(pattern), sampler, cfg, name="t",
                                progress=False, device=torch.device("cpu"))
    return model, summary


def test_streamed_kill_and_resume_mid_epoch_is_bitwise_identical(tmp_path):
    """7 steps of 8 samples cross the 48-sample epoch; the kill lands after the step-3 checkpoint, so the
    resumed run restarts mid-epoch at an odd step (workers=2: the other worker's batch comes first)."""
    pattern = write_shards(tmp_path / "wds")
    full_log, resumed_log = [], []
    full, _ = _train(pattern, tmp_path / "full", 7, checkpoint_every=3, log=full_log)
    with pytest.raises(KeyboardInterrupt):
        _train(pattern, tmp_path / "killed", 7, checkpoint_every=3, fail_at_call=5)
    resumed, summary = _train(pattern, tmp_path / "killed", 7, checkpoint_every=3, log=resumed_log)
    assert summary["resumed_from"] == 3
    assert resumed_log == full_log[3:]  # the same samples, in the same order, from the saved position on
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def _gloo_worker(rank, world_size, port, pattern, out, result):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    log = []
    # 6 steps x 8 (global) = 48 = one epoch: each rank streams 4 samples a step from its 2 workers' shards
    _train(pattern, out, steps=6, batch=8, checkpoint_every=3, log=log)
    result[rank] = [k for keys in log for k in keys]
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_see_every_sample_once_per_epoch(tmp_path):
    import torch.multiprocessing as mp

    from llm2clip.checkpoint import checkpoint_extra, latest_checkpoint

    pattern = write_shards(tmp_path / "wds")
    result = mp.Manager().dict()
    mp.spawn(_gloo_worker, args=(2, 29561, pattern, str(tmp_path / "run"), result), nprocs=2, join=True)
    seen = result[0] + result[1]
    assert sorted(seen) == sorted(f"k{i}" for i in range(N))  # all 48, none twice
    assert not set(result[0]) & set(result[1])
    ckpt, _ = latest_checkpoint(tmp_path / "run" / "checkpoints")
    data = checkpoint_extra(ckpt)["data"]  # both ranks' stream positions, gathered into rank 0's checkpoint
    assert data["world_size"] == 2 and all(r["step"] == 6 for r in data["ranks"])


def test_resuming_a_stream_with_another_process_count_names_the_fix(tmp_path):
    from llm2clip.errors import ConfigError
    from llm2clip.stage2.train import _rank_position

    saved = {"world_size": 2, "ranks": [{"step": 3}, {"step": 3}]}
    assert _rank_position(saved, 1, 2, "stage2.llm2clip") == {"step": 3}
    with pytest.raises(ConfigError, match="resume with 2 processes"):
        _rank_position(saved, 0, 1, "stage2.llm2clip")


def test_main_job_streamed_end_to_end(world, tmp_path):
    """stage2.streaming=true: training from the world's webdataset shards, evaluation streamed from its
    test shards, the same results layout as in memory."""
    from llm2clip.cli import main
    from tests.helpers import micro_run_overrides

    sets = [*micro_run_overrides(world, tmp_path), "synth.enabled=false", "stage2.streaming=true",
            f"stage2.train_data={world}/wds/train-*.tar", f"stage2.eval_data={world}/wds/test-*.tar",
            "stage2.loader.workers=1", "stage2.loader.shuffle_buffer=16"]
    argv = ["run", "--config", "configs/tiny.yaml", "--no-progress", *[x for s in sets for x in ("--set", s)]]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["retrieval"]) == {"clip_pretrained", "clip_finetuned", "llm2clip"}
    test_images = len((world / "test.jsonl").read_text().splitlines())
    assert results["eval_images"] == test_images
    summary = json.loads((tmp_path / "run_summary.json").read_text())["llm2clip"]
    assert summary["steps"] == 3 and summary["skipped_samples"] == {}
    assert (tmp_path / "plots/top5_long_captions.png").is_file()
