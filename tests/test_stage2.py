"""Stage-2 training mechanics: accumulation, kill-and-resume, damaged checkpoints, multi-process, export."""

import contextlib
import json
import os

import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from llm2clip.checkpoint import latest_checkpoint, save_checkpoint
from llm2clip.data.images import make_image_processor
from llm2clip.errors import ConfigError
from llm2clip.export import export_model, export_vision_tower
from llm2clip.losses import ClipLoss
from llm2clip.model import LLM2CLIP, ModelConfig
from llm2clip.stage2.data import CaptionSampler, ImageSet
from llm2clip.stage2.train import TrainConfig, _step_loss, train_contrastive

LLM_DIM, N = 24, 16


def _model(seed=0) -> LLM2CLIP:
    torch.manual_seed(seed)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8))
    return LLM2CLIP(vision, LLM_DIM, ModelConfig(embed_dim=16, adapter_depth=2))


def _images() -> ImageSet:
    g = torch.Generator().manual_seed(1)
    captions = [{"short_caption": f"s{i}", "long_caption": f"l{i}"} for i in range(N)]
    return ImageSet([f"k{i}" for i in range(N)], torch.randn(N, 3, 32, 32, generator=g), captions, stats=None)


class Vectors:
    """A stand-in cache: a fixed random vector per (key, field)."""

    def __init__(self, fail_at_call: int | None = None):
        self.table = torch.randn(N, 2, LLM_DIM, generator=torch.Generator().manual_seed(2))
        self.calls, self.fail_at_call = 0, fail_at_call

    def __call__(self, keys, captions):
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("killed")
        pairs = zip(keys, captions, strict=True)
        return torch.stack([self.table[int(k[1:]), int(c.field == "long_caption")] for k, c in pairs])


def _train(out, steps=6, fail_at_call=None, resume=True, lr=1e-3, **kw):
    model = _model()
    # adam_eps 1e-6, not the official 1e-8: CLIP's k_proj.bias has an exactly zero gradient (softmax ignores
    # a shift), and eps 1e-8 turns its rounding noise into lr-sized steps whose sign depends on the order of
    # the reductions, so runs on 1 and 2 processes would part by ~1e-4 there instead of agreeing to 1e-5
    kw = {"adam_eps": 1e-6, **kw}
    cfg = TrainConfig(steps=steps, batch_size=8, lr=lr, warmup_steps=2, checkpoint_every=3, out=str(out), **kw)
    sampler = CaptionSampler("short_caption", ["long_caption"], 0.5, seed=0)
    train_contrastive(model, Vectors(fail_at_call), _images(), sampler, cfg, name="t", resume=resume,
                      progress=False, device=torch.device("cpu"))
    return model


def test_accumulated_gradient_equals_the_big_batch_gradient():
    images, vectors = _images(), Vectors()
    pixels, text = images.pixels[:8], vectors.table[:8, 0]
    grads = []
    for accum in (1, 2, 4):
        model = _model()
        _step_loss(model, ClipLoss(), pixels, text, accum, no_sync=contextlib.nullcontext)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_kill_and_resume_gives_bitwise_identical_weights(tmp_path):
    reference = _train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", fail_at_call=5)  # dies during step 5, after the step-3 checkpoint
    assert [p.name for p in (tmp_path / "b/checkpoints").glob("step-*")] == ["step-0000003"]
    resumed = _train(tmp_path / "b")
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_checkpoint_from_other_settings_is_refused_not_resumed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, fail_at_call=5)  # dies after the step-3 checkpoint
    with pytest.raises(ConfigError, match=r"other stage2.t settings \(lr\).*delete"):
        _train(tmp_path, lr=2e-3)
    with pytest.raises(ConfigError, match=r"\(long_caption_ratio\)"):
        _train(tmp_path, long_caption_ratio=0.2)
    with pytest.raises(ConfigError, match=r"\(steps\)"):  # the lr schedule is laid out over the steps
        _train(tmp_path, steps=9)
    resumed = _train(tmp_path)  # the same settings resume, and give the uninterrupted run's weights
    for (name, a), b in zip(_train(tmp_path / "ref").state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    for step in (2, 4):
        save_checkpoint(tmp_path, step, model, optimizer, None)
    weights = tmp_path / "step-0000004/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a kill while the filesystem was copying
    ckpt, rejected = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-0000002" and "model.safetensors" in rejected[0]
    (tmp_path / "step-0000002/manifest.json").unlink()  # a save that never finished
    assert latest_checkpoint(tmp_path)[0] is None


def test_centred_adapter_ignores_an_offset_shared_by_all_vectors():
    model = _model().eval()
    vectors = Vectors().table.reshape(-1, LLM_DIM)  # [2N, D]
    offset = 5 * torch.randn(LLM_DIM)
    with torch.no_grad():
        plain = model.encode_text(vectors)
        model.text_adapter.set_center(vectors)
        centred = model.encode_text(vectors)
        model.text_adapter.set_center(vectors + offset)
        shifted = model.encode_text(vectors + offset)
    torch.testing.assert_close(shifted, centred, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, centred, atol=1e-3)


def test_exported_tower_loads_in_stock_transformers_with_identical_hidden_states(tmp_path):
    model = _model().eval()
    model.text_adapter.set_center(Vectors().table[:, 1])  # the saved model must carry the centre
    processor = make_image_processor(32)
    export_vision_tower(model, tmp_path / "tower", processor)
    stock = CLIPVisionModel.from_pretrained(tmp_path / "tower").eval()
    assert stock.config.model_type == "clip_vision_model"
    assert CLIPImageProcessor.from_pretrained(tmp_path / "tower").crop_size == {"height": 32, "width": 32}
    pixels = _images().pixels[:3]
    with torch.no_grad():
        ours = model.vision(pixels, output_hidden_states=True).hidden_states
        theirs = stock(pixels, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)

    export_model(model, tmp_path / "whole", processor)
    loaded = LLM2CLIP.from_pretrained(tmp_path / "whole")
    vectors = Vectors().table[:3, 0]
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(vectors), model.encode_text(vectors))


