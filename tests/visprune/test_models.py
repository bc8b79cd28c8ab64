"""The embedded tiny LLaVA and the model adapter."""

import json

import pytest

from visprune.errors import ModelLoadError, PromptError
from visprune.models import chat_prompt, encode_image_prompt, load_image, load_llava
from visprune.models.llava import architecture_fingerprint, llava_1_5_7b_config
from visprune.models.tiny import build_tiny_llava


def test_tiny_has_the_llava_1_5_layout(tiny):
    config = tiny.config
    assert type(tiny.model).__name__ == "LlavaForConditionalGeneration"
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert config.vision_feature_layer == -2 and config.vision_feature_select_strategy == "default"
    assert config.projector_hidden_act == "gelu"
    assert config.text_config.model_type == "llama" and config.text_config.num_hidden_layers >= 8
    assert tiny.shape.num_visual_tokens == 576


def test_tiny_is_loaded_from_a_saved_checkpoint(tiny):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja"):
        assert (tiny.path / name).is_file(), name
    assert "visprune-test-cache" in str(tiny.path)  # built fresh for this session, not borrowed


def test_tiny_builds_byte_identically(tmp_path):
    build_tiny_llava(tmp_path / "a")
    build_tiny_llava(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_image_position_comes_from_the_processor(tiny, default_set):
    prompt_text = chat_prompt(tiny.processor, "What is shown?")
    assert prompt_text == "USER: <image>\nWhat is shown? ASSISTANT:"
    encoded = encode_image_prompt(tiny.processor, load_image(default_set.samples[0].image), prompt_text,
                                  tiny.image_token_id)
    assert encoded.num_visual == 576
    assert encoded.input_ids[0, encoded.image_start - 1] != tiny.image_token_id
    assert (encoded.input_ids[0, encoded.image_start:encoded.image_start + 576] == tiny.image_token_id).all()
    assert encoded.image_start != 35  # the reference's hard-coded offset is template-specific


@pytest.mark.parametrize("prompt", ["USER: no image here ASSISTANT:", "USER: <image> and <image> ASSISTANT:"])
def test_prompts_need_exactly_one_image(tiny, default_set, prompt):
    with pytest.raises(PromptError, match="exactly one"):
        encode_image_prompt(tiny.processor, load_image(default_set.samples[0].image), prompt, tiny.image_token_id)


def test_fingerprint_depends_on_architecture_not_paths(tiny):
    assert tiny.fingerprint == architecture_fingerprint(tiny.config)
    assert tiny.fingerprint != architecture_fingerprint(llava_1_5_7b_config())


def test_unknown_and_non_llava_models_are_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="Hint: Pass --model tiny"):
        load_llava(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="not a LLaVA-1.5"):
        load_llava(str(tmp_path))
    (tmp_path / "config.json").write_text("{corrupt")
    with pytest.raises(ModelLoadError, match="Cannot read"):
        load_llava(str(tmp_path))
