"""Stage-1 training mechanics on tiny models: QLoRA, save/load, merge, and a short end-to-end run."""

import json

import pytest
import torch
from transformers import AutoModel

from llm2clip.cli import main
from llm2clip.embedder import CaptionEmbedder, EmbedderConfig, load_backbone
from llm2clip.losses import caption_contrastive_loss
from llm2clip.stage1.cc import save_cc_adapter
from llm2clip.stage1.lora import LoraSettings, add_lora
from llm2clip.stage1.merge import merge_embedder
from tests.helpers import save_tiny_llm

TEXTS = ["a large red circle on a black background", "two small blue stars", "一个大的红色圆形"]


@pytest.fixture(scope="module")
def lm_dir(world, tmp_path_factory):
    return save_tiny_llm(tmp_path_factory.mktemp("lm") / "lm", world / "tokenizer", causal_lm=True)


def _lora_embedder(cfg: EmbedderConfig, quantized: bool = False) -> CaptionEmbedder:
    backbone, tokenizer = load_backbone(cfg)
    backbone = add_lora(backbone, LoraSettings(r=4, alpha=8), quantized=quantized)
    for name, p in backbone.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter visible in the outputs
            torch.nn.init.normal_(p, std=0.02)
    return CaptionEmbedder(backbone, tokenizer, cfg)


def test_qlora_step_changes_only_lora_parameters(lm_dir):
    import bitsandbytes as bnb

    cfg = EmbedderConfig(model=str(lm_dir), load_in_4bit=True, device="cpu")
    emb = _lora_embedder(cfg, quantized=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in emb.model.modules())
    trainable = [p for p in emb.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in emb.model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)

    def step(update: bool) -> None:
        out = emb(**emb.batch(TEXTS * 3))  # [9, D]
        caption_contrastive_loss(out[:3], out[3:6], out[6:]).backward()
        if update:
            optimizer.step()
        optimizer.zero_grad()

    def frozen_weights() -> dict[str, torch.Tensor]:
        """Every non-LoRA weight as the model computes with it (4-bit weights dequantized)."""
        out = {}
        for name, module in emb.model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = module.weight
                out[name] = bnb.functional.dequantize_4bit(w.data, w.quant_state).clone()
        out.update({n: p.detach().clone() for n, p in emb.model.named_parameters() if "lora_" not in n
                    and not isinstance(p, bnb.nn.Params4bit)})
        return out

    lora_before = {n: p.detach().clone() for n, p in emb.model.named_parameters() if "lora_" in n}
    frozen_before = frozen_weights()
    step(update=True)
    frozen_after = frozen_weights()
    assert len(frozen_before) > 10 and all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    changed = {n for n, p in emb.model.named_parameters() if "lora_" in n and not torch.equal(lora_before[n], p)}
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)


