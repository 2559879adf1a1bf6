"""Knowledge-CLIP against the CLIP baseline and LLM2CLIP, on the same data:

- attribute_probe / zero_shot: balanced accuracy per attribute (attributes.py), test split;
- cra: caption retrieval accuracy of each text encoder (stage 1's metric; `en` view: the two English
  long paraphrases in one pool). For LLM2CLIP it is the LLM itself, the teacher of both recipes;
- retrieval: image-text R@k on short, long and second-language captions (stage 2's evaluation);
- training: each run's steps, batch and measured wall time, so the budgets are visible.

Writes <knowledge_clip.results> (runs/tiny/knowledge_clip/results.json); percent throughout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..eval import encode_split, evaluate_retrieval
from ..precision import bf16_autocast
from .attributes import ATTRIBUTES, CLASSES, attribute_labels, class_embeddings, label_array, linear_probe, zero_shot

MODELS = ("clip_pretrained", "clip_finetuned", "knowledge_clip", "llm2clip")


class _TextEncoder:
    """`encode(texts) -> [N, E]` in batches, as stage 1's CRA expects of an embedder."""

    def __init__(self, fn, batch_size: int = 256):
        self.fn, self.batch_size = fn, batch_size

    @torch.inference_mode()
    def encode(self, texts: list[str], progress: bool = False) -> torch.Tensor:
        return torch.cat([self.fn(texts[i:i + self.batch_size]).float().cpu()
                          for i in range(0, len(texts), self.batch_size)])


def _model_entry(cfg, name: str, device):
    """-> (model, pooled(pixels) [B, W], image(pixels) [B, E], texts(list) [B, E], retrieval encoders)."""
    from ..baseline import BaselineCLIP
    from ..model import LLM2CLIP
    from ..stage2.evaluate import baseline_encoders, llm2clip_encoders
    from ..stage2.runs import model_folder, pretrained_clip_folder
    from .model import KnowledgeCLIP

    if name == "llm2clip":
        model = LLM2CLIP.from_pretrained(model_folder(cfg.stage2.llm2clip)).to(device)
        pooled = model.vision
        retrieval = llm2clip_encoders(cfg, model, device)
    else:
        folder = {"clip_pretrained": lambda: pretrained_clip_folder(cfg),
                  "clip_finetuned": lambda: model_folder(cfg.stage2.clip_finetune),
                  "knowledge_clip": lambda: model_folder(cfg.knowledge_clip.train)}[name]()
        loader = KnowledgeCLIP if name == "knowledge_clip" else BaselineCLIP
        model = loader.from_pretrained(folder).to(device)
        pooled = model.clip.vision_model
        retrieval = baseline_encoders(model, device)
    model.eval()
    return (model, lambda px: pooled(pixel_values=px.to(device)).pooler_output, retrieval[0],
            lambda texts: model.encode_text(list(texts)), retrieval)


def available_models(cfg) -> list[str]:
    from ..stage2.runs import model_folder

    found = {"clip_pretrained": (model_folder(cfg.stage2.clip_pretrain) / "config.json").is_file()
             or (not cfg.stage2.clip_pretrain.enabled and cfg.vision.model != "tiny"),
             "clip_finetuned": (model_folder(cfg.stage2.clip_finetune) / "config.json").is_file(),
             "knowledge_clip": (model_folder(cfg.knowledge_clip.train) / "knowledge_config.json").is_file(),
             "llm2clip": (model_folder(cfg.stage2.llm2clip) / "config.json").is_file()}
    return [m for m in MODELS if found[m]]


def _llm_cra(cfg, views, progress: bool) -> dict[str, float]:
    """The LLM's own CRA: stage 1's cra.json when it measured these captions, else measured now."""
    from ..embedder import CaptionEmbedder
    from ..stage1.cra import evaluate_cra
    from ..stage2.runs import embedder_config

    path = Path(cfg.stage1.cra_out)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("data") == cfg.stage1.cra_data and "cc" in saved:
            return saved["cc"]
    return evaluate_cra(CaptionEmbedder.load(embedder_config(cfg)), views, progress)


def _training(cfg) -> dict[str, dict]:
    """Steps, batch size and measured wall time of each trained model's run."""
    runs = {"clip_finetuned": cfg.stage2.clip_finetune, "knowledge_clip": cfg.knowledge_clip.train,
            "llm2clip": cfg.stage2.llm2clip}
    out = {}
    for name, run in runs.items():
        path = Path(run.out) / "summary.json"
        if path.is_file():
            s = json.loads(path.read_text())
            seconds = s["steps"] * run.batch_size / s["images_per_s"] if s.get("images_per_s") else None
            out[name] = {"steps": s["steps"], "batch_size": run.batch_size, "images_per_s": s.get("images_per_s"),
                         "train_seconds": round(seconds, 1) if seconds else None}
    return out