def _ddp_worker(rank, world_size, port, out_dir, result):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model = _train(out_dir / f"r{rank}", steps=2, resume=False, precision="fp32")
    result[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


def test_two_gloo_processes_train_like_one(tmp_path):
    """DDP over 2 processes, each with half of every global batch, ends at the one-process weights (fp32:
    bf16 rounds differently for different matrix shapes)."""
    import torch.multiprocessing as mp

    result = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, 29541, tmp_path, result), nprocs=2, join=True)
    single = _train(tmp_path / "single", steps=2, resume=False, precision="fp32").state_dict()
    deviation = max((result[0][k] - v).abs().max().item() for k, v in single.items())
    print(f"stage 2, 1 vs 2 processes: max weight deviation {deviation:.2e}")
    for name, value in single.items():
        torch.testing.assert_close(result[0][name], value, atol=1e-5, rtol=0, msg=name)
        assert torch.equal(result[0][name], result[1][name])


def test_missing_cache_entries_are_skipped_and_counted_or_named_in_strict_mode():
    from llm2clip.cache import MissingEmbedding
    from llm2clip.data.readers import SkipCounter

    class Cache:
        folder = "cache"

        def has(self, key, field):  # k3 has no embeddings at all, k5 lacks its long caption
            return key != "k3" and not (key == "k5" and field == "long_caption")

    images = _images()
    with pytest.raises(MissingEmbedding, match="'k3'"):
        images.keep_cached(Cache(), strict=True, fields=["short_caption", "long_caption"])
    images = _images()
    images.stats = SkipCounter()
    assert images.keep_cached(Cache(), strict=False, fields=["short_caption", "long_caption"]) == 1
    assert "k3" not in images.keys and len(images) == N - 1 == images.pixels.shape[0]
    assert images.captions[images.keys.index("k5")] == {"short_caption": "s5"}
    assert images.stats.counts["missing cache entry"] == 1


def test_frozen_layers_stay_fixed_and_vision_lora_merges_into_a_plain_tower(tmp_path):
    from llm2clip.stage2.runs import VisionConfig, merged_vision, prepare_vision

    model = _model()
    model.vision = prepare_vision(model.vision, VisionConfig(freeze_layers=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step_loss(model, ClipLoss(), _images().pixels[:8], Vectors().table[:8, 0], 1, contextlib.nullcontext)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = model.state_dict()
    frozen = [k for k in before if "layers.0." in k or "embeddings" in k or "pre_layrnorm" in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    trained = next(k for k in before if k.endswith("encoder.layers.1.mlp.fc1.weight"))
    assert not torch.equal(before[trained], after[trained])

    model = _model()
    model.vision = prepare_vision(model.vision, VisionConfig(lora=True, lora_r=4))
    trainable = {n for n, p in model.vision.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for n, p in model.vision.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    pixels = _images().pixels[:2]
    with torch.no_grad():
        expected = model.vision(pixels).pooler_output
        plain = merged_vision(model.vision)
        assert type(plain) is CLIPVisionModel
        torch.testing.assert_close(plain(pixels).pooler_output, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("zero", ["zero1", "zero2"])
def test_deepspeed_zero_on_two_cpu_processes_trains_like_one_process(zero, tmp_path):
    """torchrun + DeepSpeed ZeRO-1/2 (our configs, gloo) = one plain process at the same global batch."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.conftest import ROOT

    port = {"zero1": 29561, "zero2": 29562}[zero]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "tests/stage2_ds_worker.py", str(tmp_path / "ds"), f"configs/deepspeed/{zero}.json"]
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ds_state = load_file(str(tmp_path / "ds/checkpoints/step-0000003/model.safetensors"))
    single = _train(tmp_path / "one", steps=3, resume=False, precision="fp32").state_dict()
    assert ds_state["logit_scale"].shape == single["logit_scale"].shape == ()  # saved in the model's shape
    for name, value in single.items():
        torch.testing.assert_close(ds_state[name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_stage2_reads_stage1_embedder_with_its_own_runtime_settings(tmp_path):
    """What the vectors depend on comes from stage 1's folder; how to run the LLM (device, batch size,
    compile) comes from the stage-2 config, since stage 1 does not save it."""
    from llm2clip.config import load_config
    from llm2clip.embedder import CONFIG_NAME, EmbedderConfig
    from llm2clip.stage2.runs import embedder_config

    folder = tmp_path / "cc"
    folder.mkdir()
    saved = EmbedderConfig(model=str(tmp_path / "lm"), pooling="eos", max_length=77)
    (folder / CONFIG_NAME).write_text(json.dumps(saved.saved_fields()))
    cfg = load_config("configs/tiny.yaml", [f"stage1.cc.out={folder}", "embedder.batch_size=7",
                                            "embedder.compile=true", "embedder.pooling=mean"])
    got = embedder_config(cfg)
    assert (got.pooling, got.max_length) == ("eos", 77)  # the folder's
    assert (got.batch_size, got.compile, got.device) == (7, True, cfg.embedder.device)  # the config's
