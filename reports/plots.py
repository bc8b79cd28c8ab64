"""Pictures for reports: which image patches survive pruning, and how close the engine is to the reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from visprune.figures import pyplot, save_figure
from visprune.manifests.reports import ParityReport


def model_view(pixel_values: np.ndarray, processor: Any) -> np.ndarray:
    """The image as the vision tower sees it (resized, cropped), [H, W, 3] in 0..1, from normalized pixels."""
    image_processor = processor.image_processor
    mean = np.asarray(image_processor.image_mean).reshape(3, 1, 1)
    std = np.asarray(image_processor.image_std).reshape(3, 1, 1)
    view = pixel_values[0] if pixel_values[0].ndim == 3 else pixel_values[0][0]  # LLaVA-NeXT: the base view
    return np.clip(view.astype(np.float32) * std + mean, 0, 1).transpose(1, 2, 0)


def plot_kept_tokens(image: np.ndarray, kept_indices: dict[int, list[int]], num_visual: int, out: Path,
                     max_panels: int = 4) -> None:
    """One panel per pruning layer (up to `max_panels`, spread over the depth): kept patches bright, pruned ones
    dimmed. Indices are row-major over the square patch grid, as the vision tower orders them; indices from
    `num_visual` on (LLaVA-NeXT: the crops' grid after the base view's tokens) are not drawn."""
    plt = pyplot()
    layers = sorted(kept_indices)
    if len(layers) > max_panels:
        layers = [layers[round(i * (len(layers) - 1) / (max_panels - 1))] for i in range(max_panels)]
    side = int(round(num_visual ** 0.5))
    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3 * (len(layers) + 1), 3.3), dpi=110, squeeze=False)
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("model input")
    for ax, layer in zip(axes[0, 1:], layers):
        mask = np.zeros(num_visual, dtype=bool)
        mask[[i for i in kept_indices[layer] if i < num_visual]] = True
        patch = np.kron(mask.reshape(side, side), np.ones((image.shape[0] // side, image.shape[1] // side)))
        ax.imshow(image * (0.15 + 0.85 * patch[..., None]))
        where = " in the base view" if max(kept_indices[layer], default=0) >= num_visual else ""  # LLaVA-NeXT
        ax.set_title(f"{'before the LLM' if layer < 0 else f'after layer {layer}'}: {mask.sum()} kept{where}")
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle("Visual tokens kept (bright) by the pruned engine on the sample image")
    save_figure(fig, out)


def plot_parity(report: ParityReport, out: Path) -> None:
    """Max abs logits error of the engine vs. the PyTorch reference, per generated token and prompt, with each
    step's atol."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4), dpi=110)
    for case in report.cases:
        errors = np.maximum(case["max_abs_logits_error"], 1e-12)
        judged = "" if case["logits_judged"] else " (not judged: kept sets differ)"
        line, = ax.plot(range(len(errors)), errors, marker="o", alpha=0.7,
                        label=f"{case['image']}: {case['question'][:24]}{judged}")
        # each step's own atol (it scales with the step's largest logit), in the case's colour
        ax.plot(range(len(errors)), case["logits_atol"], color=line.get_color(), linestyle=":", alpha=0.6)
    tolerance = report.engine_vs_reference.tolerance
    ax.axhline(tolerance, color="red", linestyle="--", label=f"atol floor {tolerance:.0e} (dotted: each step's atol)")
    ax.set_yscale("log")
    ax.set_xlabel("generated token")
    ax.set_ylabel("max |logits engine - reference|")
    ax.set_title("Engine vs. PyTorch reference")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    save_figure(fig, out)
