"""One Llama decoder layer in two halves, with the attention probabilities exposed where they are needed.

Calibration needs each layer's probabilities for FitPrune's scores; export needs the same math traced into a
graph. Both use these functions, which follow Hugging Face's eager Llama attention (RoPE at each token's own
position, float32 softmax), so the layer is written once. Engines ask for fused kernels (`Kernels`): attention
without probabilities wherever a layer does not prune (and at the decode step), and, for ONNX Runtime, single
ONNX ops for RMSNorm and RoPE; the probability rows a pruning layer's score reads are computed next to it. The split exists because FitPrune prunes between
the halves: a token deleted at layer i is a query and key in its attention but skips its output projection
and MLP (both row-wise).

Shape legend: B batch, S queries, S_kv keys (past + S), H heads, Hkv key/value heads, Dh head dim, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Kernels:
    """How the decoder writes the parts that backends fuse. `fused_attention`: scaled_dot_product_attention
    wherever no probabilities are needed (PyTorch picks flash/memory-efficient kernels; the ONNX exporter writes
    either ONNX `Attention` at opset >= 23 or, below, Q and K^T pre-scaled by sqrt(scale) -> MatMul -> mask ->
    Softmax -> MatMul, the form TensorRT fuses). `onnx_ops`: RMSNorm and RoPE through F.rms_norm and
    torch.onnx.ops.rotary_embedding, which export as single ONNX ops (opset 23) that ONNX Runtime runs fused."""

    name: str
    fused_attention: bool
    onnx_ops: bool = False


EAGER = Kernels("eager", fused_attention=False)  # Hugging Face's eager math everywhere: calibration, reference
SDPA = Kernels("sdpa", fused_attention=True)
ONNX_OPS = Kernels("onnx-ops", fused_attention=True, onnx_ops=True)
Probs = Literal["all", "last"] | None  # which probability rows a caller needs: every row, the last one, none


def attend(layer: nn.Module, rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
           blocked: torch.Tensor | None = None, past: tuple[torch.Tensor, torch.Tensor] | None = None,
           causal: bool = False, kernels: Kernels = EAGER, probs: Probs = "all"):
    """Attention half of `layer` for hidden [B, S, D] at positions [B, S].

    Keys a query may not see: `blocked` (bool, broadcastable to [B, H, S, S_kv]) or, with `causal`, those after
    it. `past` is this layer's cached (key, value). Returns context [B, S, H*Dh] (before o_proj), probabilities
    in float32 ([B, H, S, S_kv] for "all", [B, H, 1, S_kv] for "last", None for None; always all rows under
    EAGER), and the layer's cache key/value [B, Hkv, S_kv, Dh] with RoPE applied.
    """
    q, k, v = _project(layer, rotary, hidden, positions, kernels)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    if not kernels.fused_attention or probs == "all":
        if causal and blocked is None:
            blocked = causal_blocked(q.shape[2], q.device)
        context, weights = _eager_core(layer.self_attn, q, k, v, blocked)
    else:
        context = _fused_core(layer.self_attn, q, k, v, causal, blocked)
        weights = _last_row_probs(layer.self_attn, q, k) if probs == "last" else None
    return context.transpose(1, 2).reshape(*hidden.shape[:2], -1), weights, k, v


def _project(layer: nn.Module, rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, kernels: Kernels):
    """q [B, H, S, Dh], k and v [B, Hkv, S, Dh], RoPE applied."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn, (batch, seq, _) = layer.self_attn, hidden.shape
    x = rms_norm(layer.input_layernorm, hidden, kernels)
    q, k, v = (proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = rotary(x, positions)  # [B, S, Dh], both halves equal
    if not kernels.onnx_ops:
        return (*apply_rotary_pos_emb(q, k, cos, sin), v)
    half = attn.head_dim // 2  # ONNX RotaryEmbedding takes per-token caches [B, S, Dh/2] (rotate-half layout)
    return (*(torch.onnx.ops.rotary_embedding(t, cos[..., :half], sin[..., :half]) for t in (q, k)), v)


def rms_norm(norm: nn.Module, hidden: torch.Tensor, kernels: Kernels = EAGER) -> torch.Tensor:
    """`norm` (a LlamaRMSNorm) applied to hidden; under `onnx_ops` as one F.rms_norm in float32 (ONNX
    RMSNormalization), cast back to the input dtype."""
    if not kernels.onnx_ops:
        return norm(hidden)
    out = F.rms_norm(hidden.float(), norm.weight.shape, norm.weight.float(), norm.variance_epsilon)
    return out.to(hidden.dtype)


def _eager_core(attn: nn.Module, q, k, v, blocked):
    """Hugging Face's eager attention: context [B, H, S, Dh], float32 probabilities [B, H, S, S_kv]."""
    from transformers.models.llama.modeling_llama import repeat_kv

    # HF's order of operations (so float32 rounding matches its eager forward). The upcast comes before the
    # softmax because `softmax(x, dtype=float32)` exports as a half-precision Softmax plus a Cast, which would
    # lose the float32 island that fp16/bf16 graphs need.
    logits = torch.matmul(q, repeat_kv(k, attn.num_key_value_groups).transpose(2, 3)).mul_(attn.scaling).float()
    if blocked is not None:
        logits = logits + _additive_mask(blocked)
    probs = torch.softmax(logits, dim=-1)
    return torch.matmul(probs.to(v.dtype), repeat_kv(v, attn.num_key_value_groups)), probs


def _additive_mask(blocked: torch.Tensor) -> torch.Tensor:
    """float32 0 / most-negative at the (small) shape of `blocked`. Added instead of masked_fill: the same
    probabilities, and ONNX Runtime's Add over [B, H, S, S] ran 4x faster than its Where."""
    return torch.zeros(blocked.shape, device=blocked.device).masked_fill_(blocked, torch.finfo(torch.float32).min)


def _last_row_probs(attn: nn.Module, q, k) -> torch.Tensor:
    """The last query's float32 probabilities [B, H, 1, S_kv] (it sees every key), eager order of operations."""
    from transformers.models.llama.modeling_llama import repeat_kv

    logits = torch.matmul(q[:, :, -1:], repeat_kv(k, attn.num_key_value_groups).transpose(2, 3))
    return torch.softmax(logits.mul_(attn.scaling).float(), dim=-1)


def _fused_core(attn: nn.Module, q, k, v, causal: bool, blocked: torch.Tensor | None = None):
    """Context [B, H, S, Dh] from scaled_dot_product_attention (no probabilities). `blocked` replaces `causal`
    when given (it must leave every query at least one key: a fully masked row is NaN in SDPA)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = attn.num_key_value_groups
    mask = None if blocked is None else blocked.logical_not()
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask,
                                          is_causal=causal and blocked is None, scale=attn.scaling)


def finish_layer(layer: nn.Module, hidden: torch.Tensor, context: torch.Tensor,
                 kernels: Kernels = EAGER) -> torch.Tensor:
    """Output projection, residual and MLP half of `layer`; row-wise, so any subset of rows may go through."""
    hidden = hidden + layer.self_attn.o_proj(context)
    return hidden + layer.mlp(rms_norm(layer.post_attention_layernorm, hidden, kernels))


def causal_blocked(seq: int, device: torch.device | None = None) -> torch.Tensor:
    """[S, S] True above the diagonal: keys later in the sequence (pruning keeps the order)."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).tril().logical_not()


def padded_causal_blocked(seq: int, pad_lengths: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] for left-padded rows (pad_lengths [B]): causal, and no query sees a pad key except a pad
    query its own (so no row is fully masked). Pruning removes only image rows, so the pads stay in front."""
    keys = torch.arange(seq, device=pad_lengths.device)
    queries = keys[:, None]  # [S, 1]
    pad_key = (keys < pad_lengths[:, None]).view(-1, 1, 1, seq)  # [B, 1, 1, S]
    return (keys > queries) | (pad_key & (keys != queries))


def pad_blocked(length: int, pad_lengths: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, L]: the cache entries of left-padded rows (pad_lengths [B]) a decoded token must not see."""
    return (torch.arange(length, device=pad_lengths.device) < pad_lengths[:, None]).view(-1, 1, 1, length)
