"""LLaVA-NeXT's 'anyres' images: a high-resolution grid of tower-sized tiles plus a downscaled base image.

    image (W x H) -> best grid resolution [h, w] among image_grid_pinpoints -> resize (aspect kept) and
    pad with black -> (h/S) x (w/S) tiles of S x S, row by row; the base is the whole image resized to S x S
    pixels: [1 + tiles, 3, S, S], base first

    features [1 + tiles, N, D] -> 'flat': every crop's N rows in order; 'spatial': base, then the tiles'
    rows re-laid as one (h/S*side) x (w/S*side) map, row-major; 'spatial_unpad': the same map with the
    padding's rows (or columns) cut away and `image_newline` appended at the end of each row

The semantics are LLaVA-NeXT's (llava/mm_utils.py, llava/model/llava_arch.py) with transformers'
conventions, so the token count and order equal stock `LlavaNextForConditionalGeneration`'s:
pinpoints are [height, width] (LLaVA-NeXT reads them as (width, height); its published lists are
symmetric, so both agree) and unpadding rounds as transformers does. `image_sizes` handed to the model
are PIL's (width, height), as in LLaVA-NeXT.
"""

from __future__ import annotations

import ast
import math
import re

import torch

from llm2clip.errors import ConfigError

MERGE_TYPES = ("flat", "spatial", "spatial_unpad")
# LLaVA-NeXT's default pinpoints for a 336 px tower; other tower sizes need their own
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def parse_grid_pinpoints(value, tile: int) -> list[list[int]]:
    """[[h, w], ...] from a list, its string form "[(336, 672), ...]" or LLaVA-NeXT's range "(1x1),...,(3x3)"
    (every grid from the first to the last, in tiles of `tile` pixels). Each side must be a multiple of `tile`."""
    if isinstance(value, str) and re.search(r"\d+x\d+", value):
        ends = re.findall(r"\((\d+)x(\d+)\)", value)
        if not ends:
            raise ConfigError(f"image_grid_pinpoints '{value}': write the range as '(1x1),...,(3x3)'")
        (r0, c0), (r1, c1) = map(int, ends[0]), map(int, ends[-1])
        value = [[r * tile, c * tile] for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    elif isinstance(value, str):
        try:
            value = ast.literal_eval(value)  # literals only: no code runs
        except (ValueError, SyntaxError):
            raise ConfigError(f"image_grid_pinpoints '{value}' is not a list of [height, width] pairs, e.g. "
                              "'[[336, 672], [672, 336], [672, 672]]' or '(1x1),...,(3x3)'") from None
    pairs = [list(p) for p in value] if isinstance(value, list | tuple) else []
    if not pairs or any(len(p) != 2 or not all(isinstance(x, int) and x > 0 for x in p) for p in pairs):
        raise ConfigError(f"image_grid_pinpoints {value!r}: give a non-empty list of [height, width] pairs")
    bad = [p for p in pairs if p[0] % tile or p[1] % tile]
    if bad:
        raise ConfigError(f"image_grid_pinpoints {bad} are not multiples of the tower's {tile} px input; use "
                          f"multiples of {tile}, e.g. [[{tile}, {2 * tile}], [{2 * tile}, {tile}]]")
    return pairs


def select_best_resolution(size_hw: tuple[int, int], resolutions: list[list[int]]) -> tuple[int, int]:
    """The [h, w] that keeps the most of the image's pixels after an aspect-kept fit, then wastes the least."""
    height, width = size_hw
    best, best_effective, best_waste = None, -1, math.inf
    for h, w in resolutions:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


def grid_shape(size_hw: tuple[int, int], pinpoints: list[list[int]], tile: int) -> tuple[int, int]:
    """(rows, columns) of tiles for an image of `size_hw`."""
    h, w = select_best_resolution(size_hw, pinpoints)
    return h // tile, w // tile


def resize_and_pad(image, target_hw: tuple[int, int]):
    """Fit `image` (PIL) into target_hw keeping its aspect ratio, centred on black."""
    from PIL import Image

    width, height = image.size
    th, tw = target_hw
    if tw / width < th / height:
        new_w, new_h = tw, min(math.ceil(height * tw / width), th)
    else:
        new_w, new_h = min(math.ceil(width * th / height), tw), th
    canvas = Image.new("RGB", (tw, th), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((tw - new_w) // 2, (th - new_h) // 2))
    return canvas


def anyres_crops(image, pinpoints: list[list[int]], tile: int) -> list:
    """[base, tile_0_0, tile_0_1, ...]: PIL images of tile x tile pixels."""
    from PIL import Image

    th, tw = select_best_resolution((image.height, image.width), pinpoints)
    padded = resize_and_pad(image, (th, tw))
    tiles = [padded.crop((x, y, x + tile, y + tile)) for y in range(0, th, tile) for x in range(0, tw, tile)]
    return [image.resize((tile, tile), Image.Resampling.BICUBIC), *tiles]


def process_anyres_image(image, image_processor, pinpoints: list[list[int]]) -> torch.Tensor:
    """[1 + tiles, 3, S, S]: every crop through the tower's own processor (normalisation; sizes already fit)."""
    tile = image_processor.crop_size["height"]
    crops = anyres_crops(image.convert("RGB"), pinpoints, tile)
    return image_processor(crops, return_tensors="pt")["pixel_values"]


def unpad(features: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """[D, H, W] feature map of the padded grid -> the rows (or columns) that hold the image."""
    height, width = size_hw
    current_h, current_w = features.shape[1:]
    if width / height > current_w / current_h:  # padding was added above and below
        new_h = int(round(height * current_w / width, 7))
        pad = (current_h - new_h) // 2
        return features[:, pad: current_h - pad, :]
    new_w = int(round(width * current_h / height, 7))
    pad = (current_w - new_w) // 2
    return features[:, :, pad: current_w - pad]


def merge_crops(features: torch.Tensor, size_hw: tuple[int, int], pinpoints: list[list[int]] | None, tile: int,
                merge_type: str, newline: torch.Tensor | None) -> torch.Tensor:
    """[1 + tiles, N, D] projected features of one image -> [T, D] rows for the LM (see the module doc)."""
    if merge_type == "flat":
        return features.flatten(0, 1)
    if len(features) == 1:  # a plain (non-anyres) image or a text-only sample's placeholder
        single = features[0]
        return torch.cat([single, newline[None].to(single)]) if "unpad" in merge_type else single
    base, grid = features[0], features[1:]
    side = math.isqrt(base.shape[0])
    if side * side != base.shape[0]:
        raise ConfigError(f"spatial merging needs a square patch grid, got {base.shape[0]} features per crop; "
                          "use --mm_vision_select_feature patch (no CLS)")
    rows, cols = grid_shape(size_hw, pinpoints, tile)
    if rows * cols != len(grid):
        raise ConfigError(f"an image of {size_hw[1]}x{size_hw[0]} px needs {rows}x{cols} tiles but {len(grid)} "
                          "were passed; give image_sizes as (width, height) of the original image")
    grid = grid.view(rows, cols, side, side, -1)  # [rows, cols, side, side, D]
    if "unpad" not in merge_type:
        return torch.cat([base, grid.permute(0, 2, 1, 3, 4).flatten(0, 3)])
    plane = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [D, rows*side, cols*side]
    plane = unpad(plane, size_hw)
    column = newline.to(plane)[:, None, None].expand(-1, plane.shape[1], 1)  # [D, H', 1]
    plane = torch.cat([plane, column], dim=-1)  # [D, H', W' + 1]
    return torch.cat([base, plane.flatten(1, 2).transpose(0, 1)])


def num_image_tokens(size_hw: tuple[int, int], pinpoints: list[list[int]] | None, tile: int, side: int,
                     merge_type: str) -> int:
    """Rows `merge_crops` yields for an image of `size_hw` (without running the tower); no pinpoints: one crop."""
    if not pinpoints:
        return side * side + int("unpad" in merge_type)
    rows, cols = grid_shape(size_hw, pinpoints, tile)
    if "unpad" not in merge_type:  # 'flat' and 'spatial' keep every tile's rows
        return side * side * (1 + rows * cols)
    plane = unpad(torch.empty(0, rows * side, cols * side), size_hw)
    return side * side + plane.shape[1] * (plane.shape[2] + 1)
