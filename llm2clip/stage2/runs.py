"""The stage-2 runs of a config: CLIP pretraining (tiny world), CLIP fine-tuning (the baseline) and
LLM2CLIP training, each writing a model folder that later steps and exports read.

    <run.out_dir>/stage2/clip_pretrain/model   HF CLIPModel folder (+ tokenizer, processor)
    <run.out_dir>/stage2/clip_finetune/model   same, fine-tuned on mixed captions cut to 77 tokens
    <run.out_dir>/stage2/llm2clip/model        LLM2CLIP folder (vision + projection + adapter)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..baseline import BaselineCLIP, TextTowerConfig
from ..data.images import make_image_processor
from ..data.stream import StreamConfig
from ..errors import ConfigError
from ..model import LLM2CLIP, ModelConfig
from .batches import MemoryBatches, StreamBatches, StreamSplit, as_batches
from .data import CachedVectors, CaptionSampler, ImageSet, LiveVectors, Tokens
from .train import TrainConfig, train_contrastive


def _run(out: str, **kw) -> TrainConfig:
    return TrainConfig(out=out, **kw)


@dataclass
class Stage2Config:
    train_data: str = "${data.path}"
    eval_data: str = "${run.out_dir}/data/test.jsonl"
    second_language_fields: list[str] = field(default_factory=lambda: ["short_caption_zh", "long_caption_zh"])
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)  # the tiny baseline's text tower
    clip_pretrain: TrainConfig = field(default_factory=lambda: _run(
        "${run.out_dir}/stage2/clip_pretrain", enabled=False, long_caption_ratio=0.0))
    clip_finetune: TrainConfig = field(default_factory=lambda: _run(
        "${run.out_dir}/stage2/clip_finetune", lr=1e-5))
    llm2clip: TrainConfig = field(default_factory=lambda: _run("${run.out_dir}/stage2/llm2clip", lr=1e-5))
    online: bool = False  # feed live LLM embeddings instead of the cache (comparison / ablation)
    # true: stream train/eval data through DataLoader workers (shards of any size); false: decode each split
    # into memory once (the shapes world: faster, and a step's batch needs no saved position)
    streaming: bool = False
    loader: StreamConfig = field(default_factory=StreamConfig)
    eval_batch_size: int = 256
    device: str = "auto"  # training and evaluation: auto (cuda if visible) | cpu | cuda | cuda:N

    def validate(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"stage2.device: '{self.device}' is not one of auto, cpu, cuda, cuda:N")
        self.model.validate()
        self.loader.validate()
        for name in ("clip_pretrain", "clip_finetune", "llm2clip"):
            getattr(self, name).validate(name)


@dataclass
class VisionConfig:
    model: str = "tiny"  # CLIP or SigLIP checkpoint (local folder or hub id; whole model or vision-only), or 'tiny'
    # 'tiny': a CLIPVisionConfig at toy size (image size = data.image_size)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    patch_size: int = 8
    attn_implementation: str = "sdpa"  # sdpa | eager (faster on CPU for short token sequences)
    freeze_layers: int = 0  # freeze the patch embedding and the first N transformer layers
    lora: bool = False  # train LoRA on q/k/v (peft) instead of the full encoder
    lora_r: int = 32
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if self.freeze_layers < 0 or self.lora_r < 1 or self.hidden_size % self.num_heads:
            raise ConfigError("vision: freeze_layers >= 0, lora_r >= 1, hidden_size divisible by num_heads")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise ConfigError("vision.attn_implementation must be sdpa, eager or flash_attention_2")


def tiny_vision_config(vision: VisionConfig, image_size: int):
    from transformers import CLIPVisionConfig

    config = CLIPVisionConfig(hidden_size=vision.hidden_size, intermediate_size=4 * vision.hidden_size,
                              num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                              image_size=image_size, patch_size=vision.patch_size, projection_dim=vision.hidden_size)
    config._attn_implementation = vision.attn_implementation
    return config


def prepare_vision(vision_model: torch.nn.Module, vision: VisionConfig) -> torch.nn.Module:
    """Apply freezing / LoRA / checkpointing to a CLIP/SigLIP vision model (or CLIPModel.vision_model)."""
    inner = getattr(vision_model, "vision_model", vision_model)
    if vision.freeze_layers:
        inner.embeddings.requires_grad_(False)
        if hasattr(inner, "pre_layrnorm"):  # CLIP's LayerNorm before the encoder; SigLIP has none
            inner.pre_layrnorm.requires_grad_(False)
        for layer in inner.encoder.layers[: vision.freeze_layers]:
            layer.requires_grad_(False)
    if vision.gradient_checkpointing and hasattr(vision_model, "gradient_checkpointing_enable"):
        vision_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if vision.lora:
        from peft import LoraConfig, get_peft_model

        vision_model = get_peft_model(vision_model, LoraConfig(r=vision.lora_r, lora_alpha=vision.lora_r,
                                                               target_modules=["q_proj", "k_proj", "v_proj"]))
    return vision_model


def merged_vision(vision_model: torch.nn.Module) -> torch.nn.Module:
    """A plain vision model: LoRA (if any) merged in."""
    return vision_model.merge_and_unload() if hasattr(vision_model, "merge_and_unload") else vision_model


def vision_model_family(cfg) -> str:
    """'clip' or 'siglip' (llm2clip.vision): what vision.model is; 'tiny' builds a CLIP."""
    from ..vision import checkpoint_family

    return "clip" if cfg.vision.model == "tiny" else checkpoint_family(cfg.vision.model)


def vision_image_size(source: str) -> int | None:
    """The image size a CLIP or SigLIP checkpoint (full or vision-only, folder or hub id) was built for;
    None for SigLIP 2 NaFlex, which has no fixed size (data.image_size is then its training square)."""
    from transformers import CLIPVisionConfig
    from transformers.utils import cached_file

    config = cached_file(source, "config.json", _raise_exceptions_for_missing_entries=False)
    if config is None:
        return None
    config = json.loads(Path(config).read_text())
    vision = config.get("vision_config", config) if "vision_config" in config else config
    if config.get("model_type") in ("clip", "clip_vision_model"):  # transformers' default when it is left out
        return vision.get("image_size", CLIPVisionConfig().image_size)
    return vision.get("image_size")


def check_image_size(cfg) -> None:
    """data.image_size must be the vision checkpoint's: a larger one fails deep in HF's position
    embeddings, and with a preprocessor_config.json it would be ignored without a word."""
    if cfg.vision.model == "tiny":
        return
    size = vision_image_size(cfg.vision.model)
    if size is not None and size != cfg.data.image_size:
        raise ConfigError(f"data.image_size is {cfg.data.image_size} but vision.model ({cfg.vision.model}) has "
                          f"image_size {size}. Fix: set data.image_size={size}")


def processor_for(cfg):
    check_image_size(cfg)
    source = cfg.vision.model if cfg.vision.model != "tiny" and Path(cfg.vision.model).is_dir() else None
    return make_image_processor(cfg.data.image_size, source, family=vision_model_family(cfg))


def _path_key(cfg, path: str) -> str:
    """The config key that named `path`, for error messages."""
    keys = {cfg.knowledge_clip.probe_val_data: "knowledge_clip.probe_val_data", cfg.stage2.eval_data:
            "stage2.eval_data", cfg.stage2.train_data: "stage2.train_data"}
    return keys.get(path, "data.path")


def load_images(cfg, path: str, progress: bool = True) -> ImageSet:
    return ImageSet.load(cfg.data, path, processor_for(cfg), tuple(cfg.stage2.second_language_fields), progress,
                         key=_path_key(cfg, path))


def eval_split(cfg, path: str, progress: bool = False) -> ImageSet | StreamSplit:
    """An evaluation split: streamed in one pass per use (stage2.streaming), else decoded into memory."""
    if cfg.stage2.streaming:
        return StreamSplit(cfg.data, path, processor_for(cfg), tuple(cfg.stage2.second_language_fields),
                           cfg.stage2.loader.workers, _path_key(cfg, path))
    return load_images(cfg, path, progress)


def train_data(cfg, progress: bool = True) -> MemoryBatches | StreamBatches:
    """Stage 2's training batches: streamed from stage2.train_data (stage2.streaming), else its split in memory."""
    if not cfg.stage2.streaming:
        return MemoryBatches(load_images(cfg, cfg.stage2.train_data, progress))
    from functools import partial

    from ..data.stream import StreamDataset

    loader = cfg.stage2.loader
    make = partial(StreamDataset, cfg.data, path=cfg.stage2.train_data, processor=processor_for(cfg),
                   extra_fields=tuple(cfg.stage2.second_language_fields), shuffle_buffer=loader.shuffle_buffer,
                   key="stage2.train_data")
    return StreamBatches(make, loader)


