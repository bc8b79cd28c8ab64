"""LLaVA-NeXT "anyres" arithmetic on the host: which tiles an image is cut into and how their features are packed.

Pure Python + NumPy (no torch), so the runtime can know N (the visual token count) from the image size alone,
before any vision tower runs. Every number here mirrors transformers' llava_next code (5.x):
`select_best_resolution` (image_processing_utils), `get_patch_output_size` + `_pad_for_patching` +
`divide_to_patches` (the image processor), `unpad_image` + `pack_image_features` (modeling) and
`_get_number_of_features` (the processor). tests/visprune/test_anyres.py checks each against transformers.

Shapes: V views (1 base + rows*cols tiles), P tokens per view (576 at 336/14), D hidden, N packed visual tokens.
All sizes are (height, width); boxes are (left, top, right, bottom) in pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from visprune.errors import ConfigError, ImageLoadError

# Larger images gain nothing (the largest v1.6 pinpoint is 1008 px; everything is downscaled to it) but cost:
# the image processor converts the whole image to float32 before resizing (64 Mpx * 3 * 4 B = 768 MB), and PIL
# itself calls ~89 Mpx a decompression bomb. 8192 px per side also bounds the strips the enumeration below covers;
# the area limit (decimal, so below 8192^2) is what stops near-square giants.
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 64_000_000

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class AnyresLayout:
    """How one image becomes LLaVA-NeXT visual tokens."""

    image_size: tuple[int, int]          # original (H, W)
    best_resolution: tuple[int, int]     # chosen pinpoint (H, W)
    grid: tuple[int, int]                # tiles (rows, cols)
    crop_boxes: tuple[Box, ...]          # per tile, row-major, in the resized+padded best-resolution canvas
    unpadded: tuple[int, int]            # (ch, cw) tokens of the tile grid left after unpad
    base_tokens: int                     # tokens of the base view (576 at 336/14)
    content_box: Box = (0, 0, 0, 0)      # where the resized image sits inside the padded canvas

    @property
    def num_visual(self) -> int:
        """N: base view, unpadded grid, one image_newline per grid row."""
        ch, cw = self.unpadded
        return self.base_tokens + ch * cw + ch

    @property
    def num_views(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def tile_side(self) -> int:
        """Tokens per tile side (24 at 336/14)."""
        return math.isqrt(self.base_tokens)

    @property
    def unpad_offset(self) -> tuple[int, int]:
        """(top, left) of the unpadded window in the full token grid: unpad cuts the same on both sides."""
        rows, cols = self.grid
        ch, cw = self.unpadded
        return (rows * self.tile_side - ch) // 2, (cols * self.tile_side - cw) // 2


def anyres_layout(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int = 336,
                  patch_size: int = 14) -> AnyresLayout:
    """The layout of an image of `image_size` (H, W) under `pinpoints` [(H, W), ...]."""
    height, width = _checked_image_size(image_size)
    pins = _checked_pinpoints(pinpoints, tile_size)
    best_h, best_w = select_best_resolution((height, width), pins)
    rows, cols = best_h // tile_size, best_w // tile_size
    side = tile_size // patch_size
    unpadded = _unpadded_grid((height, width), rows * side, cols * side)
    if min(unpadded) <= 0:
        raise ImageLoadError(
            f"An image of {height}x{width} px (HxW) is too thin for LLaVA-NeXT: after unpadding its "
            f"{rows}x{cols}-tile grid keeps {unpadded[0]}x{unpadded[1]} tokens.",
            "Use an image whose aspect ratio is less extreme (pad or crop it to at most about 1:40), or a larger one.",
        )
    return AnyresLayout(
        image_size=(height, width), best_resolution=(best_h, best_w), grid=(rows, cols),
        crop_boxes=_tile_boxes(rows, cols, tile_size), unpadded=unpadded, base_tokens=side * side,
        content_box=_content_box((height, width), (best_h, best_w)),
    )


def layout_for_config(image_size: Sequence[int], config: Any) -> AnyresLayout:
    """`anyres_layout` with the pinpoints, tile and patch size of a transformers LlavaNextConfig."""
    pinpoints, tile_size, patch_size = _config_geometry(config)
    return anyres_layout(image_size, [list(p) for p in pinpoints], tile_size, patch_size)


def _config_geometry(config: Any) -> tuple[tuple[tuple[int, int], ...], int, int]:
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        raise ConfigError("The model config has no image_grid_pinpoints: it is not a LLaVA-NeXT (anyres) model.",
                          "Use a llava_next checkpoint (e.g. llava-hf/llava-v1.6-vicuna-7b-hf) or tiny-next.")
    if config.vision_feature_select_strategy != "default":
        # pack_image_features reshapes each tile to side x side tokens, so a kept CLS cannot be packed.
        raise ConfigError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r} is not "
                          "supported for LLaVA-NeXT.", "Use a checkpoint with the 'default' strategy (CLS dropped).")
    vision = config.vision_config
    return tuple((int(h), int(w)) for h, w in pinpoints), int(vision.image_size), int(vision.patch_size)


def select_best_resolution(image_size: tuple[int, int], pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """transformers' choice: the largest effective (downscaled, capped at original) area, ties to least waste;
    same float expressions, so the same choice on every edge."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_h, pin_w), effective, wasted
    return best