def run_knowledge_eval(cfg, progress: bool = True, train_images=None, models: tuple[str, ...] | None = None) -> dict:
    """Evaluate every available model; write and return the results (see module doc)."""
    from ..stage1.cra import evaluate_cra, read_views
    from ..stage2.evaluate import caption_sets
    from ..stage2.runs import eval_split

    kc = cfg.knowledge_clip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = {"train": train_images or eval_split(cfg, cfg.stage2.train_data),
              "val": eval_split(cfg, kc.probe_val_data), "test": eval_split(cfg, cfg.stage2.eval_data)}
    paths = {"train": cfg.stage2.train_data, "val": kc.probe_val_data, "test": cfg.stage2.eval_data}
    labels = {s: attribute_labels(cfg.data, p) for s, p in paths.items()}
    views = read_views(cfg.stage1.cra_data)
    names = [m for m in (models or MODELS) if m in available_models(cfg)]
    results = {m: {} for m in ("attribute_probe", "zero_shot", "cra", "cra_views", "retrieval")}
    for name in names:
        model, pooled, encode_image, encode_texts, retrieval = _model_entry(cfg, name, device)
        with bf16_autocast(device):
            encoded = {s: encode_split(pooled, images, cfg.stage2.eval_batch_size) for s, images in splits.items()}
            feats = {s: f.numpy() for s, (f, _, _) in encoded.items()}  # [N, W] per split
            keys = {s: k for s, (_, k, _) in encoded.items()}
            test_images, _, _ = encode_split(encode_image, splits["test"], cfg.stage2.eval_batch_size)
            probe, zs = {}, {}
            for attr in ATTRIBUTES:
                y = {s: label_array(keys[s], labels[s], attr) for s in splits}
                probe[attr], _ = linear_probe((feats["train"], y["train"]), (feats["val"], y["val"]),
                                              (feats["test"], y["test"]), kc.probe_c, cfg.run.seed)
                zs[attr] = zero_shot(test_images, class_embeddings(encode_texts, attr), y["test"])
            results["attribute_probe"][name], results["zero_shot"][name] = probe, zs
            results["retrieval"][name], _ = evaluate_retrieval(*retrieval, splits["test"], caption_sets(cfg),
                                                               cfg.stage2.eval_batch_size)
            if name == "llm2clip":
                cra = _llm_cra(cfg, views, progress)
            else:
                cra = evaluate_cra(_TextEncoder(encode_texts), views)
                if name == "knowledge_clip":  # E_T(c)·W_e: the text encoder's estimate of the LLM vector
                    distilled = evaluate_cra(_TextEncoder(model.distilled_text), views)
                    results["cra_views"]["knowledge_clip_distilled"] = distilled
        results["cra"][name], results["cra_views"][name] = cra["en"], cra
        del model
    from .concepts import META

    concepts = Path(kc.concepts.out) / META
    results.update(
        training=_training(cfg),
        concepts=json.loads(concepts.read_text()) if concepts.is_file() else None,
        protocol={"metric": "balanced accuracy (%), most salient object's colour/shape/size, object count",
                  "chance": {a: round(100 / len(CLASSES[a]), 2) for a in ATTRIBUTES},
                  "images": {s: len(images) for s, images in splits.items()},
                  "cra_view": "en (two English long paraphrases, one pool)"})
    _write_json(Path(kc.results), results)
    return results


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _r1(metrics: dict | None) -> str:
    return f"{(metrics['i2t_r1'] + metrics['t2i_r1']) / 2:.1f}" if metrics else "-"


def format_table(results: dict) -> str:
    """The comparison as a Markdown table (R@1: mean of image->text and text->image)."""
    head = ("| model | probe colour | probe shape | probe size | probe count | zero-shot mean | CRA en "
            "| short R@1 | long R@1 | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name in results["attribute_probe"]:
        probe, zs = results["attribute_probe"][name], results["zero_shot"][name]
        retrieval = results["retrieval"].get(name, {})
        seconds = (results.get("training", {}).get(name) or {}).get("train_seconds")
        lines.append(f"| {name} | " + " | ".join(f"{probe[a]:.1f}" for a in ATTRIBUTES)
                     + f" | {np.mean([zs[a] for a in ATTRIBUTES]):.1f} | {results['cra'].get(name, float('nan')):.1f}"
                     + f" | {_r1(retrieval.get('short'))} | {_r1(retrieval.get('long'))} | {seconds or '-'} |")
    return "\n".join(lines)
