"""Model adapters: loading LLaVA checkpoints and encoding their inputs. Shared by every stage."""

from visprune.models.inputs import EncodedPrompt, chat_prompt, encode_image_prompt, load_image
from visprune.models.llava import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    LanguageModelShape,
    LlavaBundle,
    architecture_fingerprint,
    load_llava,
    num_visual_tokens,
)

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED_MODELS", "EncodedPrompt", "LanguageModelShape", "LlavaBundle", "architecture_fingerprint", "chat_prompt",
    "encode_image_prompt", "load_image", "load_llava", "num_visual_tokens",
]
