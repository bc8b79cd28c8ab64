"""The embedded tiny-next (LLaVA-NeXT architecture, tiny-vqa's weights) and NeXT support in the model adapter."""

import numpy as np
import pytest
import torch
from PIL import Image

from visprune.artifacts import sha256_file
from visprune.models import chat_prompt, encode_image_prompt, load_llava
from visprune.models.anyres import layout_for_config, pack_tile_features
from visprune.models.llava import (
    LanguageModelShape, architecture_fingerprint, is_anyres, llava_1_5_7b_config, load_llava_config,
    num_visual_tokens,
)
from visprune.models.tiny_next import build_tiny_next


@pytest.fixture(scope="module")
def tiny_next():
    return load_llava("tiny-next")


@pytest.fixture(scope="module")
def tiny_vqa():
    return load_llava("tiny-vqa")


def _photo(height, width, seed=0):
    """A smooth synthetic picture (gradients + a disc): resizing it is well conditioned, unlike pure noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((y - height / 2) ** 2 + (x - width / 3) ** 2 < (min(height, width) / 4) ** 2) * 120.0
    rgb = np.stack([255 * x / width, 255 * y / height, disc + seed], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def test_tiny_next_builds_byte_identically(tmp_path, tiny_next):
    build_tiny_next(tmp_path / "a")
    build_tiny_next(tmp_path / "b")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json"):
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name), name
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tiny_next.path / name), name  # and the cache's


def test_tiny_next_is_a_llava_next_with_tiny_vqas_weights(tiny_next, tiny_vqa):
    assert type(tiny_next.model).__name__ == "LlavaNextForConditionalGeneration" and tiny_next.name == "tiny-next"
    assert is_anyres(tiny_next.config) and not is_anyres(tiny_vqa.config)
    assert tiny_next.config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert "tiny-next-v1-" in tiny_next.path.name
    trained = tiny_vqa.model.state_dict()
    for name, value in tiny_next.model.state_dict().items():
        if name != "model.image_newline":
            assert torch.equal(value, trained[name]), name
    newline = tiny_next.model.model.image_newline
    assert newline.shape == (64,) and 0.5 < newline.std().item() * 64 ** 0.5 < 1.5  # ~ N(0, 1/D), seeded


def test_load_llava_gives_the_logits_of_a_direct_from_pretrained(tiny_next):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    direct = LlavaNextForConditionalGeneration.from_pretrained(tiny_next.path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_next.path)
    prompt = chat_prompt(processor, "What is shown?")
    inputs = processor(images=_photo(480, 640), text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 5, 3, 336, 336) and inputs["image_sizes"].tolist() == [[480, 640]]
    with torch.no_grad():
        ours = tiny_next.model(**inputs).logits
        theirs = direct(**inputs).logits
    assert ours.shape[1] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_encoded_prompt_carries_the_image_sizes_and_the_anyres_count(tiny_next):
    prompt = chat_prompt(tiny_next.processor, "What is shown?")
    encoded = encode_image_prompt(tiny_next.processor, _photo(720, 1280), prompt, tiny_next.image_token_id)
    assert encoded.num_visual == layout_for_config((720, 1280), tiny_next.config).num_visual == 1948
    assert encoded.image_sizes.tolist() == [[720, 1280]]


def test_shape_of_tiny_next_is_anyres_with_its_range(tiny_next, tiny_vqa):
    shape = tiny_next.shape
    assert shape.anyres and shape.visual_token_range == (648, 2928) and shape.num_visual_tokens == 2928
    assert num_visual_tokens(tiny_next.config) == 2928
    assert not tiny_vqa.shape.anyres and tiny_vqa.shape.visual_token_range is None
    assert tiny_vqa.shape.num_visual_tokens == 576
    assert (shape.num_layers, shape.hidden_size) == (tiny_vqa.shape.num_layers, tiny_vqa.shape.hidden_size)
    assert tiny_next.fingerprint != tiny_vqa.fingerprint


def test_shape_only_llava_v1_6_vicuna_7b():
    config = load_llava_config("llava-v1.6-vicuna-7b")
    shape = LanguageModelShape.from_config(config)
    assert is_anyres(config) and shape.visual_token_range == (648, 2928) and shape.num_visual_tokens == 2928
    seven_b = LanguageModelShape.from_config(llava_1_5_7b_config())
    assert (shape.num_layers, shape.hidden_size, shape.intermediate_size) == (32, 4096, 11008)
    assert (seven_b.num_visual_tokens, seven_b.anyres) == (576, False)
    assert architecture_fingerprint(config) != architecture_fingerprint(llava_1_5_7b_config())


def test_base_view_features_equal_tiny_vqas_features_of_a_square_image(tiny_next, tiny_vqa):
    """For a square image the NeXT base view (resize to 336x336) is exactly LLaVA-1.5's resize + centre crop,
    and both models share the vision tower and projector: the first 576 packed features are tiny-vqa's."""
    image = _photo(500, 500, seed=9)
    next_inputs = tiny_next.processor(images=image, text="<image>", return_tensors="pt")
    vqa_pixels = tiny_vqa.processor(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(next_inputs["pixel_values"][0, :1], vqa_pixels, rtol=0, atol=0)
    with torch.no_grad():
        packed = tiny_next.model.get_image_features(next_inputs["pixel_values"], next_inputs["image_sizes"])
        base = tiny_vqa.model.get_image_features(vqa_pixels)
    packed = packed.pooler_output[0]
    base = base.pooler_output[0] if hasattr(base, "pooler_output") else base[0]
    assert packed.shape == (2928, 64)
    torch.testing.assert_close(packed[:576], base.reshape(576, 64), rtol=0, atol=1e-6)


def test_host_packing_reproduces_the_models_packed_features(tiny_next):
    """Vision tower + projector per view in torch, then anyres.pack_tile_features on the host: the model's own."""
    image = _photo(300, 1000, seed=4)
    inputs = tiny_next.processor(images=image, text="<image>", return_tensors="pt")
    layout = layout_for_config((300, 1000), tiny_next.config)
    model = tiny_next.model.model
    with torch.no_grad():
        hidden = model.vision_tower(inputs["pixel_values"][0], output_hidden_states=True).hidden_states[-2]
        tiles = model.multi_modal_projector(hidden[:, 1:]).numpy()
        packed = tiny_next.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    host = pack_tile_features(tiles, layout, model.image_newline.detach().numpy())
    np.testing.assert_allclose(host, packed.numpy(), rtol=0, atol=1e-6)
    assert host.shape == (2182, 64)


def test_onnx_set_manifest_keeps_llava_1_5_shapes_as_before_and_round_trips_the_range():
    from visprune.manifests.onnx_set import OnnxSetManifest

    validate = OnnxSetManifest._shape_from_dict
    old = LanguageModelShape.from_config(llava_1_5_7b_config())
    counts = {k: getattr(old, k) for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                                           "num_kv_heads", "num_visual_tokens")}
    assert validate(dict(counts)) == old  # manifests written before the field existed
    assert validate({**counts, "visual_token_range": [648, 2928]}).visual_token_range == (648, 2928)
    for bad in ([2928, 648], [0, 5], "x", [1, 2, 3]):
        with pytest.raises(ValueError, match="visual_token_range"):
            validate({**counts, "visual_token_range": bad})
    serialize = OnnxSetManifest._shape_to_dict
    assert serialize(None, old) == counts  # no new key in LLaVA-1.5 manifests: their bytes are unchanged
    assert serialize(None, validate({**counts, "visual_token_range": [648, 2928]}))["visual_token_range"] == [648, 2928]
