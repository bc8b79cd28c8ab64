"""FLOPs models: FitPrune's visual-only Φ (what recipes are fitted to) and a whole-language-model count.

Both count multiply-adds once (a factor 2 cancels in every ratio) and use FitPrune's split accounting at a
pruning layer: the q/k/v projections and attention run on the n tokens that enter layer i, the output
projection and SwiGLU MLP only on the n' tokens left after layer i prunes.

    cost_i(n, n') = n·d·(d + 2·d_kv)  +  2·n²·d  +  n'·d²  +  3·n'·d·m

With multi-head attention (d_kv = d, as in LLaVA-1.5) the first term is the reference code's 3·n·d².
A pre-LLM method removes tokens before the first layer (`removed_before_llm`): every layer sees fewer. A method
that cuts after the whole layer (`after_layer`, AdaptPrune: it reads the next layer's keys of every token) pays
cost_i(n, n) at its pruning layer.
Φ counts visual tokens only (n = visual tokens entering the layer); the whole-LM count adds the prompt's text
tokens to every n and n'. The LM head and embeddings are left out of both.
"""

from __future__ import annotations

from typing import Sequence

from visprune.models.llava import LanguageModelShape


def layer_cost(shape: LanguageModelShape, n_in: float, n_out: float) -> float:
    """Multiply-adds of one decoder layer that n_in tokens enter and n_out leave."""
    d, m = shape.hidden_size, shape.intermediate_size
    d_kv = d * shape.num_kv_heads // shape.num_heads
    return n_in * d * (d + 2 * d_kv) + 2 * n_in * n_in * d + n_out * d * d + 3 * n_out * d * m


def visual_tokens_entering(num_visual: int, removed: Sequence[int]) -> list[int]:
    """[n_0, ..., n_L]: visual tokens entering each layer, n_L being what leaves the last one."""
    counts = [num_visual]
    for r in removed:
        counts.append(counts[-1] - r)
    return counts


def visual_flops(shape: LanguageModelShape, removed: Sequence[int], extra_tokens: float = 0.0,
                 removed_before_llm: int = 0, after_layer: bool = False) -> float:
    """Φ of a per-layer deletion schedule (layers beyond `removed` prune nothing).

    `extra_tokens` non-visual tokens are added to every layer (0 gives FitPrune's visual-only Φ).
    """
    schedule = list(removed) + [0] * (shape.num_layers - len(removed))
    counts = visual_tokens_entering(shape.num_visual_tokens - removed_before_llm, schedule)
    leaving = counts[:-1] if after_layer else counts[1:]  # who runs each layer's output projection and MLP
    return sum(layer_cost(shape, counts[i] + extra_tokens, leaving[i] + extra_tokens)
               for i in range(shape.num_layers))


def visual_flops_reduction(shape: LanguageModelShape, removed: Sequence[int], removed_before_llm: int = 0,
                           after_layer: bool = False) -> float:
    """1 − Φ(recipe)/Φ₀: the fraction of visual-token FLOPs the schedule removes."""
    return 1.0 - visual_flops(shape, removed, 0.0, removed_before_llm, after_layer) / visual_flops(shape, [])


def lm_flops_reduction(shape: LanguageModelShape, removed: Sequence[int], text_tokens: float,
                       removed_before_llm: int = 0, after_layer: bool = False) -> float:
    """Whole-LM FLOPs reduction for a prompt with `text_tokens` non-visual tokens (system, question, tags)."""
    pruned = visual_flops(shape, removed, text_tokens, removed_before_llm, after_layer)
    return 1.0 - pruned / visual_flops(shape, [], text_tokens)
