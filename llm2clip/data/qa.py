"""LLaVA-format samples and the text corpus of the shapes world.

Conversations use LLaVA's JSON layout: {"id", "image", "conversations": [{"from": "human"|"gpt",
"value": ...}]}, with "<image>\\n" opening the first human turn.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .. import instructions
from .lexicon import (
    COLOR_ZH,
    POSITION_EN,
    POSITION_ZH,
    RELATION_EN,
    RELATION_ZH,
    SHAPE_FACT_EN,
    SHAPE_FACT_ZH,
    SHAPE_ZH,
    count_en,
    noun_en,
    noun_zh,
    plural_en,
)
from .world import COLORS, GRID, SHAPES, SIZES, STYLES, Scene, ShapeObject, relation

IMAGE_PLACEHOLDER = "<image>"
PRETRAIN_PROMPTS = (  # LLaVA's pretraining set pairs a brief-caption request with the caption.
    "Render a clear and concise summary of the photo.",
    "Give a brief description of the image.",
    "Share a concise interpretation of the image provided.",
)


def _ref(o: ShapeObject, scene: Scene) -> str:
    """The shortest unambiguous English name of an object in its scene."""
    same = [p for p in scene.objects if p.shape == o.shape and p.color == o.color]
    name = f"the {o.color} {o.shape}"
    return name if len(same) == 1 else f"{name} {POSITION_EN[(o.row, o.col)]}"


def _color_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    o = rng.choice(scene.objects)
    same_shape = [p for p in scene.objects if p.shape == o.shape]
    where = "" if len(same_shape) == 1 else f" {POSITION_EN[(o.row, o.col)]}"
    return f"What colour is the {o.shape}{where}?", f"It is {o.color}."


def _count_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    shape = rng.choice([o.shape for o in scene.objects] + list(SHAPES[:2]))
    n = sum(o.shape == shape for o in scene.objects)
    answer = f"There {'is' if n == 1 else 'are'} {count_en(n) if n else 'no'} {plural_en(shape, n)}."
    return f"How many {plural_en(shape, 2)} are there in the image?", answer


def _left_of_qa(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a.row == b.row and a.col < b.col]
    if not pairs:
        return None
    _, b = rng.choice(pairs)
    nearest = max((a for a, c in pairs if c == b), key=lambda a: a.col)
    return (f"What is directly to the left of {_ref(b, scene)}?",
            f"A {noun_en(nearest)}.")


def _exists_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    present = {(o.color, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        color, shape = rng.choice(sorted(present))
        return f"Is there a {color} {shape} in the image?", "Yes."
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = rng.choice(absent)
    return f"Is there a {color} {shape} in the image?", "No."


def llava_pretrain_sample(key: str, image: str, caption: str, rng: random.Random) -> dict:
    prompt = rng.choice(PRETRAIN_PROMPTS)
    return {"id": key, "image": image, "conversations": [
        {"from": "human", "value": f"{prompt}\n{IMAGE_PLACEHOLDER}"},
        {"from": "gpt", "value": caption},
    ]}


DESCRIBE_PROMPT = "Describe the image in detail."
DETAIL_SHARE = 0.4  # description samples per Q&A conversation: LLaVA-Instruct-150K's detail_23k / conversation_58k


def _conversation(sample_id: str, image: str, qas: list[tuple[str, str]]) -> dict:
    turns = []
    for i, (q, a) in enumerate(qas):
        turns.append({"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{q}" if i == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return {"id": sample_id, "image": image, "conversations": turns}


def llava_instruct_samples(key: str, image: str, scene: Scene, long_caption: str, rng: random.Random) -> list[dict]:
    """LLaVA-Instruct's layout: a multi-turn Q&A conversation per image (conversation_58k's role: colour,
    count, left-of and yes/no questions in random order) and, for a DETAIL_SHARE of the images, a separate
    one-turn detailed-description sample (detail_23k's role; id `<key>-detail`). Kept apart, a ~250-token
    description never pushes the short answers past model_max_length."""
    qas = [_color_qa(scene, rng), _count_qa(scene, rng), _left_of_qa(scene, rng), _exists_qa(scene, rng)]
    qas = [qa for qa in qas if qa is not None]
    rng.shuffle(qas)
    samples = [_conversation(key, image, qas)]
    if rng.random() < DETAIL_SHARE:
        samples.append(_conversation(f"{key}-detail", image, [(DESCRIBE_PROMPT, long_caption)]))
    return samples


def parallel_sentences() -> Iterator[tuple[str, str]]:
    """(English, Chinese) pairs about the world: shape facts, words, object phrases, spatial facts."""
    for shape in SHAPES:
        yield SHAPE_FACT_EN[shape].capitalize() + ".", SHAPE_FACT_ZH[shape] + "。"
        yield shape, SHAPE_ZH[shape]
    for color in [*COLORS, "white", "black", "gray"]:
        yield color, COLOR_ZH[color]
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    for a in cells:
        for b in cells:
            if a == b:
                continue
            rel = relation(ShapeObject("circle", "red", "small", "solid", *a),
                           ShapeObject("circle", "red", "small", "solid", *b))
            yield (f"Something {POSITION_EN[a]} is {RELATION_EN[rel]} something {POSITION_EN[b]}.",
                   f"{POSITION_ZH[a]}的东西在{POSITION_ZH[b]}的东西的{RELATION_ZH[rel]}。")
    for shape in SHAPES:
        for color in COLORS:
            for size in SIZES:
                for style in STYLES:
                    o = ShapeObject(shape, color, size, style, 0, 0)
                    yield f"a {noun_en(o, style=True)}", f"一个{noun_zh(o, style=True)}"


def world_sentences() -> Iterator[str]:
    """Monolingual facts and bilingual lines that give a tiny LM knowledge of the world's languages,
    and the embedder's instructions, so their words are known to the tokenizer and the LM."""
    yield from (f"{instruction}." for instruction in instructions.ALL)
    for en, zh in parallel_sentences():
        if en.endswith("."):  # sentences: each language alone, then side by side
            yield en
            yield zh
            yield f"English: {en} Chinese: {zh}"
        else:  # words and phrases
            yield f"The phrase {en} is {zh} in Chinese." if " " in en else f"The word {en} is {zh} in Chinese."
