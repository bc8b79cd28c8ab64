"""LLaVA-NeXT anyres arithmetic (visprune/models/anyres.py) against transformers' own processor and model."""

import random
import time

import numpy as np
import pytest
import torch
from PIL import Image

from visprune.errors import ConfigError, ImageLoadError
from visprune.models.anyres import (
    _count_range, anyres_layout, bucket_for, default_buckets, layout_for_config, pack_tile_features,
    pack_tile_scores, packed_token_index, visual_count_range,
)
from visprune.models.tiny_next import LLAVA_V1_6_PINPOINTS, build_tiny_next_config, build_tiny_next_processor

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)[:, None, None]
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)[:, None, None]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_next_processor()


@pytest.fixture(scope="module")
def config(processor):
    return build_tiny_next_config(processor.tokenizer)


@pytest.fixture(scope="module")
def next_model(config):
    """A real (randomly initialised) tiny LlavaNextModel: its pack_image_features is the reference."""
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).model.eval()


def _image(height, width, seed=0):
    if height * width > 1_000_000:  # giants only need the right size: a flat image keeps the test fast
        return Image.new("RGB", (width, height), (seed, 128, 64))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _sizes():
    """>= 200 (H, W): named cases, extremes (strips, very wide, squares, pinpoint edges) and seeded random ones."""
    named = [(336, 336), (480, 640), (640, 480), (720, 1280), (1080, 1920), (427, 640), (2000, 2000), (1, 1),
             (9, 1), (1, 17), (1, 40), (40, 1), (2, 3000), (3000, 2), (20, 600), (600, 20), (100, 5000),
             (5000, 100), (336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008), (335, 1009), (337, 673),
             (512, 512), (4000, 4000), (8000, 8000), (8192, 7), (3, 8192), (224, 224), (375, 500), (300, 1000),
             (1000, 300), (768, 1024), (1024, 768), (1, 8192), (8192, 1)]
    squares = [(s, s) for s in (2, 7, 14, 100, 250, 335, 337, 400, 511, 513, 700, 1007, 1009, 1500)]
    rng = random.Random(1234)
    randoms = [(rng.randint(1, 2500), rng.randint(1, 2500)) for _ in range(140)]
    randoms += [(rng.randint(1, 60), rng.randint(200, 4000)) for _ in range(20)]  # thin strips
    randoms += [(rng.randint(200, 4000), rng.randint(1, 60)) for _ in range(20)]
    return named + squares + randoms


def _processor_count(processor, height, width, image=None):
    image = image or _image(height, width)
    encoded = processor(images=image, text="<image>", return_tensors="np")
    return int((encoded["input_ids"] == processor.image_token_id).sum()), encoded


def test_num_visual_matches_the_processor_and_the_model_on_200_sizes(processor, config, next_model):
    sizes = _sizes()
    assert len(sizes) >= 200
    started, checked, rejected = time.perf_counter(), 0, 0
    for height, width in sizes:
        count, encoded = _processor_count(processor, height, width)
        try:
            layout = layout_for_config((height, width), config)
        except ImageLoadError:
            # transformers keeps no grid token here: only the base view and the newlines of an empty grid.
            assert count - 576 in (0, 24, 48, 72), (height, width, count)
            rejected += 1
            continue
        assert layout.num_visual == count, (height, width)
        assert encoded["pixel_values"].shape[1] == layout.num_views, (height, width)
        assert tuple(encoded["image_sizes"][0]) == (height, width)
        assert _model_packed_length(next_model, layout) == count, (height, width)
        checked += 1
    assert checked >= 200 and rejected >= 4  # the strips (1, 2000)-like really are rejected
    assert time.perf_counter() - started < 30


def _model_packed_length(model, layout):
    features = torch.zeros(layout.num_views, layout.base_tokens, model.config.text_config.hidden_size)
    packed, lengths = model.pack_image_features([features], torch.tensor([layout.image_size]), "default",
                                                image_newline=model.image_newline)
    return int(lengths[0])


@pytest.mark.parametrize("size", [(336, 336), (480, 640), (640, 480), (720, 1280), (300, 1000), (1000, 300),
                                  (20, 600), (9, 1), (337, 673), (2000, 2000)])
def test_pack_tile_features_equals_transformers(size, config, next_model):
    layout = layout_for_config(size, config)
    rng = np.random.default_rng(sum(size))
    tiles = rng.standard_normal((layout.num_views, layout.base_tokens, 64)).astype(np.float32)
    newline = next_model.image_newline.detach().numpy()
    expected, _ = next_model.pack_image_features([torch.from_numpy(tiles)], torch.tensor([size]), "default",
                                                 image_newline=next_model.image_newline)
    packed = pack_tile_features(tiles, layout, newline)
    assert packed.shape == (layout.num_visual, 64)
    np.testing.assert_array_equal(packed, expected[0].detach().numpy())


@pytest.mark.parametrize("size", [(480, 640), (1000, 300), (20, 600)])
def test_pack_tile_scores_is_the_same_gather_with_one_value_per_token(size, config, next_model):
    layout = layout_for_config(size, config)
    scores = np.random.default_rng(7).random((layout.num_views, layout.base_tokens)).astype(np.float32)
    expected, _ = next_model.pack_image_features([torch.from_numpy(scores[..., None])], torch.tensor([size]),
                                                 "default", image_newline=torch.tensor([-1.5]))
    packed = pack_tile_scores(scores, layout, newline_score=-1.5)
    np.testing.assert_array_equal(packed, expected[0][:, 0].numpy())
    index = packed_token_index(layout)
    assert (packed[index < 0] == -1.5).all() and (index < 0).sum() == layout.unpadded[0]


