"""Retrieval evaluation of the three models on the test split, the results.json block and the plots.

Caption sets: `short` (the short caption), `long` (every long paraphrase: several captions per image)
and `second_language` (stage2.second_language_fields). Stage 2 trains on English captions only, so
the second-language set measures what the LLM carries over.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..baseline import BaselineCLIP
from ..errors import ConfigError
from ..eval import evaluate_retrieval
from ..model import LLM2CLIP
from ..precision import bf16_autocast
from .data import CachedVectors, LiveVectors
from .runs import eval_split, model_folder, pretrained_clip_folder, processor_for, vision_model_family


def caption_sets(cfg) -> dict[str, list[str]]:
    return {"short": [cfg.data.short_caption_key], "long": list(cfg.data.long_caption_keys),
            "second_language": list(cfg.stage2.second_language_fields)}


def baseline_encoders(model: BaselineCLIP, device):
    model.to(device).eval()
    return (lambda px: model.encode_image(px.to(device)),
            lambda keys, captions: model.encode_text([c.text for c in captions]))


class CachedOrLive:
    """Cached vectors where the cache has them, the live LLM for the rest (e.g. evaluation-only fields)."""

    def __init__(self, cache, embedder_fn):
        self.cached, self.embedder_fn, self._live = CachedVectors(cache), embedder_fn, None

    def __call__(self, keys, captions) -> torch.Tensor:
        cache, hit = self.cached.cache, []
        for name in {c.field for c in captions}:  # one batched presence check per field
            rows = [i for i, c in enumerate(captions) if c.field == name]
            present = cache.present([keys[i] for i in rows], name).tolist()
            hit += [i for i, ok in zip(rows, present, strict=True) if ok]
        hit.sort()
        out = torch.empty(len(keys), cache.dim)
        if hit:
            out[hit] = self.cached([keys[i] for i in hit], [captions[i] for i in hit])
        if len(hit) < len(keys):
            if self._live is None:  # loaded on first need: most evaluations never need it
                self._live = LiveVectors(self.embedder_fn())
            found = set(hit)
            miss = [i for i in range(len(keys)) if i not in found]
            out[miss] = self._live([keys[i] for i in miss], [captions[i] for i in miss])
        return out


def llm2clip_text_side(cfg, model: LLM2CLIP | None = None):
    """The cache where it holds a caption, else the live LLM (stage2.online: always the live LLM), both
    with the cache's caption instruction, which must be the one `model` was trained with."""
    from ..cache import EmbeddingCache, fingerprint
    from ..embedder import CaptionEmbedder
    from .runs import stage2_embedder_config

    emb_cfg = stage2_embedder_config(cfg)
    trained = ((model.embedder_ref or {}).get("config") or {}) if model is not None else {}
    if "instruction" in trained and trained["instruction"] != emb_cfg.instruction:
        raise ConfigError(f"the LLM2CLIP model was trained on captions embedded with instruction "
                          f"{trained['instruction']!r}, but cache.instruction (null: embedder.instruction) now gives "
                          f"{emb_cfg.instruction!r}; its evaluation would read other vectors. Fix: set "
                          f"cache.instruction to the model's, or retrain stage2.llm2clip")

    def embedder():
        return model.embedder() if model is not None else CaptionEmbedder.load(emb_cfg)

    expected = fingerprint(emb_cfg, cfg.cache.dtype)
    if not cfg.stage2.online and (Path(cfg.cache.out) / "index.json").is_file():
        return CachedOrLive(EmbeddingCache.open(cfg.cache.out, expect=expected, verify=cfg.cache.verify), embedder)
    return LiveVectors(embedder())


def llm2clip_encoders(cfg, model: LLM2CLIP, device):
    model.to(device).eval()
    text_side = llm2clip_text_side(cfg, model)
    return (lambda px: model.encode_image(px.to(device)),
            lambda keys, captions: model.encode_text(text_side(keys, captions).to(device)))


def run_eval(cfg, progress: bool = True, models: tuple[str, ...] = ("clip_pretrained", "clip_finetuned",
                                                                       "llm2clip"), plots: bool = True) -> dict:
    """Evaluate whichever of `models` exist; write plots (unless `plots=False`, e.g. for ablations, whose
    runs must not overwrite the main run's figures); return the results.json dict (percent)."""
    from ..embedder import resolve_device
    from ..report import plot_top5, plot_training_curves

    device = resolve_device(cfg.stage2.device)
    images = eval_split(cfg, cfg.stage2.eval_data)
    sets = caption_sets(cfg)
    stage2 = cfg.stage2
    loaders = {
        "clip_pretrained": lambda: baseline_encoders(BaselineCLIP.from_pretrained(pretrained_clip_folder(cfg)),
                                                      device),
        "clip_finetuned": lambda: baseline_encoders(BaselineCLIP.from_pretrained(model_folder(stage2.clip_finetune)),
                                                     device),
        "llm2clip": lambda: llm2clip_encoders(cfg, LLM2CLIP.from_pretrained(model_folder(stage2.llm2clip)), device),
    }
    available = {"clip_pretrained": stage2.clip_pretrain.enabled or (cfg.vision.model != "tiny"
                                                                      and vision_model_family(cfg) == "clip"),
                 "clip_finetuned": (model_folder(stage2.clip_finetune) / "config.json").is_file(),
                 "llm2clip": (model_folder(stage2.llm2clip) / "config.json").is_file()}
    retrieval, features = {}, {}
    with bf16_autocast(device):
        for name in models:
            if available[name]:
                encode_images, encode_texts = loaders[name]()
                retrieval[name], features[name] = evaluate_retrieval(encode_images, encode_texts, images, sets,
                                                                     stage2.eval_batch_size)
    cra_path = Path(cfg.stage1.cra_out)
    cra = json.loads(cra_path.read_text()) if cra_path.is_file() and cfg.stage1.cra_data is not None else None
    results = {"cra": {k: cra[k] for k in ("raw", "cc")} if cra else None, "retrieval": retrieval,
               "eval_images": len(images), "eval_skipped": images.stats.skipped}
    if not plots:
        return results
    folder = Path(cfg.run.out_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    plot_training_curves({n: getattr(stage2, n).out for n in ("clip_pretrain", "clip_finetune", "llm2clip")},
                         folder / "training_curves.png")
    if "llm2clip" in features and "long" in features["llm2clip"]:
        processor = processor_for(cfg)
        plot_top5(features["llm2clip"], images, folder / "top5_long_captions.png", processor.image_mean,
                  processor.image_std)
    return results
