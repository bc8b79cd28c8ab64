"""One Llama decoder layer in two halves, with the attention probabilities exposed.

Calibration needs each layer's probabilities for FitPrune's scores; export needs the same math traced into a
graph. Both use these functions, which follow Hugging Face's eager Llama attention (RoPE at each token's own
position, float32 softmax), so the layer is written once. The split exists because FitPrune prunes between
the halves: a token deleted at layer i is a query and key in its attention but skips its output projection
and MLP (both row-wise).

Shape legend: B batch, S queries, S_kv keys (past + S), H heads, Hkv key/value heads, Dh head dim, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn


def attend(layer: nn.Module, rotary: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
           blocked: torch.Tensor | None = None, past: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Attention half of `layer` for hidden [B, S, D] at positions [B, S].

    `blocked` (bool, broadcastable to [B, H, S, S_kv]) marks keys a query may not see; `past` is this layer's
    cached (key, value). Returns context [B, S, H*Dh] (before o_proj), probabilities [B, H, S, S_kv] in
    float32, and the layer's cache key/value [B, Hkv, S_kv, Dh] with RoPE applied.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    q, k, v = (proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    cos, sin = rotary(x, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    # HF's order of operations (so float32 rounding matches its eager forward). The upcast comes before the
    # softmax because `softmax(x, dtype=float32)` exports as a half-precision Softmax plus a Cast, which would
    # lose the float32 island that fp16/bf16 graphs need.
    logits = torch.matmul(q, repeat_kv(k, attn.num_key_value_groups).transpose(2, 3)).mul_(attn.scaling).float()
    if blocked is not None:
        logits.masked_fill_(blocked, torch.finfo(torch.float32).min)
    probs = torch.softmax(logits, dim=-1)
    context = torch.matmul(probs.to(v.dtype), repeat_kv(v, attn.num_key_value_groups))
    return context.transpose(1, 2).reshape(batch, seq, -1), probs, k, v


def finish_layer(layer: nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Output projection, residual and MLP half of `layer`; row-wise, so any subset of rows may go through."""
    hidden = hidden + layer.self_attn.o_proj(context)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def causal_blocked(seq: int, device: torch.device | None = None) -> torch.Tensor:
    """[S, S] True above the diagonal: keys later in the sequence (pruning keeps the order)."""
    return torch.ones(seq, seq, dtype=torch.bool, device=device).tril().logical_not()
