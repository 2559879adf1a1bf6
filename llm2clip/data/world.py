"""The shapes world: scenes of 2-6 coloured shapes on a 3x3 grid, sampled deterministically.

A scene is pure data (no pixels, no words). `render.py` draws it and `captions.py` describes it,
so every caption, attribute file and Q&A answer is true of its image by construction.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "pentagon", "diamond", "cross")
# Saturated colours that stay distinct from every background and from each other after resizing.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 130, 20),
    "yellow": (240, 215, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (35, 75, 220),
    "purple": (135, 55, 190),
    "pink": (245, 120, 185),
    "brown": (125, 80, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SIZES = ("small", "medium", "large")
STYLES = ("solid", "outlined", "striped")
GRID = 3  # positions are cells of a GRID x GRID grid, one object per cell
MIN_OBJECTS, MAX_OBJECTS = 2, 6


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    style: str
    row: int  # 0 = top
    col: int  # 0 = left

    @property
    def salience(self) -> int:
        """Bigger and solid objects are what a short, CLIP-style caption mentions first."""
        return 2 * SIZES.index(self.size) + (self.style == "solid")


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str

    def to_dict(self) -> dict:
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(ShapeObject(**o) for o in d["objects"]), d["background"])

    def signature(self) -> tuple:
        """Order-free identity, used to keep train/val/test disjoint."""
        return (self.background, tuple(sorted((o.row, o.col, o.shape, o.color, o.size, o.style)
                                              for o in self.objects)))

    def by_salience(self) -> list[ShapeObject]:
        # Stable sort: ties keep reading order (top-left first).
        return sorted(self.reading_order(), key=lambda o: -o.salience)

    def reading_order(self) -> list[ShapeObject]:
        return sorted(self.objects, key=lambda o: (o.row, o.col))


def sample_scene(rng: random.Random, min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS) -> Scene:
    if not 1 <= min_objects <= max_objects <= GRID * GRID:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}, "
                         f"got {min_objects}..{max_objects}")
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n)
    objects = tuple(
        ShapeObject(
            shape=rng.choice(SHAPES),
            color=rng.choice(list(COLORS)),
            size=rng.choice(SIZES),
            # Most objects are solid so colour stays the dominant visual cue, as in photos.
            style=rng.choices(STYLES, weights=(6, 2, 2))[0],
            row=r,
            col=c,
        )
        for r, c in cells
    )
    return Scene(objects, rng.choice(list(BACKGROUNDS)))


def relation(a: ShapeObject, b: ShapeObject) -> tuple[str, str]:
    """Where `a` lies relative to `b` as (vertical, horizontal): each '' or 'above'/'below', 'left'/'right'."""
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horizontal = "left" if a.col < b.col else "right" if a.col > b.col else ""
    return vertical, horizontal
