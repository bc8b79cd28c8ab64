"""Loading LLaVA checkpoints (the embedded `tiny` or a local llava-hf folder) and describing their shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visprune.artifacts import canonical_json, sha256_bytes
from visprune.outputs import atomic_directory
from visprune.errors import ModelLoadError
from visprune.models.anyres import visual_count_range
from visprune.models.cache import cache_root

EMBEDDED_MODELS = ("tiny", "tiny-vqa", "tiny-next")
# The model every command and config uses when none is named: the embedded one that answers questions (shapes-vqa),
# so a first `calibrate -> export -> build -> run`, `eval` and `tradeoff` all give meaningful answers.
DEFAULT_MODEL = "tiny-vqa"

# Config keys that describe how a checkpoint was saved or run, not what it computes.
_NON_ARCHITECTURE_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
    "_attn_implementation", "_attn_implementation_autoset", "attn_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "_commit_hash", "chunk_size_feed_forward",
}


@dataclass(frozen=True)
class LanguageModelShape:
    """The numbers the FLOPs model and recipe validation need, read from a LLaVA config."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    num_visual_tokens: int
    # LLaVA-NeXT only: (min_N, max_N) over image sizes; num_visual_tokens is then max_N, the nominal count a
    # recipe is written for. None for LLaVA-1.5, whose N is fixed.
    visual_token_range: tuple[int, int] | None = None

    @property
    def anyres(self) -> bool:
        return self.visual_token_range is not None

    @classmethod
    def from_config(cls, config: Any) -> "LanguageModelShape":
        text = config.text_config
        return cls(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_heads=text.num_attention_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            num_visual_tokens=num_visual_tokens(config),
            visual_token_range=visual_count_range(config) if is_anyres(config) else None,
        )


def num_visual_tokens(config: Any) -> int:
    """Visual tokens one image contributes: patches per side squared, CLS dropped by the "default" strategy.
    For LLaVA-NeXT it depends on the image size; this is the largest count (visual_count_range)."""
    if is_anyres(config):
        return visual_count_range(config)[1]
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    return patches if config.vision_feature_select_strategy == "default" else patches + 1


def is_anyres(config: Any) -> bool:
    """A LLaVA-NeXT config, whose images are tiled (anyres) into a variable number of visual tokens."""
    return getattr(config, "model_type", None) == "llava_next"


def architecture_fingerprint(config: Any) -> str:
    """Hash of the architecture part of a config: equal for the same shapes, whatever the weights or paths."""
    return sha256_bytes(canonical_json(_architecture_dict(config.to_dict())))


def _architecture_dict(d: dict) -> dict:
    return {k: _architecture_dict(v) if isinstance(v, dict) else v
            for k, v in d.items() if k not in _NON_ARCHITECTURE_KEYS}


@dataclass
class LlavaBundle:
    """A loaded checkpoint: the model, its processor and where it came from."""

    name: str
    path: Path
    model: Any
    processor: Any
    fingerprint: str

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def shape(self) -> LanguageModelShape:
        return LanguageModelShape.from_config(self.model.config)

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id


def resolve_model_path(model: str) -> Path:
    """`tiny` → its cache folder (built on first use); anything else → a local llava-hf checkpoint folder."""
    if model == "tiny-vqa":
        from visprune.models.tiny_vqa import ensure_tiny_vqa_checkpoint

        return ensure_tiny_vqa_checkpoint()
    if model == "tiny-next":
        from visprune.models.tiny_next import ensure_tiny_next_checkpoint

        return ensure_tiny_next_checkpoint()
    if model in EMBEDDED_MODELS:
        return ensure_tiny_checkpoint()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"Model not found: {model!r} is neither an embedded model nor a folder.",
            "Pass --model tiny, tiny-vqa or tiny-next, or the path of a local llava-hf checkpoint folder "
            "(one with config.json, e.g. a download of llava-hf/llava-1.5-7b-hf).",
        )
    return path


def model_folder(model: str) -> Path | None:
    """The checkpoint folder a `--model` names, or None for an embedded model (built in the cache)."""
    return None if model in EMBEDDED_MODELS or model in SHAPE_ONLY_MODELS else Path(model).expanduser()


