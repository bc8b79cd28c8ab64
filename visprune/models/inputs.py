"""Turning (image, question or prompt) into model inputs, and finding where the image sits in them.

The image's position is read from the processor's output (the run of image-token ids), never assumed: the
reference code's hard-coded offset 35 is only right for one template and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visprune.errors import ImageLoadError, PromptError

if TYPE_CHECKING:  # the runtime uses this module without PyTorch
    import torch

IMAGE_PLACEHOLDER = "<image>"

# Greyscale modes wider than 8 bits, and the value each maps to white. PIL's convert("RGB") clips them to
# 0..255, which turns nearly all of a 16-bit image white. I;16* hold 0..65535 (16-bit PNG and TIFF). Mode I
# (int32) is what 16-bit greyscale PNGs open as in some Pillow versions, so it is read as 16-bit too; mode F
# (float32) is read as 0..1, the usual range of float images. Values outside the range are clipped.
_WIDE_GREY_WHITE = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def load_image(path: Path, missing_hint: str = "Check the image's path.") -> Any:
    """Open an image file as RGB, with an error that names the file. `missing_hint` is the caller's, who knows
    where the path came from (calibration resolves it against its --images folder; `run` takes --image)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"Image not found: {path}", missing_hint)
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageLoadError(
            f"Image does not decode: {path} ({e})",
            "Replace the file with a valid PNG or JPEG (it may be truncated or not an image).",
        ) from e


def to_rgb(image: Any) -> Any:
    """An RGB copy of a PIL image; wide greyscale is scaled to 8 bits first (0 and its white, see above)."""
    import numpy as np
    from PIL import Image

    white = _WIDE_GREY_WHITE.get(image.mode)
    if white is None:
        return image.convert("RGB")
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    grey = np.rint(np.clip(values, 0, white) * (255 / white)).astype(np.uint8)  # 16-bit: v / 257, rounded
    return Image.fromarray(grey).convert("RGB")


def chat_prompt(processor: Any, question: str) -> str:
    """The checkpoint's own chat template around one image and `question`, ending at the assistant's turn."""
    if IMAGE_PLACEHOLDER in question:
        raise PromptError(
            f"The question already contains {IMAGE_PLACEHOLDER!r}: {question!r}",
            "Give a plain question (the template adds the image), or use a `prompt` field with exactly one <image>.",
        )
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def check_single_image_placeholder(prompt: str) -> None:
    count = prompt.count(IMAGE_PLACEHOLDER)
    if count != 1:
        raise PromptError(
            f"A prompt must contain exactly one {IMAGE_PLACEHOLDER!r}; this one has {count}: {prompt[:80]!r}",
            f"Put a single {IMAGE_PLACEHOLDER} where the image belongs, e.g. 'USER: <image>\\nWhat is shown? ASSISTANT:'.",
        )


@dataclass
class EncodedPrompt:
    """One tokenized sample. Shapes: input_ids [1, S], pixel_values [1, 3, H, W] (LLaVA-NeXT: [1, V, 3, H, W],
    V views = base + tiles, with image_sizes [1, 2] = the original (H, W)); image occupies positions
    [image_start, image_start + num_visual) of the sequence."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_start: int
    num_visual: int
    image_sizes: torch.Tensor | None = None  # LLaVA-NeXT only: the model needs it to unpad the tile grid

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


def encode_image_prompt(processor: Any, image: Any, prompt: str, image_token_id: int) -> EncodedPrompt:
    """Tokenize `prompt` (with its image placeholder expanded by the processor) and preprocess `image`."""
    check_single_image_placeholder(prompt)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    input_ids = batch["input_ids"]
    start, count = image_span(input_ids[0], image_token_id)
    return EncodedPrompt(input_ids=input_ids, pixel_values=batch["pixel_values"], image_start=start, num_visual=count,
                         image_sizes=batch.get("image_sizes"))


def image_span(input_ids: Any, image_token_id: int) -> tuple[int, int]:
    """(start, length) of the one contiguous run of image tokens in a [S] id sequence (torch or numpy)."""
    positions = [i for i, token in enumerate(input_ids.tolist()) if token == image_token_id]
    if not positions or positions[-1] - positions[0] + 1 != len(positions):
        raise PromptError(
            "The tokenized prompt does not hold one contiguous block of image tokens.",
            "Check that the prompt has one <image> and that the tokenizer maps it to the model's image token.",
        )
    return positions[0], len(positions)


def expanded_prompt_ids(processor: Any, prompt: str, num_visual: int) -> list[int]:
    """Token ids of `prompt` with its `<image>` expanded to `num_visual` image tokens, as the processor does,
    without touching an image (for batches whose images are preprocessed separately)."""
    check_single_image_placeholder(prompt)
    return processor.tokenizer(prompt.replace(IMAGE_PLACEHOLDER, IMAGE_PLACEHOLDER * num_visual))["input_ids"]


def normalized_pixels(images: list[Any], image_processor: Any) -> Any:
    """[B, 3, H, W] float32 pixels of RGB images already at the processor's crop size: the processor's rescale
    and normalization without its resize and crop (which are no-ops at that size), much faster in bulk."""
    import numpy as np

    mean = np.asarray(image_processor.image_mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(image_processor.image_std, dtype=np.float32).reshape(1, 3, 1, 1)
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]).transpose(0, 3, 1, 2) / 255.0
    return (array - mean) / std
