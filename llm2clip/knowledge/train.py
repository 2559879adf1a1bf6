"""Knowledge-CLIP training: concepts from the embedding cache, then CLIP with three objectives.

    <knowledge_clip.concepts.out>/     concepts.safetensors + concepts.json (k-means, offline)
    <knowledge_clip.train.out>/model   HF CLIPModel folder + knowledge heads (W_e, concept classifier)

It reuses LLM2CLIP's parts: the stage-1 embedder's cache (no LLM in the loop), the stage-2 image
sets, caption sampler and training loop, and starts from the same pretrained CLIP as the baseline
fine-tune, with the same steps, batch and learning rate (docs/KNOWLEDGE_CLIP.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..stage2.train import TrainConfig
from .concepts import CENTROIDS, META, ConceptConfig, Concepts, fit_concepts


@dataclass
class KnowledgeConfig:
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    # the vision side fine-tunes gently, as stage2.clip_finetune; W_e and the concept head start from scratch
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="${run.out_dir}/knowledge_clip", lr=1e-5,
                                                                   head_lr=1e-3))
    clip_weight: float = 1.0  # α, on the CLIP contrastive loss
    distill_weight: float = 0.01  # β, on L_emb = ‖E_T(c)·W_e − LLM(c)‖²
    concept_weight: float = 1.0  # γ, on the soft-concept KL
    concept_on_text: bool = True  # the concept head also classifies text features
    concept_logit_scale: float = 10.0  # concept logits = scale · head(unit joint-space features)
    probe_val_data: str = "${run.out_dir}/data/val.jsonl"  # picks the linear probe's regularisation
    probe_c: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # inverse L2 strengths tried
    results: str = "${run.out_dir}/knowledge_clip/results.json"

    def validate(self) -> None:
        self.concepts.validate()
        self.train.validate("knowledge_clip.train")
        if min(self.clip_weight, self.distill_weight, self.concept_weight) < 0:
            raise ConfigError("knowledge_clip: clip_weight, distill_weight and concept_weight must be >= 0")
        if not self.probe_c or min(self.probe_c) <= 0:
            raise ConfigError("knowledge_clip.probe_c must list at least one positive value")

    @property
    def loss_weights(self) -> dict[str, float]:
        return {"clip": self.clip_weight, "emb": self.distill_weight, "concept": self.concept_weight}


def _open_cache(cfg):
    from ..cache import EmbeddingCache, fingerprint
    from ..stage2.runs import stage2_embedder_config

    return EmbeddingCache.open(cfg.cache.out, expect=fingerprint(stage2_embedder_config(cfg), cfg.cache.dtype),
                               verify=cfg.cache.verify)


def _train_keys(cfg) -> list[str]:
    from dataclasses import replace

    from ..data.readers import CaptionReader

    data = replace(cfg.data, path=cfg.stage2.train_data)
    return [s.key for s in CaptionReader(data, load_images=False)]


def _settings(kc: KnowledgeConfig, fields: list[str], cache) -> dict:
    c = kc.concepts
    return {"num_concepts": c.num_concepts, "temperature": c.temperature, "fields": fields, "n_init": c.n_init,
            "max_iter": c.max_iter}


def run_concepts(cfg, force: bool = False) -> dict:
    """k-means over the training captions' cached LLM vectors; reused while its settings and cache hold."""
    kc, cache = cfg.knowledge_clip, _open_cache(cfg)
    fields = list(kc.concepts.fields) or list(cache.fields)
    unknown = [f for f in fields if f not in cache.fields]
    if unknown:
        raise ConfigError(f"knowledge_clip.concepts.fields names {unknown}, which the cache at {cache.folder} does not "
                          f"hold (it has {cache.fields}). Fix: pick from those, or add them to cache.fields")
    settings = _settings(kc, fields, cache)
    meta = Path(kc.concepts.out) / META
    if not force and meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("settings") == settings and saved.get("cache_fingerprint") == cache.index["fingerprint"]:
            return {"reused": str(kc.concepts.out), **{k: saved[k] for k in ("num_concepts", "reseeded")}}
    keys = _train_keys(cfg)
    vectors = []
    for name in fields:
        present = [k for k, hit in zip(keys, cache.present(keys, name).tolist(), strict=True) if hit]
        if present:
            vectors.append(cache.lookup(present, name).float())  # [n, D]
    if not vectors:
        raise ConfigError(f"the cache at {cache.folder} holds none of the training captions of "
                          f"{cfg.stage2.train_data}. Fix: rebuild it over this data (`llm2clip cache build`)")
    concepts = fit_concepts(torch.cat(vectors), kc.concepts, seed=cfg.run.seed)
    concepts.info["settings"] = settings
    concepts.info["cache_fingerprint"] = cache.index["fingerprint"]
    concepts.save(kc.concepts.out)
    return {"num_concepts": concepts.num_concepts, **{k: concepts.info[k] for k in (
        "num_vectors", "reseeded", "empty_clusters", "cluster_sizes", "label_max_probability",
        "label_effective_concepts")}}