def test_qlora_gradients_match_a_dequantized_reference(lm_dir):
    """Gradients reach every LoRA weight through the frozen 4-bit layers. (bitsandbytes on CPUs with
    AVX512-BF16 repacks a 4-bit weight for inference the first time it runs without grad, e.g. in the
    load-time bidirectionality probe, and the packed kernel has no backward: gradients to earlier
    layers silently vanish.)"""
    import bitsandbytes as bnb

    cfg = EmbedderConfig(model=str(lm_dir), load_in_4bit=True, device="cpu", autocast=False)
    emb = _lora_embedder(cfg, quantized=True)
    emb.train()

    def lora_grads() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # same LoRA-dropout masks in both runs
        out = emb(**emb.batch(TEXTS * 3))  # [9, D]
        caption_contrastive_loss(out[:3], out[3:6], out[6:]).backward()
        grads = {n: p.grad.clone() for n, p in emb.model.named_parameters() if p.requires_grad}
        emb.model.zero_grad()
        return grads

    with torch.inference_mode():  # an eval-style forward mid-training must not change the layout
        emb.eval()
        emb(**emb.batch(TEXTS))
        emb.train()
    quantized = lora_grads()
    for module in list(emb.model.modules()):  # reference: the same weights, dequantized into nn.Linear
        if isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit):
            q = module.base_layer
            dense = torch.nn.Linear(q.in_features, q.out_features, bias=False)
            dense.weight.data = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
            dense.requires_grad_(False)
            module.base_layer = dense
    reference = lora_grads()
    assert quantized.keys() == reference.keys() and len(reference) > 10
    errors = {n: ((quantized[n] - ref).norm() / ref.norm()).item() for n, ref in reference.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < 0.1, f"{worst}: relative error {errors[worst]:.3f}"  # 4-bit path computes in bf16


def test_save_load_and_merge_give_identical_embeddings(lm_dir, tmp_path):
    cfg = EmbedderConfig(model=str(lm_dir), device="cpu", autocast=False, pooling="weighted_mean")
    emb = _lora_embedder(cfg)
    expected = emb.encode(TEXTS)
    save_cc_adapter(emb, cfg, str(tmp_path / "cc"))
    saved = json.loads((tmp_path / "cc/embedder_config.json").read_text())
    assert saved["adapters"] == ["."] and saved["pooling"] == "weighted_mean"
    torch.testing.assert_close(CaptionEmbedder.from_pretrained(tmp_path / "cc").encode(TEXTS), expected)

    merge_embedder(tmp_path / "cc", tmp_path / "merged")
    merged = CaptionEmbedder.from_pretrained(tmp_path / "merged")
    assert merged.cfg.adapters == []
    torch.testing.assert_close(merged.encode(TEXTS), expected, atol=1e-5, rtol=1e-5)
    plain = AutoModel.from_pretrained(tmp_path / "merged")  # a standard HF folder, bidirectional by config
    assert plain.config.is_causal is False and not (tmp_path / "merged/adapter_config.json").exists()


def test_stage1_cli_end_to_end_raises_cra(world, tmp_path):
    """pretrain-lm -> mntp -> cc -> eval-cra through the CLI on the shapes world, with tiny budgets."""
    d = world
    overrides = [
        f"run.out_dir={tmp_path}", f"stage1.pretrain.corpus={d}/corpus.txt", f"stage1.pretrain.tokenizer={d}/tokenizer",
        "stage1.pretrain.hidden_size=64", "stage1.pretrain.num_layers=2", "stage1.pretrain.intermediate_size=128",
        "stage1.pretrain.steps=120", "stage1.pretrain.seq_len=64", "stage1.pretrain.batch_size=16",
        "stage1.mntp.enabled=true", f"stage1.mntp.text={d}/corpus.txt", "stage1.mntp.steps=5",
        "stage1.mntp.batch_size=8", f"stage1.cc.data={d}/train.jsonl", f"stage1.cc.text_pairs={d}/parallel.jsonl",
        "stage1.cc.steps=80", "stage1.cc.batch_size=12", "stage1.cc.lr=5e-4", "stage1.cc.warmup_steps=4",
        "stage1.cc.lr_schedule=constant",  # the budget this test was sized with; the preset decays linearly
        "stage1.cc.translation_fraction=0.2", "stage1.cc.long_long_fraction=0.5",
        "stage1.cc.gradient_checkpointing=false", f"stage1.cra_data={d}/train.jsonl", "embedder.max_length=160",
    ]
    assert main(["stage1", "all", "--config", "configs/tiny.yaml", "--no-progress",
                 *[x for o in overrides for x in ("--set", o)]]) == 0
    cra = json.loads((tmp_path / "stage1/cra.json").read_text())
    assert set(cra["raw"]) == set(cra["cc"]) == {"en", "cross_lingual", "short_long"}
    assert all(0 <= v <= 100 for part in ("raw", "cc") for v in cra[part].values())
    assert cra["cc"]["en"] >= cra["raw"]["en"] + 5  # 96-caption pool: one caption = 1.04 points
    cc_cfg = json.loads((tmp_path / "stage1/cc/embedder_config.json").read_text())
    assert cc_cfg["adapters"][0].endswith("stage1/mntp") and cc_cfg["adapters"][1] == "."
    # the tiny preset trains with eager attention; the saved embedder keeps the embedder's sdpa
    assert cc_cfg["attn_implementation"] == "sdpa"


def test_cc_under_torchrun_with_deepspeed_zero2_on_cpu(world, lm_dir, tmp_path):
    """Two processes, gloo, DeepSpeed ZeRO-2 with the LLaVA-style 'auto' config we ship."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    sets = [f"embedder.model={lm_dir}", "stage1.pretrain.enabled=false", f"stage1.cc.data={world}/train.jsonl",
            f"stage1.cc.text_pairs={world}/parallel.jsonl", "stage1.cc.steps=2", "stage1.cc.batch_size=4",
            "embedder.max_length=96", f"run.out_dir={tmp_path}", "stage1.cc.deepspeed=configs/deepspeed/zero2.json"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "llm2clip", "stage1", "cc", "--config", "configs/tiny.yaml", "--no-progress",
           *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "DS_BUILD_OPS": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["steps"] == 2
    emb = CaptionEmbedder.from_pretrained(tmp_path / "stage1/cc")
    assert emb.encode(TEXTS).shape == (3, 64)


def test_translation_alignment_pulls_a_text_and_its_translation_together(world, lm_dir, tmp_path):
    """stage1.cc.translation_alignment: same seed and batches, the aligned run's document vectors of
    held-out parallel pairs end closer than the contrastive-only run's (alignment_loss = 2 - 2 cos)."""
    import torch.nn.functional as F

    from llm2clip.losses import alignment_loss
    from llm2clip.stage1.cc import CCConfig, train_cc
    from llm2clip.stage1.pairs import read_text_pairs

    a, b = torch.randn(5, 8), torch.randn(5, 8)
    cos = F.cosine_similarity(a, b, dim=-1)
    assert torch.allclose(alignment_loss(a, b), (2 - 2 * cos).mean(), atol=1e-6)

    pairs = read_text_pairs(str(world / "parallel.jsonl"))
    held_out = pairs[-12:]
    (tmp_path / "train_pairs.jsonl").write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                                                       for s, t in pairs[:-12]))
    emb_cfg = EmbedderConfig(model=str(lm_dir), device="cpu", max_length=96)
    distance = {}
    for weight in (0.0, 4.0):
        cfg = CCConfig(data=str(world / "train.jsonl"), text_pairs=str(tmp_path / "train_pairs.jsonl"),
                       translation_fraction=0.9, translation_alignment=weight, steps=12, batch_size=6, lr=2e-3,
                       warmup_steps=0, lr_schedule="constant", hard_negatives=False, gradient_checkpointing=False,
                       checkpoint_every=0, out=str(tmp_path / f"cc{weight}"), checkpoint_dir=str(tmp_path / "ckpt"))
        train_cc(cfg, emb_cfg, seed=0, progress=False)
        emb = CaptionEmbedder.from_pretrained(tmp_path / f"cc{weight}")
        source = emb.encode([s for s, _ in held_out])  # [12, D], as the cache embeds any caption
        target = emb.encode([t for _, t in held_out])
        distance[weight] = alignment_loss(source, target).item()
    assert distance[4.0] < 0.8 * distance[0.0], distance
    with pytest.raises(Exception, match="translation_alignment"):
        CCConfig(translation_alignment=-1.0).validate()


