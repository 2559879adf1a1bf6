"""Words of the shapes world in English and Chinese (the paper's cross-lingual language).

Chinese is written from templates; each table maps the world's symbols to natural phrases.
"""

from __future__ import annotations

import functools

from .world import ShapeObject

NUMBER_EN = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_ZH = ("零", "一", "两", "三", "四", "五", "六", "七", "八", "九")
ORDINAL_EN = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth")

SHAPE_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形",
            "hexagon": "六边形", "pentagon": "五边形", "diamond": "菱形", "cross": "十字形"}
COLOR_ZH = {"red": "红色", "orange": "橙色", "yellow": "黄色", "green": "绿色", "cyan": "青色",
            "blue": "蓝色", "purple": "紫色", "pink": "粉色", "brown": "棕色",
            "white": "白色", "black": "黑色", "gray": "灰色"}
SIZE_ZH = {"small": "小", "medium": "中号", "large": "大"}
STYLE_EN = {"solid": "solid", "outlined": "outlined", "striped": "striped"}
STYLE_ZH = {"solid": "实心", "outlined": "空心", "striped": "条纹"}
STYLE_DESC_EN = {"solid": "as a solid filled shape", "outlined": "only as an outline",
                 "striped": "with horizontal stripes"}
STYLE_DESC_ZH = {"solid": "实心填充的", "outlined": "只画了轮廓的", "striped": "带有横条纹的"}

POSITION_EN = {(0, 0): "in the top left corner", (0, 1): "at the top center", (0, 2): "in the top right corner",
               (1, 0): "on the middle left", (1, 1): "in the center", (1, 2): "on the middle right",
               (2, 0): "in the bottom left corner", (2, 1): "at the bottom center",
               (2, 2): "in the bottom right corner"}
POSITION_ZH = {(0, 0): "左上角", (0, 1): "上方中间", (0, 2): "右上角",
               (1, 0): "左侧中间", (1, 1): "正中间", (1, 2): "右侧中间",
               (2, 0): "左下角", (2, 1): "下方中间", (2, 2): "右下角"}

RELATION_EN = {("above", "left"): "above and to the left of", ("above", ""): "directly above",
               ("above", "right"): "above and to the right of", ("", "left"): "directly to the left of",
               ("", "right"): "directly to the right of", ("below", "left"): "below and to the left of",
               ("below", ""): "directly below", ("below", "right"): "below and to the right of"}
RELATION_ZH = {("above", "left"): "左上方", ("above", ""): "正上方", ("above", "right"): "右上方",
               ("", "left"): "左边", ("", "right"): "右边", ("below", "left"): "左下方",
               ("below", ""): "正下方", ("below", "right"): "右下方"}

# World knowledge: the tiny LLM's corpus states these, and long captions recall them.
SHAPE_FACT_EN = {
    "circle": "a circle is perfectly round and has no corners",
    "square": "a square has four equal sides and four right angles",
    "triangle": "a triangle has three sides and three corners",
    "star": "a star has five sharp points",
    "hexagon": "a hexagon has six sides and six corners",
    "pentagon": "a pentagon has five sides and five corners",
    "diamond": "a diamond is a square turned onto one corner, so it has four sides",
    "cross": "a cross is made of two bars that meet in the middle",
}
SHAPE_FACT_ZH = {
    "circle": "圆形是完全圆的，没有角",
    "square": "正方形有四条相等的边和四个直角",
    "triangle": "三角形有三条边和三个角",
    "star": "星形有五个尖角",
    "hexagon": "六边形有六条边和六个角",
    "pentagon": "五边形有五条边和五个角",
    "diamond": "菱形是一个转到一个角上的正方形，所以它有四条边",
    "cross": "十字形由两根在中间相交的横条组成",
}


# English synonyms of world words. The tiny LM's corpus uses them (synth.synonyms), but no caption, CC pair or
# stage-2 pair does: as a real LLM knows from web text that 'scarlet' is red, and CLIP never sees it paired.
SYNONYM_EN = {"red": "scarlet", "orange": "amber", "yellow": "golden", "green": "emerald", "cyan": "turquoise",
              "blue": "azure", "purple": "violet", "pink": "rose", "brown": "chestnut", "white": "ivory",
              "black": "ebony", "gray": "slate", "small": "little", "medium": "midsize", "large": "big",
              "picture": "drawing", "shapes": "figures", "background": "backdrop"}