def concepts_id(folder: str | Path) -> str:
    """Identifies one fit: a model trained on other concepts is stale."""
    return hashlib.sha256((Path(folder) / CENTROIDS).read_bytes()).hexdigest()[:16]


class KnowledgeTargets:
    """The text side of a batch: CLIP tokens of the chosen captions, their cached LLM vectors [B, D]
    and soft concept labels [B, K]."""

    def __init__(self, model, cache, concepts: Concepts):
        from ..stage2.data import CachedVectors, Tokens

        self.tokens, self.vectors, self.concepts = Tokens(model), CachedVectors(cache), concepts

    def __call__(self, keys, captions) -> dict[str, torch.Tensor]:
        llm = self.vectors(keys, captions)  # [B, D]
        return {**self.tokens(keys, captions), "llm": llm, "concepts": self.concepts.labels(llm)}


def model_is_current(cfg) -> bool:
    from ..stage2.runs import model_folder

    kc = cfg.knowledge_clip
    config = model_folder(kc.train) / "knowledge_config.json"
    if not config.is_file() or not (Path(kc.concepts.out) / CENTROIDS).is_file():
        return False
    return json.loads(config.read_text()).get("concepts_id") == concepts_id(kc.concepts.out)


def run_knowledge_clip(cfg, data, progress: bool = True) -> dict:
    """`data`: the training split (an ImageSet or a stage-2 batch source)."""
    """Fine-tune the pretrained CLIP with α·L_clip + β·L_emb + γ·L_concept; writes <train.out>/model."""
    from ..baseline import BaselineCLIP
    from ..distributed import world
    from ..stage2.batches import as_batches
    from ..stage2.data import CaptionSampler
    from ..stage2.runs import merged_vision, model_folder, prepare_vision, pretrained_clip_folder, processor_for
    from ..stage2.train import train_contrastive
    from .model import HeadsConfig, KnowledgeCLIP

    kc, cache = cfg.knowledge_clip, _open_cache(cfg)
    concepts = Concepts.load(kc.concepts.out, dim=cache.dim, cache_fingerprint=cache.index["fingerprint"])
    train_fields = [cfg.data.short_caption_key, *cfg.data.long_caption_keys]
    data, dropped = as_batches(data).only_cached(cache, cfg.data.strict, train_fields)
    base = BaselineCLIP.from_pretrained(pretrained_clip_folder(cfg), cfg.vision.attn_implementation)
    heads = HeadsConfig(llm_dim=cache.dim, num_concepts=concepts.num_concepts, concept_on_text=kc.concept_on_text,
                        concept_logit_scale=kc.concept_logit_scale)
    model = KnowledgeCLIP.from_clip(base, heads, kc.loss_weights, seed=cfg.run.seed)
    model.clip.vision_model = prepare_vision(model.clip.vision_model, cfg.vision)
    sampler = CaptionSampler(cfg.data.short_caption_key, list(cfg.data.long_caption_keys),
                             kc.train.long_caption_ratio, cfg.run.seed)
    summary = train_contrastive(model, KnowledgeTargets(model, cache, concepts), data, sampler, kc.train,
                                name="knowledge_clip.train", seed=cfg.run.seed, progress=progress)
    if dropped is None:  # streamed: counted as the workers met them
        dropped = data.stats.counts.get("missing cache entry", 0)
    summary.update(text_truncated=model.stats["truncated"], samples_without_cache_entry=dropped)
    if world()[0] == 0:
        model.clip.vision_model = merged_vision(model.clip.vision_model)
        model.info["concepts_id"] = concepts_id(kc.concepts.out)
        model.save_pretrained(model_folder(kc.train), processor_for(cfg))
        (Path(kc.train.out) / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
