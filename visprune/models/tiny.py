"""The embedded default model `tiny`: a real LLaVA-1.5-architecture checkpoint small enough for two CPU cores.

It is built once, deterministically (seeded weights, a tokenizer trained on a fixed embedded corpus), written with
`save_pretrained` into the cache, and from then on loaded with `from_pretrained` like any local llava-hf
checkpoint. Shapes follow LLaVA-1.5: CLIP ViT at 336 px with 14 px patches (576 visual tokens), feature layer -2
without CLS, a 2-layer GELU projector, a Llama decoder, and llava-hf's chat template with an `<image>` token.
The weights are random, so its answers mean nothing; what it exercises is every code path and shape rule.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Bump when anything below changes: the cache folder name carries it, so old builds are never reused.
TINY_BUILD_VERSION = 1
TINY_SEED = 20241022

# llava-hf/llava-1.5-*-hf chat template: "USER: <image>\n{question} ASSISTANT:".
LLAVA_1_5_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

VISION_SHAPE = dict(
    image_size=336, patch_size=14, hidden_size=64, intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=4, projection_dim=64,
)
TEXT_SHAPE = dict(
    hidden_size=64, intermediate_size=176, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
)
TOKENIZER_VOCAB_SIZE = 1024

# Text the tokenizer's BPE merges are learned from: LLaVA-style prompts and plain English about images.
_CORPUS = """\
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful answers.
USER: What is shown in this image? ASSISTANT: The image shows a person standing in front of a building.
Describe the picture in detail. What objects can you see? How many people are in the photo?
What color is the largest object? Is this photo taken indoors or outdoors? What is in the center of the image?
What is the texture of the surface? Is there any text in the image? What does the text say?
What is the main subject of this picture? Where might this photo have been taken? What time of day is it?
The cat is sitting on the table next to a cup of coffee. A rocket is launching into the blue sky.
An astronaut in a white suit holds a helmet. Coins of different sizes lie on a dark background.
A clock hangs on the wall. The moon surface is covered with craters. Grass and gravel cover the ground.
A motorcycle is parked in a garage. Red, green, blue, yellow, black, white, orange, purple, brown, gray.
left right top bottom above below small large big tiny round square circle triangle one two three four five
yes no there are is the a an of in on at with and or to from by for this that these those what which who how
"""


def build_tiny_llava(out_dir: Path) -> None:
    """Write the tiny checkpoint (config, weights, tokenizer, processor) into `out_dir`."""
    from transformers import LlavaForConditionalGeneration

    processor = _build_processor()
    config = _build_config(processor.tokenizer)
    with torch.device("cpu"):
        model = LlavaForConditionalGeneration(config)
    _seeded_init_(model, TINY_SEED)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def _build_config(tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_SHAPE,
    )
    vision = CLIPVisionConfig(hidden_act="quick_gelu", **VISION_SHAPE)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(VISION_SHAPE["image_size"] // VISION_SHAPE["patch_size"]) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )


def _build_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = VISION_SHAPE["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=_build_tokenizer(),
        patch_size=VISION_SHAPE["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=LLAVA_1_5_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
    )


def _build_tokenizer():
    """A Llama-style byte-fallback BPE trained on `_CORPUS`; the `tokenizers` trainer is deterministic."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=TEXT_SHAPE["max_position_embeddings"], padding_side="left",
    )
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    return tokenizer


@torch.no_grad()
def _seeded_init_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in sorted-name order.

    Independent of how transformers initialises modules, so the checkpoint is identical across versions.
    Query/key projections get a larger gain so attention is peaked (as in trained models) rather than
    nearly uniform, which would make every token score alike.
    """
    for name, param, noise, fan_in in seeded_weight_noise(model, seed):
        gain = 2.0 if ("q_proj" in name or "k_proj" in name) else 1.0
        param.copy_(noise * (gain / math.sqrt(fan_in)))


def seeded_weight_noise(model: torch.nn.Module, seed: int):
    """Zero every bias and set every norm weight to 1; yield (name, param, standard-normal noise, fan_in) for the
    other parameters in sorted-name order, the noise drawn from one generator seeded with `seed`. Callers scale
    the noise into the parameter themselves (call under torch.no_grad)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("bias"):
            param.zero_()
        elif "norm" in name and param.ndim == 1:
            param.fill_(1.0)
        else:
            fan_in = math.prod(param.shape[1:]) if param.ndim > 1 else param.shape[0]
            yield name, param, torch.randn(param.shape, generator=generator, dtype=torch.float32), fan_in
