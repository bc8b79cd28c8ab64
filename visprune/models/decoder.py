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
    # PyTorch engines only (not exportable): a pruning layer's score takes its softmax normalisers (log-sum-exp) from
    # the fused kernel, so only the visual columns' logits are computed next to it (bench/gpu_engine_7b.py measures)
    lse_from_kernel: bool = False


EAGER = Kernels("eager", fused_attention=False)  # Hugging Face's eager math everywhere: calibration, reference
SDPA = Kernels("sdpa", fused_attention=True)
SDPA_LSE = Kernels("sdpa-lse", fused_attention=True, lse_from_kernel=True)
ONNX_OPS = Kernels("onnx-ops", fused_attention=True, onnx_ops=True)
Probs = Literal["all", "last"] | None  # which probability rows a caller needs: every row, the last one, none


def attend(layer: nn.Module, rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
           blocked: torch.Tensor | None = None, past: tuple[torch.Tensor, torch.Tensor] | None = None,
           causal: bool = False, kernels: Kernels = EAGER, probs: Probs = "all", columns: torch.Tensor | None = None):
    """Attention half of `layer` for hidden [B, S, D] at positions [B, S].

    Keys a query may not see: `blocked` (bool, broadcastable to [B, H, S, S_kv]) or, with `causal`, those after
    it. `past` is this layer's cached (key, value). Returns context [B, S, H*Dh] (before o_proj), probabilities
    in float32 ([B, H, S, S_kv] for "all", [B, H, 1, S_kv] for "last", None for None; always all rows under
    EAGER), and the layer's cache key/value [B, Hkv, S_kv, Dh] with RoPE applied. With `columns` [B, n] (the key
    positions a score reads), probabilities come back for those keys only ([B, H, rows, n]); then fused kernels
    keep the fused attention and compute just those probabilities beside it.
    """
    q, k, v = _project(layer, rotary, hidden, positions, kernels)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    if causal and blocked is None and (probs == "all" or not kernels.fused_attention):
        blocked = causal_blocked(q.shape[2], q.device)
    if kernels.fused_attention and probs == "all" and columns is not None:
        context, weights = _fused_core_with_column_probs(layer.self_attn, q, k, v, blocked, columns, kernels)
    elif not kernels.fused_attention or probs == "all":
        context, weights = _eager_core(layer.self_attn, q, k, v, blocked)
        weights = weights if columns is None else take_columns(weights, columns)
    else:
        context = _fused_core(layer.self_attn, q, k, v, causal, blocked)
        weights = _last_row_probs(layer.self_attn, q, k, blocked) if probs == "last" else None
        weights = weights if weights is None or columns is None else take_columns(weights, columns)
    return context.transpose(1, 2).reshape(*hidden.shape[:2], -1), weights, k, v


def attend_cached(layer: nn.Module, rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                  cache: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, pad_lengths: torch.Tensor,
                  kernels: Kernels):
    """One decode step's attention half against static cache buffers (gpt-fast's pattern): the token's key and
    value [B, Hkv, 1, Dh] are written in place at `index` [1] of `cache` ([B, Hkv, C, Dh] each, C the capacity),
    and the token attends to every entry up to it except each row's left padding (pad_lengths [B]). Returns the
    context [B, 1, H*Dh]."""
    q, k, v = _project(layer, rotary, hidden, positions, kernels)
    cache[0][:, :, index] = k
    cache[1][:, :, index] = v
    slots = torch.arange(cache[0].shape[2], device=index.device)
    blocked = ((slots > index) | (slots < pad_lengths[:, None])).view(hidden.shape[0], 1, 1, -1)  # [B, 1, 1, C]
    context = _fused_core(layer.self_attn, q, cache[0], cache[1], False, blocked)
    return context.transpose(1, 2).reshape(*hidden.shape[:2], -1)


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