def plural_en(shape: str, n: int) -> str:
    if n == 1:
        return shape
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


def noun_en(o: ShapeObject, *, size: bool = True, style: bool = False) -> str:
    """'large striped red circle' (the article is left to the template)."""
    words = [o.size] if size else []
    if style:
        words.append(STYLE_EN[o.style])
    return " ".join([*words, o.color, o.shape])


def noun_zh(o: ShapeObject, *, size: bool = True, style: bool = False) -> str:
    """'大的条纹红色圆形'."""
    prefix = SIZE_ZH[o.size] + "的" if size else ""
    return prefix + (STYLE_ZH[o.style] if style else "") + COLOR_ZH[o.color] + SHAPE_ZH[o.shape]


def join_en(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def join_zh(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return "、".join(items[:-1]) + "和" + items[-1]


def count_en(n: int) -> str:
    return NUMBER_EN[n] if n < len(NUMBER_EN) else str(n)


def count_zh(n: int) -> str:
    return NUMBER_ZH[n] if n < len(NUMBER_ZH) else str(n)


def _switch_table() -> list[tuple[str, str]]:
    """English phrase -> Chinese, longest first so 'top left corner' wins over 'left'."""
    pairs = [*COLOR_ZH.items(), *SHAPE_ZH.items(), *STYLE_ZH.items(),
             *((f"{s}s" if not s.endswith("s") else f"{s}es", z) for s, z in SHAPE_ZH.items()),
             *((size, z) for size, z in SIZE_ZH.items()),
             *((POSITION_EN[c].split(" ", 1)[1], POSITION_ZH[c]) for c in POSITION_EN),  # drop 'in'/'at'/'on'
             *((n, z) for n, z in zip(NUMBER_EN[1:], NUMBER_ZH[1:], strict=True))]
    return sorted(pairs, key=lambda p: -len(p[0]))


SWITCH_EN_ZH = _switch_table()


@functools.cache
def _switcher(to: str):
    """(compiled pattern, lookup) for one direction, built once: code_switch runs per corpus line."""
    import re

    table = SWITCH_EN_ZH if to == "zh" else sorted(((z, e) for e, z in SWITCH_EN_ZH), key=lambda p: -len(p[0]))
    alternatives = "|".join(re.escape(a) for a, _ in table)
    # English words need word boundaries; Chinese has none between words
    return re.compile(rf"\b({alternatives})\b" if to == "zh" else f"({alternatives})"), dict(table)


def code_switch(text: str, rng, p: float = 0.5, to: str = "zh") -> str:
    """Replace world words with their translation, each occurrence with probability p (CoSDA-ML-style
    code-switching). A tiny LM pretrained on such text learns that 'red' and '红色' are interchangeable,
    as a multilingual LLM learns from mixed-language web text."""
    pattern, lookup = _switcher(to)
    return pattern.sub(lambda m: lookup[m.group(0)] if rng.random() < p else m.group(0), text)


@functools.cache
def _synonym_pattern():
    import re

    return re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(SYNONYM_EN, key=len, reverse=True)) + r")\b",
                      re.IGNORECASE)


def synonymize(text: str, rng=None, p: float = 1.0) -> str:
    """Replace world words with their SYNONYM_EN synonym, each occurrence with probability p (every one
    when rng is None); a capitalised word stays capitalised."""
    def swap(m) -> str:
        word = m.group(0)
        if rng is not None and rng.random() >= p:
            return word
        synonym = SYNONYM_EN[word.lower()]
        return synonym.capitalize() if word[0].isupper() else synonym

    return _synonym_pattern().sub(swap, text)


def synonym_sentences() -> list[str]:
    """Plain statements of each synonym, for the LM's corpus."""
    return [line for word, synonym in SYNONYM_EN.items()
            for line in (f"{synonym.capitalize()} means {word}.", f"The word {word} can also be said as {synonym}.")]
