"""Captions of a scene: one short CLIP-style caption and several long dense paraphrases, in English
and Chinese.

Short captions name only the 1-2 most salient objects, as web alt-text does. Long captions describe
every object, its attributes and its relation to the previous one, in a random order per
paraphrase, so most run past CLIP's 77-token window and the last objects fall beyond it, as in
Urban-1k or DOCCI.
"""

from __future__ import annotations

import random
from collections import Counter

from .lexicon import (
    COLOR_ZH,
    ORDINAL_EN,
    POSITION_EN,
    POSITION_ZH,
    RELATION_EN,
    RELATION_ZH,
    SHAPE_FACT_EN,
    SHAPE_FACT_ZH,
    SHAPE_ZH,
    STYLE_DESC_EN,
    STYLE_DESC_ZH,
    count_en,
    count_zh,
    join_en,
    join_zh,
    noun_en,
    noun_zh,
    plural_en,
)
from .world import Scene, ShapeObject, relation


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def short_caption_en(scene: Scene, rng: random.Random) -> str:
    top = scene.by_salience()[: rng.choice((1, 2, 2))]
    bg = scene.background
    if len(top) == 1:
        (a,) = top
        return rng.choice((
            f"a {noun_en(a)} on a {bg} background",
            f"a photo of a {noun_en(a)}",
            f"a {noun_en(a)} among other shapes on {bg}",
        ))
    a, b = top
    return rng.choice((
        f"a {noun_en(a)} and a {noun_en(b)} on a {bg} background",
        f"a photo of a {noun_en(a)} next to a {b.color} {b.shape}",
        f"a {noun_en(a)} with a {noun_en(b)}",
    ))


def short_caption_zh(scene: Scene, rng: random.Random) -> str:
    top = scene.by_salience()[: rng.choice((1, 2, 2))]
    bg = COLOR_ZH[scene.background]
    if len(top) == 1:
        (a,) = top
        return rng.choice((f"{bg}背景上的一个{noun_zh(a)}", f"一个{noun_zh(a)}的照片"))
    a, b = top
    return rng.choice((f"一个{noun_zh(a)}和一个{noun_zh(b, size=False)}",
                       f"{noun_zh(a, size=False)}旁边有一个{noun_zh(b, size=False)}"))


def _paraphrase_order(scene: Scene, rng: random.Random, k: int) -> list[ShapeObject]:
    """Paraphrase 0 reads left-to-right, top-to-bottom; the others shuffle or go by salience."""
    if k == 0:
        return scene.reading_order()
    if rng.random() < 0.5:
        return scene.by_salience()
    order = scene.reading_order()
    rng.shuffle(order)
    return order


def _counts(scene: Scene) -> Counter:
    return Counter(o.shape for o in scene.reading_order())


def long_caption_en(scene: Scene, rng: random.Random, k: int = 0) -> str:
    n, bg = count_en(len(scene.objects)), scene.background
    parts = [rng.choice((
        f"This image shows {n} objects drawn on a plain {bg} background, each placed in its own cell "
        "of a three by three grid.",
        f"The picture contains {n} shapes on a {bg} background, arranged on an invisible three by "
        "three grid.",
        f"On a plain {bg} background there are {n} objects in total, spread over a three by three grid.",
    ))]
    seen_shapes: set[str] = set()
    prev: ShapeObject | None = None
    for i, o in enumerate(_paraphrase_order(scene, rng, k)):
        pos = POSITION_EN[(o.row, o.col)]
        parts.append(rng.choice((
            f"{_cap(pos)}, there is a {noun_en(o, style=True)}.",
            f"A {noun_en(o)}, drawn {STYLE_DESC_EN[o.style]}, sits {pos}.",
            f"The {ORDINAL_EN[i]} object is a {noun_en(o, style=True)} located {pos}.",
        )))
        if prev is not None:
            rel = RELATION_EN[relation(o, prev)]
            parts.append(rng.choice((f"It is {rel} the {prev.color} {prev.shape}.",
                                     f"This one lies {rel} the {prev.color} {prev.shape}.")))
        if o.shape not in seen_shapes:
            parts.append(rng.choice(("Recall that ", "Note that ", "As always, ")) + SHAPE_FACT_EN[o.shape] + ".")
            seen_shapes.add(o.shape)
        prev = o
    counts = join_en([f"{count_en(c)} {plural_en(s, c)}" for s, c in _counts(scene).items()])
    colors = join_en(sorted({o.color for o in scene.objects}))
    parts.append(rng.choice((
        f"In total the image contains {counts}, and the colours used are {colors}.",
        f"Counting everything, there are {counts}; the colours present are {colors}.",
    )))
    return " ".join(parts)


def long_caption_zh(scene: Scene, rng: random.Random, k: int = 0) -> str:
    n, bg = count_zh(len(scene.objects)), COLOR_ZH[scene.background]
    parts = [rng.choice((
        f"这张图片在纯{bg}背景上画了{n}个物体，每个物体都位于三乘三网格中的一个格子里。",
        f"图中共有{n}个图形，画在{bg}背景上，排列在一个看不见的三乘三网格中。",
        f"在纯{bg}的背景上，一共有{n}个物体，分布在三乘三的网格里。",
    ))]
    seen_shapes: set[str] = set()
    prev: ShapeObject | None = None
    for i, o in enumerate(_paraphrase_order(scene, rng, k)):
        pos = POSITION_ZH[(o.row, o.col)]
        parts.append(rng.choice((
            f"在{pos}有一个{noun_zh(o, style=True)}。",
            f"一个{noun_zh(o)}位于{pos}，它是{STYLE_DESC_ZH[o.style]}。",
            f"第{count_zh(i + 1) if i != 1 else '二'}个物体是{pos}的一个{noun_zh(o, style=True)}。",
        )))
        if prev is not None:
            rel = RELATION_ZH[relation(o, prev)]
            parts.append(f"它在{COLOR_ZH[prev.color]}{SHAPE_ZH[prev.shape]}的{rel}。")
        if o.shape not in seen_shapes:
            parts.append(rng.choice(("要知道，", "注意，")) + SHAPE_FACT_ZH[o.shape] + "。")
            seen_shapes.add(o.shape)
        prev = o
    counts = join_zh([f"{count_zh(c)}个{SHAPE_ZH[s]}" for s, c in _counts(scene).items()])
    colors = join_zh([COLOR_ZH[c] for c in sorted({o.color for o in scene.objects})])
    parts.append(f"图中一共有{counts}，用到的颜色有{colors}。")
    return "".join(parts)


def describe(scene: Scene, rng: random.Random, num_long: int = 2) -> dict:
    """All captions of one scene. `rng` is consumed in a fixed order, so output is seed-deterministic."""
    if num_long < 1:
        raise ValueError(f"num_long must be >= 1, got {num_long}")
    return {
        "short_caption": short_caption_en(scene, rng),
        "long_captions": [long_caption_en(scene, rng, k) for k in range(num_long)],
        "short_caption_zh": short_caption_zh(scene, rng),
        "long_caption_zh": long_caption_zh(scene, rng, 0),
    }