def _additive_mask(blocked: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """0 / most-negative of `dtype` at the (small) shape of `blocked`. Added instead of masked_fill: the same
    probabilities, and ONNX Runtime's Add over [B, H, S, S] ran 4x faster than its Where."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, torch.finfo(dtype).min)


def _last_row_probs(attn: nn.Module, q, k, blocked: torch.Tensor | None = None) -> torch.Tensor:
    """The last query's float32 probabilities [B, H, 1, S_kv] (causally it sees every key; `blocked`'s last row
    hides left padding), eager order of operations."""
    from transformers.models.llama.modeling_llama import repeat_kv

    logits = torch.matmul(q[:, :, -1:], repeat_kv(k, attn.num_key_value_groups).transpose(2, 3))
    logits = logits.mul_(attn.scaling).float()
    if blocked is not None:
        logits = logits + _additive_mask(blocked[..., -1:, :])
    return torch.softmax(logits, dim=-1)


def _fused_core(attn: nn.Module, q, k, v, causal: bool, blocked: torch.Tensor | None = None):
    """Context [B, H, S, Dh] from scaled_dot_product_attention (no probabilities). `blocked` replaces `causal`
    when given (it must leave every query at least one key: a fully masked row is NaN in SDPA). The mask goes in
    additive, in the query's dtype: a bool mask makes the ONNX exporter guard the softmax with Where(IsNaN), which
    is not the form TensorRT fuses, and ONNX Runtime's CUDA Attention rejects bool masks before 1.25."""
    from transformers.models.llama.modeling_llama import repeat_kv

    groups = attn.num_key_value_groups
    mask = None if blocked is None else _additive_mask(blocked, q.dtype)
    return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask,
                                          is_causal=causal and blocked is None, scale=attn.scaling)


def _fused_core_with_column_probs(attn: nn.Module, q, k, v, blocked: torch.Tensor, columns: torch.Tensor,
                                  kernels: Kernels):
    """Fused attention's context [B, H, S, Dh] and the float32 probabilities of the keys at `columns` [B, n]:
    with the rows' normalisers from the kernel (`lse_from_kernel`: only the n columns' logits are computed,
    exp(logit - logsumexp)), or, exportable, a softmax of one logits pass whose columns are then taken. Either way
    no probabilities-times-values product runs, which is most of an eager layer's extra cost. The exportable
    form is a Softmax, not ReduceLogSumExp + Exp: ONNX Runtime's Softmax is vectorised, and at LLaVA-NeXT's
    S ~ 3000 the logsumexp path made a FitPrune prefill 1.7x slower (bench/results/next_prefill.md)."""
    from transformers.models.llama.modeling_llama import repeat_kv

    keys = repeat_kv(k, attn.num_key_value_groups)
    if kernels.lse_from_kernel:
        bias = _additive_mask(blocked).expand(q.shape[0], 1, *blocked.shape[-2:])  # float32 [B, 1, S, S_kv]
        context, lse = _attention_with_lse(attn, q, keys, repeat_kv(v, attn.num_key_value_groups), blocked)
        picked = torch.matmul(q, take_columns(keys.transpose(2, 3), columns)).mul_(attn.scaling).float()
        return context, torch.exp(picked + take_columns(bias, columns) - lse)
    logits = torch.matmul(q, keys.transpose(2, 3)).mul_(attn.scaling).float() + _additive_mask(blocked)
    return _fused_core(attn, q, k, v, False, blocked), take_columns(torch.softmax(logits, dim=-1), columns)


def _attention_with_lse(attn: nn.Module, q, k, v, blocked: torch.Tensor):
    """(context [B, H, S, Dh], logsumexp [B, H, S, 1] float32) from the fused kernel that reports its
    normalisers: memory-efficient attention on CUDA, the flash kernel on CPU (both take an additive mask)."""
    mask = _additive_mask(blocked, q.dtype)
    if q.device.type == "cuda":
        bias = _aligned(mask.expand(q.shape[0], 1, *blocked.shape[-2:])).expand(*q.shape[:3], k.shape[2])
        context, lse, *_ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, False, scale=attn.scaling)
    else:
        context, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=attn.scaling)
    return context, lse[..., :q.shape[2], None].float()  # the CUDA kernel pads its rows to a multiple of 32


def _aligned(bias: torch.Tensor) -> torch.Tensor:
    """`bias` with its rows 16-element aligned in memory (the memory-efficient kernel's requirement), same values."""
    pad = -bias.shape[-1] % 16
    return F.pad(bias, (0, pad))[..., :bias.shape[-1]] if pad else bias


def take_columns(tensor: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """tensor [B, H, R, S_kv] at key positions columns [B, n] -> [B, H, R, n]."""
    index = columns[:, None, None, :].expand(*tensor.shape[:3], columns.shape[1])
    return torch.gather(tensor.expand(columns.shape[0], *tensor.shape[1:]), 3, index)


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
