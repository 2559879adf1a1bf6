"""Tiny-world VQA: exact-match accuracy per question type on held-out LLaVA conversations.

Every question in the test conversations whose type is known (colour, count, position, existence)
is asked alone, as the first turn after the image, and answered greedily. Answers match when equal
after lower-casing and dropping surrounding spaces and the final full stop ("It is red." == "it is red").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from llm2clip.data.images import load_image
from llm2clip.errors import ConfigError

from .anyres import process_anyres_image
from .conversation import generation_prompt, get_template, tokenize_prompt

QUESTION_TYPES = {  # question prefix in the shapes world's LLaVA data -> type
    "What colour is": "color",
    "How many": "count",
    "What is directly to the left of": "position",
    "Is there": "existence",
}
TYPES = ("color", "count", "position", "existence")


def question_type(question: str) -> str | None:
    return next((t for prefix, t in QUESTION_TYPES.items() if question.startswith(prefix)), None)


def normalize(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


def vqa_items(data_path: str | Path, max_images: int | None = None) -> list[dict]:
    """(image, question, answer, type) for every typed question of the conversations."""
    items = []
    samples = json.loads(Path(data_path).read_text(encoding="utf-8"))[:max_images]
    for sample in samples:
        turns = sample["conversations"]
        for q, a in zip(turns[0::2], turns[1::2], strict=True):
            question = q["value"].replace("<image>", "").strip()
            if (kind := question_type(question)) is not None:
                items.append({"id": sample["id"], "image": sample["image"], "question": question,
                              "answer": a["value"], "type": kind})
    return items


@torch.inference_mode()
def evaluate_vqa(model, tokenizer, image_processor, data_path: str | Path, image_folder: str | Path,
                 version: str = "v1", batch_size: int = 64, max_new_tokens: int = 12,
                 max_images: int | None = None, progress: bool = True, mismatched_images: bool = False) -> dict:
    """Returns {"overall", "color", "count", "position", "existence"} in percent, plus "n" per type and
    the predictions for inspection. `mismatched_images`: every question sees another test image (the
    next one in order), which measures how much the answers depend on the image at all."""
    template = get_template(version)
    items = vqa_items(data_path, max_images)
    if not items:  # a score over no question is no score: say so instead of reporting 0.0
        raise ConfigError(f"{data_path} holds no question of a type this evaluator scores ({', '.join(TYPES)}: "
                          f"questions starting {', '.join(repr(p) for p in QUESTION_TYPES)}). It scores the "
                          "shapes world's VQA; for real benchmarks run lmms-eval on the HF export "
                          "(docs/MLLM_REPOS.md)")
    if mismatched_images:
        images = sorted({it["image"] for it in items})
        following = dict(zip(images, images[1:] + images[:1], strict=True))
        items = [{**it, "image": following[it["image"]]} for it in items]
    model.eval()
    dtype = next(model.mm_projector.parameters()).dtype
    eos = tokenizer.eos_token_id
    anyres = getattr(model.config, "image_aspect_ratio", None) == "anyres"
    pinpoints = getattr(model.config, "image_grid_pinpoints", None) if anyres else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for start in tqdm(range(0, len(items), batch_size), desc="vqa", disable=not progress):
        batch = items[start: start + batch_size]
        prompts = [tokenize_prompt(generation_prompt(it["question"], template), tokenizer)[0] for it in batch]
        longest = max(map(len, prompts))
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # right-padded here; the model re-pads on the left after splicing
            ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
        pils = [load_image(Path(image_folder) / it["image"], max_pixels=1 << 26) for it in batch]
        if pinpoints:  # anyres: [1 + tiles, 3, S, S] per image, sizes (width, height)
            images = [process_anyres_image(p, image_processor, pinpoints).to(model.device, dtype) for p in pils]
        else:
            images = torch.stack([image_processor(p, return_tensors="pt")["pixel_values"][0] for p in pils])
            images = images.to(model.device, dtype)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
            out = model.generate(ids.to(model.device), images=images, image_sizes=[p.size for p in pils],
                                 attention_mask=mask.to(model.device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=pad)
        for it, tokens in zip(batch, out, strict=True):
            it["prediction"] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            it["correct"] = normalize(it["prediction"]) == normalize(it["answer"])
    scores = {}
    for kind in TYPES:
        hits = [it["correct"] for it in items if it["type"] == kind]
        scores[kind] = round(100 * sum(hits) / len(hits), 2) if hits else 0.0
    scores["overall"] = round(100 * sum(it["correct"] for it in items) / max(1, len(items)), 2)
    scores["n"] = {kind: sum(it["type"] == kind for it in items) for kind in TYPES}
    return {"scores": scores, "predictions": items}
