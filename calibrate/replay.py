"""Layer-by-layer replay of a LLaVA language model on many samples at once, with visual tokens dropped.

FitPrune's calibration needs, per sample and layer, the attention statistics of the *current* (already pruned)
sequence, and then the layer's output for the tokens that survive. `DecoderReplay` computes both for a padded
batch of samples of different lengths, with exactly the math of the Hugging Face Llama layer
(`visprune.models.decoder`: RoPE at each token's original position, eager softmax in float32). The layer is split in two so that tokens pruned at
layer i still act as queries and keys in layer i's attention but skip its output projection and MLP.

Shape legend: B batch, S sequence (padded), N visual tokens of the image, n visual tokens present, T text tokens
after the image, H heads, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable

import torch
from torch.nn.utils.rnn import pad_sequence

from calibrate.scoring import visual_scores
from visprune.errors import PromptError
from visprune.models import decoder
from visprune.models.inputs import EncodedPrompt


@dataclass
class SampleState:
    """One sample's residual stream entering a layer: prefix | kept visual tokens | text."""

    hidden: torch.Tensor  # [S, D]
    positions: torch.Tensor  # [S] original position ids (gaps where tokens were pruned)
    prefix: int  # tokens before the image; never pruned
    kept: torch.Tensor  # [n] indices (0..N-1) of the visual tokens still present, ascending
    text: int  # tokens after the image

    @property
    def num_visual(self) -> int:
        return int(self.kept.shape[0])

    @property
    def seq_len(self) -> int:
        return self.prefix + self.num_visual + self.text

    def keep_rows(self, removed: torch.Tensor) -> torch.Tensor:
        """Row indices (into this state's S rows) that survive removing visual positions `removed` (0..n-1)."""
        keep = torch.ones(self.seq_len, dtype=torch.bool)
        keep[self.prefix + removed] = False
        return torch.nonzero(keep).flatten()

    def after_removal(self, hidden: torch.Tensor, removed: torch.Tensor) -> "SampleState":
        """The state leaving a layer that removed `removed`; `hidden` [S', D] holds only the surviving rows."""
        keep_visual = torch.ones(self.num_visual, dtype=torch.bool)
        keep_visual[removed] = False
        rows = self.keep_rows(removed).to(self.positions.device)
        return replace(self, hidden=hidden, positions=self.positions[rows], kept=self.kept[keep_visual])


@dataclass
class LayerAttention:
    """Attention half of a layer for a batch: what the MLP half and the pruning rule need."""

    states: list[SampleState]
    context: torch.Tensor  # [B, S, H*Dh] attention output before the output projection
    a_self: list[torch.Tensor]  # per sample [n_b] float64
    a_cross: list[torch.Tensor]  # per sample [n_b] float64


def embed_samples(model: Any, prompts: list[EncodedPrompt]) -> list[SampleState]:
    """Initial states: text embeddings with the projected image features spliced in, as LLaVA's forward does."""
    if prompts and prompts[0].image_sizes is not None:  # LLaVA-NeXT: N per image, so one image at a time
        features = [image_features(model, p.pixel_values.to(model.device, model.dtype), p.image_sizes)[0]
                    for p in prompts]
    else:
        features = image_features(model, torch.cat([p.pixel_values for p in prompts]).to(model.device, model.dtype))
    embed = model.get_input_embeddings()
    states = []
    for prompt, feats in zip(prompts, features):
        ids = prompt.input_ids[0].to(model.device)
        hidden = embed(ids)
        start, n = prompt.image_start, prompt.num_visual
        if feats.shape[0] != n:
            raise PromptError(f"The prompt holds {n} image tokens but the vision tower gives {feats.shape[0]}.",
                              "Use the checkpoint's own processor so image-token expansion matches the model.")
        text = prompt.seq_len - start - n
        if text == 0:
            raise PromptError("The prompt ends with the image: FitPrune scores need text after it.",
                              "Put the question (and the assistant tag) after <image>.")
        hidden = torch.cat([hidden[:start], feats.to(hidden.dtype), hidden[start + n:]])
        states.append(SampleState(hidden=hidden, positions=torch.arange(prompt.seq_len, device=model.device),
                                  prefix=start, kept=torch.arange(n), text=text))
    return states


def image_features(model: Any, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Projected image features [B, N, D] at the config's feature layer and selection strategy (LLaVA-NeXT: with
    `image_sizes`, packed: base view, unpadded grid, newlines)."""
    config = model.config
    sizes = {} if image_sizes is None else {"image_sizes": image_sizes}
    out = model.model.get_image_features(
        pixel_values=pixel_values, **sizes,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )
    # transformers 5 returns a model output whose pooler_output is a per-image list; 4.x a tensor or list.
    feats = getattr(out, "pooler_output", out)
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


class DecoderReplay:
    """Runs the decoder layers of a LLaVA language model on lists of `SampleState`s."""

    def __init__(self, model: Any):
        self.language_model = model.model.language_model
        self.layers = self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def attend(self, layer_idx: int, states: list[SampleState]) -> LayerAttention:
        """Layer `layer_idx`'s attention for a batch, with FitPrune's head-max scores per sample."""
        hidden, positions, key_valid = _pad(states)
        context, probs, _, _ = decoder.attend(self.layers[layer_idx], self.language_model.rotary_emb, hidden,
                                              positions, blocked=_blocked_keys(key_valid))
        a_self, a_cross = visual_scores(
            probs.amax(dim=1), [s.prefix for s in states], [s.num_visual for s in states], [s.text for s in states])
        return LayerAttention(states=states, context=context, a_self=a_self, a_cross=a_cross)

    @torch.no_grad()
    def finish(self, layer_idx: int, attention: LayerAttention, removed: list[torch.Tensor]) -> list[SampleState]:
        """Output projection and MLP for the rows that survive; `removed[b]` are visual positions (0..n_b-1)."""
        rows = [s.keep_rows(r) for s, r in zip(attention.states, removed)]
        context = torch.cat([attention.context[b, r.to(attention.context.device)] for b, r in enumerate(rows)])
        residual = torch.cat([s.hidden[r.to(s.hidden.device)] for s, r in zip(attention.states, rows)])
        hidden = decoder.finish_layer(self.layers[layer_idx], residual, context)  # row-wise, so no padding needed
        outputs = torch.split(hidden, [len(r) for r in rows])
        return [s.after_removal(out, rem) for s, out, rem in zip(attention.states, outputs, removed)]


def batches_by_length(indices: Iterable[int], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Group sample indices into batches of similar length, so padding wastes little."""
    ordered = sorted(indices, key=lambda i: (lengths[i], i))
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def _pad(states: list[SampleState]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [B, S, D], positions [B, S], key_valid [B, S] for a right-padded batch."""
    hidden = pad_sequence([s.hidden for s in states], batch_first=True)
    positions = pad_sequence([s.positions for s in states], batch_first=True)
    lengths = torch.tensor([s.seq_len for s in states], device=hidden.device)
    key_valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
    return hidden, positions, key_valid


def _blocked_keys(key_valid: torch.Tensor) -> torch.Tensor:
    """Boolean mask [B, 1, S, S] of keys a query may not see: later positions (pruning keeps order) and padding."""
    return decoder.causal_blocked(key_valid.shape[1], key_valid.device)[None, None] | ~key_valid[:, None, None, :]