def test_packing_rejects_tiles_of_the_wrong_count(config):
    layout = layout_for_config((480, 640), config)
    padded = np.zeros((layout.num_views + 1, 576, 8), np.float32)  # e.g. a batch-padded pixel_values row
    with pytest.raises(ValueError, match="num_views"):
        pack_tile_features(padded, layout, np.zeros(8, np.float32))


@pytest.mark.parametrize("size", [(480, 640), (1000, 300), (300, 1000), (700, 700), (50, 90)])
def test_crop_boxes_cut_the_same_tiles_as_the_image_processor(size, processor, config):
    """Resize into content_box, pad to best_resolution, cut crop_boxes: equal to the processor's pixel_values."""
    height, width = size
    image = _image(height, width, seed=3)
    layout = layout_for_config(size, config)
    _, encoded = _processor_count(processor, height, width, image)
    left, top, right, bottom = layout.content_box
    canvas = np.zeros((*layout.best_resolution, 3), np.uint8)
    canvas[top:bottom, left:right] = np.asarray(image.resize((right - left, bottom - top), Image.BICUBIC))
    assert len(layout.crop_boxes) == layout.num_views - 1
    for view, (x0, y0, x1, y1) in enumerate(layout.crop_boxes, start=1):
        tile = (canvas[y0:y1, x0:x1].transpose(2, 0, 1).astype(np.float32) / 255.0 - MEAN) / STD
        np.testing.assert_allclose(tile, encoded["pixel_values"][0, view], atol=1e-5, err_msg=f"{size} {view}")
    base = np.asarray(image.resize((336, 336), Image.BICUBIC)).transpose(2, 0, 1) / np.float32(255.0)
    np.testing.assert_allclose((base - MEAN) / STD, encoded["pixel_values"][0, 0], atol=1e-5)


def test_typical_counts_and_layouts(config):
    expected = {(336, 336): ((336, 672), (24, 24), 1176), (480, 640): ((672, 672), (36, 48), 2340),
                (640, 480): ((672, 672), (48, 36), 2352), (720, 1280): ((672, 672), (28, 48), 1948),
                (2000, 2000): ((672, 672), (48, 48), 2928), (300, 1000): ((336, 1008), (22, 72), 2182)}
    for size, (best, unpadded, n) in expected.items():
        layout = layout_for_config(size, config)
        assert (layout.best_resolution, layout.unpadded, layout.num_visual) == (best, unpadded, n), size
    layout = layout_for_config((480, 640), config)
    assert layout.grid == (2, 2) and layout.num_views == 5 and layout.unpad_offset == (6, 0)
    assert layout.crop_boxes == ((0, 0, 336, 336), (336, 0, 672, 336), (0, 336, 336, 672), (336, 336, 672, 672))


def test_count_range_bounds_every_size_and_is_fast(config):
    _count_range.cache_clear()
    started = time.perf_counter()
    low, high = visual_count_range(config)
    assert time.perf_counter() - started < 0.5
    assert (low, high) == (648, 2928)
    assert layout_for_config((9, 1), config).num_visual == low  # both ends are reached
    assert layout_for_config((672, 672), config).num_visual == high
    rng = np.random.default_rng(5)
    for height, width in zip(rng.integers(1, 3000, 3000), rng.integers(1, 3000, 3000)):
        try:
            n = layout_for_config((int(height), int(width)), config).num_visual
        except ImageLoadError:
            continue
        assert low <= n <= high, (height, width)


def test_default_buckets_cover_the_range_with_no_waste_on_common_sizes(config):
    buckets = default_buckets(config)
    assert buckets == (1176, 1948, 2352, 2928)
    assert buckets[-1] == visual_count_range(config)[1]
    for size in [(336, 336), (720, 1280), (640, 480)]:
        n = layout_for_config(size, config).num_visual
        assert bucket_for(n, buckets) == n
    assert bucket_for(layout_for_config((480, 640), config).num_visual, buckets) == 2352
    assert bucket_for(648, buckets) == 1176
    with pytest.raises(ConfigError, match="exceed the largest bucket"):
        bucket_for(2929, buckets)


@pytest.mark.parametrize("size,match", [((0, 10), "empty"), ((10, -1), "empty"), ((9000, 10), "too large"),
                                        ((8000, 8100), "too large"), ((1, 2000), "too thin"),
                                        ((2000, 1), "too thin")])
def test_bad_image_sizes_are_rejected_with_a_hint(size, match):
    with pytest.raises(ImageLoadError, match=match) as info:
        anyres_layout(size, LLAVA_V1_6_PINPOINTS)
    assert "Hint:" in str(info.value)


def test_pinpoints_must_be_whole_tiles_and_config_must_be_anyres():
    with pytest.raises(ConfigError, match="multiples"):
        anyres_layout((100, 100), [[336, 500]])
    from visprune.models.llava import llava_1_5_7b_config

    with pytest.raises(ConfigError, match="no image_grid_pinpoints"):
        layout_for_config((100, 100), llava_1_5_7b_config())