def test_cc_on_step_sees_every_step_and_a_saved_snapshot_is_that_steps_adapter(world, lm_dir, tmp_path):
    """train_cc(on_step=...) runs after each training step with the live embedder (benchmarks/cc_curve.py
    saves snapshots through it): a snapshot saved at step 2 of 4 loads, and encodes unlike the final one."""
    from llm2clip.stage1.cc import CCConfig, train_cc

    emb_cfg = EmbedderConfig(model=str(lm_dir), device="cpu", max_length=96)
    cfg = CCConfig(data=str(world / "train.jsonl"), text_pairs=None, translation_fraction=0.0, steps=4,
                   batch_size=4, lr=5e-3, warmup_steps=0, lr_schedule="constant", hard_negatives=False,
                   gradient_checkpointing=False, checkpoint_every=0, out=str(tmp_path / "cc"),
                   checkpoint_dir=str(tmp_path / "ckpt"))
    seen = []

    def on_step(step, embedder):
        seen.append(step)
        assert isinstance(embedder, CaptionEmbedder) and embedder.model.training
        if step == 2:
            save_cc_adapter(embedder, emb_cfg, str(tmp_path / "step_2"))

    train_cc(cfg, emb_cfg, seed=0, progress=False, on_step=on_step)
    assert seen == [1, 2, 3, 4]
    mid = CaptionEmbedder.from_pretrained(tmp_path / "step_2").encode(TEXTS)
    final = CaptionEmbedder.from_pretrained(tmp_path / "cc").encode(TEXTS)
    assert mid.shape == final.shape and not torch.allclose(mid, final, atol=1e-4)
