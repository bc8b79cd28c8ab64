"""The embedded `tiny-next` model: tiny-vqa's trained weights in the LLaVA-NeXT (anyres) architecture.

Same vision tower, projector, Llama decoder, tokenizer and chat template as `tiny`/`tiny-vqa`, wrapped in
`LlavaNextForConditionalGeneration` with llava-v1.6's image_grid_pinpoints, so an image becomes a base view plus
2-3 tiles of 336 px and N = 648..2928 visual tokens (visprune/models/anyres.py). The one NeXT-only parameter,
`image_newline`, is drawn from a seeded generator at the scale of the other weights (1/sqrt(D)). It was never
trained with anyres inputs, so its answers on tiled images mean little; what it exercises is every NeXT shape rule.
Built once into the cache (`save_pretrained`), then loaded with `from_pretrained` like any llava-hf checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Bump when anything below changes: the cache folder name carries it, so old builds are never reused.
TINY_NEXT_BUILD_VERSION = 1
IMAGE_NEWLINE_SEED = 20260105
# llava-v1.6 (H, W) resolutions the image is fitted to before it is cut into 336 px tiles.
LLAVA_V1_6_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_tiny_next(out_dir: Path) -> None:
    """Write tiny-next (config, weights, tokenizer, processor) into `out_dir`."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from visprune.models.tiny_vqa import ensure_tiny_vqa_checkpoint

    processor = build_tiny_next_processor()
    trained = LlavaForConditionalGeneration.from_pretrained(ensure_tiny_vqa_checkpoint(), dtype=torch.float32)
    with torch.device("cpu"):
        model = LlavaNextForConditionalGeneration(build_tiny_next_config(processor.tokenizer))
    _copy_llava_weights_(model, trained.state_dict())
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_tiny_next_config(tokenizer):
    """tiny's config (vision, text, projector, strategy, feature layer) as a LlavaNextConfig with v1.6 pinpoints."""
    from transformers import LlavaNextConfig

    from visprune.models.tiny import _build_config

    llava = _build_config(tokenizer)
    return LlavaNextConfig(
        vision_config=llava.vision_config, text_config=llava.text_config,
        image_token_index=llava.image_token_id, image_seq_length=llava.image_seq_length,
        projector_hidden_act=llava.projector_hidden_act,
        vision_feature_select_strategy=llava.vision_feature_select_strategy,
        vision_feature_layer=llava.vision_feature_layer, image_grid_pinpoints=LLAVA_V1_6_PINPOINTS,
        tie_word_embeddings=False,
    )


def build_tiny_next_processor():
    """A LlavaNextProcessor with tiny's tokenizer and template, 336 px tiles and CLIP's mean/std."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from visprune.models.tiny import LLAVA_1_5_CHAT_TEMPLATE, VISION_SHAPE, _build_tokenizer

    size = VISION_SHAPE["image_size"]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=LLAVA_V1_6_PINPOINTS,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=_build_tokenizer(), patch_size=VISION_SHAPE["patch_size"],
        vision_feature_select_strategy="default", chat_template=LLAVA_1_5_CHAT_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy (as llava-hf v1.6)
    )


@torch.no_grad()
def _copy_llava_weights_(model: torch.nn.Module, trained: dict[str, torch.Tensor]) -> None:
    """Llava and LlavaNext name their shared parameters identically; image_newline is the only new one."""
    missing, unexpected = model.load_state_dict(trained, strict=False)
    if set(missing) != {"model.image_newline"} or unexpected:
        raise RuntimeError(f"tiny-vqa -> tiny-next weight names changed: missing {missing}, unexpected {unexpected}")
    newline = model.model.image_newline
    generator = torch.Generator().manual_seed(IMAGE_NEWLINE_SEED)
    noise = torch.randn(newline.shape, generator=generator, dtype=torch.float32)
    newline.copy_(noise / math.sqrt(newline.shape[0]))


def ensure_tiny_next_checkpoint() -> Path:
    """The cache folder of tiny-next, built on first use; its name carries the build version and tiny-vqa's hash."""
    from visprune.models.cache import cache_root
    from visprune.models.tiny_vqa import tiny_vqa_record
    from visprune.outputs import atomic_directory

    weights = tiny_vqa_record()["sha256"].removeprefix("sha256:")[:16]
    path = cache_root() / "models" / f"tiny-next-v{TINY_NEXT_BUILD_VERSION}-{weights}"
    if not (path / "config.json").exists():
        with atomic_directory(path) as staging:
            build_tiny_next(staging)
    return path
