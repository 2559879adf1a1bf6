"""Draw a `Scene` with PIL. Shapes are drawn at 4x and downsampled, so edges are anti-aliased."""

from __future__ import annotations

import math

from PIL import Image, ImageChops, ImageDraw

from .world import BACKGROUNDS, COLORS, GRID, SIZES, Scene, ShapeObject

SUPERSAMPLE = 4
SIZE_TO_RADIUS = dict(zip(SIZES, (0.22, 0.32, 0.44), strict=True))  # fraction of a grid cell


def _regular_polygon(cx: float, cy: float, r: float, sides: int, rotation: float) -> list[tuple]:
    return [
        (cx + r * math.cos(rotation + 2 * math.pi * k / sides), cy + r * math.sin(rotation + 2 * math.pi * k / sides))
        for k in range(sides)
    ]


def _star(cx: float, cy: float, r: float) -> list[tuple]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + math.pi * k / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def _cross(cx: float, cy: float, r: float) -> list[tuple]:
    t = r * 0.35  # half the bar width
    return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
            (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
            (cx - r, cy - t), (cx - t, cy - t)]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple] | None:
    """Polygon vertices of a shape, or None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        return _regular_polygon(cx, cy, r * 1.0, 4, math.pi / 4)
    if shape == "diamond":
        return _regular_polygon(cx, cy, r, 4, -math.pi / 2)
    if shape == "triangle":
        return _regular_polygon(cx, cy, r, 3, -math.pi / 2)
    if shape == "pentagon":
        return _regular_polygon(cx, cy, r, 5, -math.pi / 2)
    if shape == "hexagon":
        return _regular_polygon(cx, cy, r, 6, 0.0)
    if shape == "star":
        return _star(cx, cy, r)
    if shape == "cross":
        return _cross(cx, cy, r)
    raise ValueError(f"unknown shape {shape!r}")


def _object_mask(obj: ShapeObject, canvas: int) -> Image.Image:
    """An 'L' mask (255 = paint) for one object on a canvas x canvas supersampled image."""
    cell = canvas / GRID
    cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
    r = SIZE_TO_RADIUS[obj.size] * cell
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    poly = _outline(obj.shape, cx, cy, r)
    width = max(2, round(cell * 0.07))
    if obj.style == "outlined":
        if poly is None:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=width)
        else:
            draw.line([*poly, poly[0], poly[1]], fill=255, width=width, joint="curve")
        return mask
    if poly is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(poly, fill=255)
    if obj.style == "striped":
        stripes = Image.new("L", (canvas, canvas), 255)
        sdraw = ImageDraw.Draw(stripes)
        period = max(4, round(cell * 0.16))
        for y in range(0, canvas, period):
            sdraw.rectangle((0, y, canvas, y + period // 2 - 1), fill=0)
        mask = ImageChops.multiply(mask, stripes)
    return mask


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """RGB image of `scene`, image_size x image_size pixels."""
    canvas = image_size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        image.paste(COLORS[obj.color], (0, 0), _object_mask(obj, canvas))
    return image.resize((image_size, image_size), Image.Resampling.BOX)