def ensure_tiny_checkpoint() -> Path:
    from visprune.models.tiny import TINY_BUILD_VERSION, build_tiny_llava

    path = cache_root() / "models" / f"tiny-v{TINY_BUILD_VERSION}"
    if not (path / "config.json").exists():
        with atomic_directory(path) as staging:
            build_tiny_llava(staging)
    return path


_LLAVA_MODEL_TYPES = ("llava", "llava_next")


def read_llava_config(path: Path) -> Any:
    """The checkpoint's config, after checking that it is a LLaVA-1.5 (`llava`) or LLaVA-NeXT (`llava_next`) model."""
    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"Cannot read {config_file}: {e}",
            "Point --model at a llava-hf checkpoint folder containing a valid config.json.",
        ) from e
    if model_type not in _LLAVA_MODEL_TYPES:
        raise ModelLoadError(
            f"{path} holds a {model_type!r} model, not a LLaVA-1.5 (`llava`) or LLaVA-NeXT (`llava_next`) checkpoint.",
            "visprune supports llava-hf LLaVA-1.5 and LLaVA-NeXT checkpoints (model_type 'llava' or 'llava_next'), "
            "e.g. llava-hf/llava-1.5-7b-hf or llava-hf/llava-v1.6-vicuna-7b-hf.",
        )
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def load_llava(model: str, device: str = "cpu", dtype: Any = None) -> LlavaBundle:
    """Load a checkpoint by name (`tiny`) or folder through `from_pretrained`, in eval mode on `device`."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    path = resolve_model_path(model)
    config = read_llava_config(path)
    dtype = dtype or torch.float32
    model_class = LlavaNextForConditionalGeneration if is_anyres(config) else LlavaForConditionalGeneration
    try:
        processor = AutoProcessor.from_pretrained(path)
        net = model_class.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"Cannot load the checkpoint in {path}: {e}",
            "Check that the folder is a complete llava-hf checkpoint (weights, tokenizer and processor files).",
        ) from e
    net.to(device).eval()
    name = model if model in EMBEDDED_MODELS else str(path.resolve())
    return LlavaBundle(name=name, path=path, model=net, processor=processor,
                       fingerprint=architecture_fingerprint(config))


def load_llava_config(model: str) -> Any:
    """Only the config of `tiny`, of a shape-only reference (`llava-1.5-7b`, `llava-v1.6-vicuna-7b`) or of a
    checkpoint folder: enough to check recipes and count FLOPs without loading weights."""
    if model == "llava-v1.6-vicuna-7b":
        return llava_v1_6_vicuna_7b_config()
    if model in SHAPE_ONLY_MODELS:
        return llava_1_5_7b_config()
    return read_llava_config(resolve_model_path(model))


# Architectures known by name without weights: for `visprune recipe --model`, FLOPs and benchmarks.
SHAPE_ONLY_MODELS = ("llava-1.5-7b", "llava-v1.6-vicuna-7b")


def llava_1_5_7b_config() -> Any:
    """LLaVA-1.5-7B's architecture (llava-hf/llava-1.5-7b-hf), for FLOPs, recipe checks and benchmarks at its
    shapes; no weights come with it."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, image_size=336, intermediate_size=4096, num_attention_heads=16,
                              num_hidden_layers=24, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=32001)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-2)


def llava_v1_6_vicuna_7b_config() -> Any:
    """LLaVA-NeXT-7B's architecture (llava-hf/llava-v1.6-vicuna-7b-hf): LLaVA-1.5-7B's CLIP-L/336 and 7B Llama
    with v1.6's anyres pinpoints; no weights come with it."""
    from transformers import LlavaNextConfig

    from visprune.models.tiny_next import LLAVA_V1_6_PINPOINTS

    base = llava_1_5_7b_config()
    return LlavaNextConfig(vision_config=base.vision_config, text_config=base.text_config,
                           image_token_index=32000, image_seq_length=576, projector_hidden_act="gelu",
                           vision_feature_select_strategy="default", vision_feature_layer=-2,
                           image_grid_pinpoints=LLAVA_V1_6_PINPOINTS)