def model_folder(run: TrainConfig) -> Path:
    return Path(run.out) / "model"


def _train(cfg, model, text_side, data, run: TrainConfig, name: str, loss: str, progress: bool) -> dict:
    sampler = CaptionSampler(cfg.data.short_caption_key, list(cfg.data.long_caption_keys), run.long_caption_ratio,
                             cfg.run.seed)
    from ..embedder import resolve_device

    summary = train_contrastive(model, text_side, data, sampler, run, name=name, seed=cfg.run.seed, loss=loss,
                                progress=progress, device=resolve_device(cfg.stage2.device))
    (Path(run.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run_clip_pretrain(cfg, data, progress: bool = True) -> dict:
    """Tiny world: a CLIP trained from scratch on short captions (the stand-in for OpenAI's weights)."""
    from ..distributed import world

    if cfg.vision.model != "tiny":
        raise ConfigError("stage2.clip_pretrain trains a CLIP from scratch and is for vision.model=tiny; real "
                          "checkpoints arrive pretrained (set stage2.clip_pretrain.enabled=false)")
    torch.manual_seed(cfg.run.seed)
    model = BaselineCLIP.from_config(tiny_vision_config(cfg.vision, cfg.data.image_size), cfg.stage2.text,
                                     cfg.stage2.model.embed_dim)
    summary = _train(cfg, model, Tokens(model), data, cfg.stage2.clip_pretrain, "clip_pretrain", "clip", progress)
    if world()[0] == 0:
        model.save_pretrained(model_folder(cfg.stage2.clip_pretrain), processor_for(cfg))
    return summary


def pretrained_clip_folder(cfg) -> str:
    """Where the pretrained CLIP lives: our clip_pretrain output, or the configured checkpoint."""
    if cfg.stage2.clip_pretrain.enabled:
        folder = model_folder(cfg.stage2.clip_pretrain)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{folder} does not exist yet; run `llm2clip stage2 pretrain-clip` first")
        return str(folder)
    if cfg.vision.model == "tiny":
        raise ConfigError("vision.model=tiny needs stage2.clip_pretrain.enabled=true (nothing else pretrains it)")
    return cfg.vision.model


def run_clip_finetune(cfg, data, progress: bool = True) -> dict:
    """The paper's baseline: the same mixed captions, through CLIP's own 77-token text encoder."""
    from ..distributed import world

    if vision_model_family(cfg) != "clip":
        raise ConfigError(f"stage2.clip_finetune fine-tunes a CLIPModel, and vision.model={cfg.vision.model} is a "
                          "SigLIP checkpoint; set stage2.clip_finetune.enabled=false")
    model = BaselineCLIP.from_pretrained(pretrained_clip_folder(cfg), cfg.vision.attn_implementation)
    model.clip.vision_model = prepare_vision(model.clip.vision_model, cfg.vision)
    summary = _train(cfg, model, Tokens(model), data, cfg.stage2.clip_finetune, "clip_finetune", "clip", progress)
    if world()[0] == 0:
        model.clip.vision_model = merged_vision(model.clip.vision_model)
        model.save_pretrained(model_folder(cfg.stage2.clip_finetune), processor_for(cfg))
    summary["text_truncated"] = model.stats["truncated"]
    return summary


def build_llm2clip(cfg, llm_dim: int, embedder_ref: dict | None) -> LLM2CLIP:
    from ..vision import load_vision_model

    vision = load_vision_model(pretrained_clip_folder(cfg), attn_implementation=cfg.vision.attn_implementation)
    torch.manual_seed(cfg.run.seed)
    model_cfg = cfg.stage2.model
    if model_cfg.loss == "siglip" and math.isclose(model_cfg.init_logit_scale, math.log(1 / 0.07)):
        model_cfg = ModelConfig(**{**model_cfg.__dict__, "init_logit_scale": math.log(10)})
    inherited = clip_logit_scale(pretrained_clip_folder(cfg)) if model_cfg.inherit_logit_scale else None
    if model_cfg.loss == "clip" and inherited is not None:  # as the official LLM2CLIP: CLIP's own temperature
        model_cfg = ModelConfig(**{**model_cfg.__dict__, "init_logit_scale": inherited})
    return LLM2CLIP(vision, llm_dim, model_cfg, embedder_ref)


def clip_logit_scale(source: str) -> float | None:
    """The `logit_scale` of a full CLIPModel checkpoint (folder or hub id), read alone; None for a
    vision-only checkpoint, which has none."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def file(name):
        return cached_file(source, name, _raise_exceptions_for_missing_entries=False)

    config = file("config.json")
    if config is None or json.loads(Path(config).read_text()).get("model_type") != "clip":
        return None
    weights = file("model.safetensors")
    if weights is None and (index := file("model.safetensors.index.json")):
        shard = json.loads(Path(index).read_text())["weight_map"].get("logit_scale")
        weights = file(shard) if shard else None
    if weights is not None:
        with safe_open(weights, framework="pt") as f:
            names = f.keys()
            return float(f.get_tensor("logit_scale")) if "logit_scale" in names else None
    if bin_file := file("pytorch_model.bin"):  # OpenAI's hub folders also ship the pickle: tensors only
        value = torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True).get("logit_scale")
        return float(value) if value is not None else None
    return None


def run_llm2clip(cfg, data, progress: bool = True) -> dict:
    """Vision encoder + adapter against the frozen LLM: cached vectors, or live ones (stage2.online)."""
    from ..cache import EmbeddingCache, fingerprint
    from ..distributed import world
    from ..embedder import CaptionEmbedder

    emb_cfg = stage2_embedder_config(cfg)  # the cache's instruction, cached or online alike
    expected = fingerprint(emb_cfg, cfg.cache.dtype)
    data = as_batches(data)
    if cfg.stage2.online:
        embedder = CaptionEmbedder.load(emb_cfg)
        text_side, llm_dim = LiveVectors(embedder), embedder.dim
    else:
        cache = EmbeddingCache.open(cfg.cache.out, expect=expected, verify=cfg.cache.verify)
        data, _ = data.only_cached(cache, strict=cfg.data.strict,
                                   fields=[cfg.data.short_caption_key, *cfg.data.long_caption_keys])
        text_side, llm_dim = CachedVectors(cache), cache.dim
    ref = {"config": emb_cfg.saved_fields(), "fingerprint": expected}
    model = build_llm2clip(cfg, llm_dim, ref)
    if cfg.stage2.model.center_vectors:
        model.text_adapter.set_center(_center_sample(cfg, data, text_side))
    model.vision = prepare_vision(model.vision, cfg.vision)
    summary = _train(cfg, model, text_side, data, cfg.stage2.llm2clip, "llm2clip", cfg.stage2.model.loss, progress)
    summary["skipped_samples"] = dict(data.stats.counts) if data.stats else {}
    if world()[0] == 0:
        model.vision = merged_vision(model.vision)
        model.save_pretrained(model_folder(cfg.stage2.llm2clip), processor_for(cfg))
    return summary


def _center_sample(cfg, data, text_side, n: int = 2048) -> torch.Tensor:
    """LLM vectors of up to `n` training captions (short and long alike) [n, D], to centre the adapter:
    in memory, spread over the split; streamed, the first captions of one pass over the training data
    (not spread over the cache, which also holds the evaluation captions)."""
    from .data import Caption

    fields = [cfg.data.short_caption_key, *cfg.data.long_caption_keys]
    if isinstance(data, MemoryBatches):
        images = data.images
        pairs = [(k, Caption(f, caps[f])) for k, caps in zip(images.keys, images.captions, strict=True)
                 for f in fields if f in caps]
        pairs = pairs[::max(1, len(pairs) // n)][:n]
    else:
        pairs = []
        split = eval_split(cfg, cfg.stage2.train_data)
        for batch in split.batches(256):
            pairs += [(k, Caption(f, caps[f])) for k, caps in zip(batch["keys"], batch["captions"], strict=True)
                      for f in fields if f in caps]
            if len(pairs) >= n:
                break
        cache = getattr(text_side, "cache", None)  # cached vectors: only the captions the cache holds
        pairs = [(k, c) for k, c in pairs if cache is None or cache.has(k, c.field)][:n]
    return torch.cat([text_side([k for k, _ in pairs[i:i + 256]], [c for _, c in pairs[i:i + 256]])
                      for i in range(0, len(pairs), 256)])


def embedder_config(cfg):
    """The embedder stage 2 reads: stage 1's CC output when it exists, else `embedder` as configured
    (e.g. an already CC-fine-tuned, merged LLM)."""
    from ..embedder import CONFIG_NAME, LLM2VEC_CONFIG_NAME, read_embedder_config

    folder = Path(cfg.stage1.cc.out)
    if (folder / CONFIG_NAME).is_file() or (folder / LLM2VEC_CONFIG_NAME).is_file():
        runtime = cfg.embedder  # how to run it is the user's choice, not the folder's
        return read_embedder_config(folder, device=runtime.device, batch_size=runtime.batch_size,
                                    compile=runtime.compile)
    return cfg.embedder


def stage2_embedder_config(cfg):
    """The embedder as stage 2 reads captions with it: `embedder_config` with the cache's caption
    instruction (cache.instruction; null = the embedder's own). The cache build, online training, the
    trained model's `encode_text` (it saves this config) and evaluation all use it, so their vectors
    agree; stage 1's CRA keeps the embedder's own instruction."""
    return cfg.cache.apply_instruction(embedder_config(cfg))