def _unpadded_grid(image_size: tuple[int, int], grid_h: int, grid_w: int) -> tuple[int, int]:
    """unpad_image on a grid_h x grid_w token grid: the padded axis loses `padding` on each side."""
    height, width = image_size
    if width / height > grid_w / grid_h:
        new_height = int(round(height * (grid_w / width), 7))
        return grid_h - 2 * ((grid_h - new_height) // 2), grid_w
    new_width = int(round(width * (grid_h / height), 7))
    return grid_h, grid_w - 2 * ((grid_w - new_width) // 2)


def _content_box(image_size: tuple[int, int], best: tuple[int, int]) -> Box:
    """get_patch_output_size (aspect-preserving resize, ceil on the short axis) then centred padding."""
    height, width = image_size
    best_h, best_w = best
    scale_w, scale_h = best_w / width, best_h / height
    if scale_w < scale_h:
        new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
    left, top = (best_w - new_w) // 2, (best_h - new_h) // 2
    return left, top, left + new_w, top + new_h


def _tile_boxes(rows: int, cols: int, tile: int) -> tuple[Box, ...]:
    return tuple((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols))


def _checked_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ImageLoadError(f"An image of {height}x{width} px (HxW) is empty.", "Pass an image at least 1 px each way.")
    if max(height, width) > MAX_IMAGE_SIDE or height * width > MAX_IMAGE_PIXELS:
        raise ImageLoadError(
            f"An image of {height}x{width} px (HxW) is too large (limits: {MAX_IMAGE_SIDE} px a side, "
            f"{MAX_IMAGE_PIXELS // 1_000_000} Mpx); LLaVA-NeXT downscales everything to at most 1008 px anyway.",
            f"Downscale the image to at most {MAX_IMAGE_SIDE} px on its longer side first.",
        )
    return height, width


def _checked_pinpoints(pinpoints: Sequence[Sequence[int]], tile_size: int) -> tuple[tuple[int, int], ...]:
    pins = tuple((int(h), int(w)) for h, w in pinpoints)
    if not pins or any(h <= 0 or w <= 0 or h % tile_size or w % tile_size for h, w in pins):
        # The model counts ceil(side/tile) tiles but views them as side//tile: only whole tiles agree.
        raise ConfigError(f"image_grid_pinpoints {list(pins)} must be non-empty multiples of the {tile_size} px tile.",
                          "Fix image_grid_pinpoints in the model's config.json.")
    return pins


# --- packing: the host-side pack_image_features for one image ---------------------------------------------------

def packed_token_index(layout: AnyresLayout) -> np.ndarray:
    """[N] int64 index into the flattened [V * P] tile tokens for each packed position, -1 for image_newline.

    Order: the base view's P tokens, then the unpadded grid row by row, each row followed by one newline.
    """
    side, (rows, cols), (ch, cw) = layout.tile_side, layout.grid, layout.unpadded
    top, left = layout.unpad_offset
    y = np.arange(top, top + ch)[:, None]                 # global token row in the stitched grid
    x = np.arange(left, left + cw)[None, :]               # global token column
    view = 1 + (y // side) * cols + x // side             # +1: view 0 is the base view
    grid_index = view * layout.base_tokens + (y % side) * side + x % side
    with_newline = np.concatenate([grid_index, np.full((ch, 1), -1)], axis=1)
    return np.concatenate([np.arange(layout.base_tokens), with_newline.reshape(-1)]).astype(np.int64)


def pack_tile_features(tile_features: np.ndarray, layout: AnyresLayout, image_newline: np.ndarray) -> np.ndarray:
    """[V, P, D] projected tile features (base view first, as the processor orders pixel_values) → [N, D]."""
    flat = _checked_tiles(np.asarray(tile_features), layout, 3).reshape(-1, tile_features.shape[-1])
    index = packed_token_index(layout)
    packed = flat[np.maximum(index, 0)]
    packed[index < 0] = np.asarray(image_newline, dtype=packed.dtype)
    return packed


def pack_tile_scores(tile_scores: np.ndarray, layout: AnyresLayout, newline_score: float) -> np.ndarray:
    """[V, P] one score per tile token (e.g. VisionZip's [CLS] attention) → [N], newlines get `newline_score`."""
    flat = _checked_tiles(np.asarray(tile_scores), layout, 2).reshape(-1)
    index = packed_token_index(layout)
    return np.where(index < 0, np.asarray(newline_score, dtype=flat.dtype), flat[np.maximum(index, 0)])


def _checked_tiles(values: np.ndarray, layout: AnyresLayout, ndim: int) -> np.ndarray:
    expected = (layout.num_views, layout.base_tokens)
    if values.ndim != ndim or values.shape[:2] != expected:
        # The processor pads pixel_values to the batch's largest view count: slice [:num_views] first.
        raise ValueError(f"tile values of shape {values.shape}, expected (num_views, base_tokens) = {expected}"
                         f"{' + (D,)' * (ndim == 3)} for the {layout.grid} grid")
    return values


# --- ranges and buckets ---------------------------------------------------------------------------------------------

def visual_count_range(config: Any) -> tuple[int, int]:
    """(min_N, max_N) over every image size accepted here (1..8192 px a side, at most 64 Mpx).

    A bounded enumeration (~55k sizes, ~0.15 s, cached per geometry). N only depends on the chosen pinpoint and
    the unpadded grid, whose thin axis bottoms out for strips, so sides are dense from 1 to 64 px (where those
    strips live), every pinpoint side +-1, then geometric in 3 % steps to 8192. min_N is the smallest count over
    that set (at v1.6: 648, a 9x1 px image; tests/visprune/test_anyres.py finds nothing lower among 3000 random
    sizes). max_N is exact: no image exceeds its pinpoint's full grid, and an image of a pinpoint's own size fills
    that grid (it is enumerated), so max_N is the largest full-grid count (2928 at v1.6).
    """
    return _count_range(*_config_geometry(config))


@lru_cache(maxsize=16)
def _count_range(pinpoints: tuple[tuple[int, int], ...], tile_size: int, patch_size: int) -> tuple[int, int]:
    sides = _enumerated_sides(pinpoints)
    side = tile_size // patch_size
    counts = set()
    for h in sides:
        for w in sides:
            if h * w <= MAX_IMAGE_PIXELS:
                counts.add(_count(h, w, pinpoints, tile_size, side))
    counts.discard(None)
    return min(counts), max(counts)


def _count(h: int, w: int, pinpoints, tile_size: int, side: int) -> int | None:
    best_h, best_w = select_best_resolution((h, w), pinpoints)
    ch, cw = _unpadded_grid((h, w), best_h // tile_size * side, best_w // tile_size * side)
    return side * side + ch * cw + ch if ch > 0 and cw > 0 else None


def _enumerated_sides(pinpoints) -> list[int]:
    sides = set(range(1, 65))
    for h, w in pinpoints:
        sides.update({h - 1, h, h + 1, w - 1, w, w + 1})
    value = 64.0
    while value < MAX_IMAGE_SIDE:
        sides.add(int(value))
        value *= 1.03
    sides.add(MAX_IMAGE_SIDE)
    return sorted(s for s in sides if 1 <= s <= MAX_IMAGE_SIDE)


def default_buckets(config: Any) -> tuple[int, ...]:
    """A few padded-N sizes a static engine can be built for; an image pads up to the smallest bucket >= its N.

    One bucket per common case, each the N of that case, so it wastes nothing there:
    * a tile-sized square (336x336; also every image up to 336 px, which all pick the smallest pinpoint) → 1176
      at v1.6; it is also the floor bucket for thin strips (N down to min_N);
    * 16:9 video frames and screenshots (720x1280, 1080x1920) → 1948;
    * 4:3 photos in either orientation (480x640 gives 2340, 640x480 gives 2352): the larger, so both fit → 2352;
      COCO's 427x640 (2144) pads to it too (9 % waste);
    * max_N (any square >= ~512 px) → 2928.
    """
    tile = int(config.vision_config.image_size)

    def n(h: int, w: int) -> int:
        return layout_for_config((h, w), config).num_visual

    buckets = {n(tile, tile), n(720, 1280), max(n(480, 640), n(640, 480)), visual_count_range(config)[1]}
    return tuple(sorted(buckets))


def bucket_for(num_visual: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `num_visual` tokens."""
    for bucket in sorted(buckets):
        if bucket >= num_visual:
            return bucket
    raise ConfigError(f"{num_visual} visual tokens exceed the largest bucket {max(buckets)}.",
                      "Add a bucket of at least max_N (visual_count_range) to the bucket set.")
