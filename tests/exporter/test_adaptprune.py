"""AdaptPrune: the unrolled in-graph soft NMS (exporter/selection.py) against the loop written as the reference
code runs it (exporter/adaptprune_reference.py), the pruned prefill module on tiny against the transformers model's
own attention and hidden states, and the choices where we differ from the reference. ONNX export and engine parity
are in test_new_methods_export.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calibrate.flops import layer_cost, visual_flops, visual_flops_reduction
from calibrate.recipe import Recipe, recipe_from_dict
from calibrate.stage import budget_recipe
from conftest import plain_forward
from exporter import selection
from exporter.adaptprune_reference import gaussian_mask, reference_kept, soft_nms_loop
from exporter.pruned_lm import PrunedLlamaPrefill, _take_rows
from exporter.selection import SelectionInputs
from visprune.errors import BudgetUnreachableError, ConfigError, RecipeError
from visprune.methods import METHODS

PARAMS = METHODS["adaptprune"].params


def grid_point(seed: int, side: int = 8, batch: int = 2, prefix: int = 3, text: int = 5, heads: int = 4,
               key_dim: int = 16, spread: float = 0.15) -> SelectionInputs:
    """A first cut over a whole side x side image: last-row attention probabilities of the visual keys and the
    next layer's raw keys, which are close to one shared direction (`spread`), so that neighbours are similar
    enough for the soft NMS to suppress them (random 16-d keys would never be)."""
    g = torch.Generator().manual_seed(seed)
    n, seq = side * side, prefix + side * side + text
    logits = torch.randn(batch, heads, 1, seq, generator=g) * 2
    probs = torch.softmax(logits, dim=-1)[..., prefix:prefix + n]
    keys = torch.randn(key_dim, generator=g) + spread * torch.randn(batch, seq, key_dim, generator=g)
    return SelectionInputs(image_starts=torch.full((batch,), prefix), visual_ids=torch.arange(n).expand(batch, -1),
                           hidden=torch.zeros(batch, seq, 4), probs=probs, next_keys=keys * 3.0, num_visual=n)


def loop_picks(v: SelectionInputs, b: int, keep: int, allow_repick: bool = False) -> list[int]:
    """The reference loop on row b of a grid point."""
    side, start = int(v.num_visual ** 0.5), int(v.image_starts[b])
    scores = v.probs.mean(dim=1)[b, -1].view(side, side) * gaussian_mask(side, PARAMS["prior_sigma"])
    keys = F.normalize(v.next_keys[b, start:start + v.num_visual], p=2, dim=-1)
    return soft_nms_loop(scores, keys, PARAMS["distance_limit"], PARAMS["distance_sigma"], PARAMS["similarity_sigma"],
                         keep, allow_repick)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep", [1, 6, 20, 63])
def test_unrolled_soft_nms_picks_what_the_reference_loop_picks_in_order(seed, keep):
    v = grid_point(seed)
    got = selection.adaptprune(v, keep, **PARAMS)
    assert got.shape == (2, keep) and got.dtype == torch.int64
    for b in range(2):
        assert got[b].tolist() == loop_picks(v, b, keep), (seed, keep, b)


def test_the_suppression_changes_the_picks():
    """On the grid points above the soft NMS does real work: its picks are not the plain best scores."""
    v = grid_point(0)
    scores = v.probs.mean(dim=1)[:, -1] * gaussian_mask(8, PARAMS["prior_sigma"]).flatten()
    got = selection.adaptprune(v, 20, **PARAMS)
    assert all(set(got[b].tolist()) != set(scores[b].topk(20).indices.tolist()) for b in range(2))
    assert got[0, 0] == scores[0].argmax()  # the first pick is the best score itself


def test_the_centre_prior_is_the_references_and_favours_the_centre():
    mask = gaussian_mask(24, 12.0)
    prior = selection._centre_prior(24, 12.0, torch.device("cpu"))
    assert torch.equal(prior, mask.flatten()) and mask.max() == 1.0
    assert 0.36 < float(mask[0, 0]) < 0.38 and 0.60 < float(mask[0, 12]) < 0.62  # pruning_methods.md §3.2


def test_no_token_is_picked_twice_when_every_score_reaches_zero():
    """The reference re-picks once every score left is 0 (its arg-max falls on a taken index); we mask picks out.
    One token gets all the attention: after it, every score is 0."""
    v = grid_point(1)
    v.probs = torch.zeros_like(v.probs)
    v.probs[..., 27] = 1.0
    got = selection.adaptprune(v, 5, **PARAMS)
    for b in range(2):
        assert got[b, 0] == 27 and len(set(got[b].tolist())) == 5
        assert got[b].tolist() == loop_picks(v, b, 5)
        repicked = loop_picks(v, b, 5, allow_repick=True)
        assert repicked[0] == 27 and len(set(repicked)) < 5  # the reference's duplicate


def test_a_grid_that_is_not_square_is_refused_with_a_hint():
    v = grid_point(0)
    v.num_visual = 60
    with pytest.raises(ConfigError) as info:
        selection.adaptprune(v, 4, **PARAMS)
    assert "square" in str(info.value) and "--method" in info.value.hint


# ---- in the model: tiny --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", [0.4, 0.8])
def test_prefill_keeps_what_the_reference_keeps_from_the_models_own_attention_and_keys(tiny, two_prompts, reduction):
    """The cue of layer K-1 (last row, heads averaged) and layer K's k_proj of the raw hidden states entering it,
    taken from the transformers model itself (output_attentions, output_hidden_states), then the loop. 40 % cuts
    before layer 2, 80 % before layer 1 (a cut before layer 2 cannot remove 80 % of tiny's 8 layers)."""
    embeds, start, _ = two_prompts
    recipe = budget_recipe(tiny.shape, reduction, "adaptprune")
    (cut,) = [i for i, r in enumerate(recipe.removed) if r]
    assert cut == (1 if reduction == 0.4 else 0) and recipe.search["cut_before_layer"] == cut + 1
    with torch.no_grad():
        _, _, kept = PrunedLlamaPrefill(tiny.model, recipe, start)(embeds)
        expected = reference_kept(tiny.model, embeds, start, 576, recipe.keep[-1], cut + 1, PARAMS)
    assert kept[0].tolist() == expected


def test_the_cut_comes_after_the_whole_layer_and_the_caches_are_not_doubled(tiny, two_prompts):
    """Layer K-1 runs every token to its end (the selection reads its output); from layer K on, the survivors
    alone, at their original positions. Layer K-1's cache is the unpruned one, once (the reference's extra pass
    appends it twice)."""
    embeds, start, _ = two_prompts
    recipe = budget_recipe(tiny.shape, 0.6, "adaptprune")
    (cut,) = [i for i, r in enumerate(recipe.removed) if r]
    batch, seq, _ = embeds.shape
    with torch.no_grad():
        logits, presents, kept = PrunedLlamaPrefill(tiny.model, recipe, start)(embeds)
        _, full_kv = plain_forward(tiny.model, embeds, torch.arange(seq).expand(batch, -1))
        rows = torch.cat([torch.arange(start).expand(batch, -1), start + kept[0],
                          torch.arange(start + 576, seq).expand(batch, -1)], dim=1)
        expected_logits = continue_pruned(tiny.model, embeds, rows, cut)
    assert all(torch.allclose(a, e, atol=1e-5, rtol=0) for a, e in zip(presents[:2 * cut + 2], full_kv))
    assert all(t.shape[2] == seq - recipe.removed[cut] for t in presents[2 * cut + 2:])
    assert (logits - expected_logits).abs().max() <= 1e-5


def continue_pruned(model, embeds: torch.Tensor, rows: torch.Tensor, cut: int) -> torch.Tensor:
    """Layers 0..cut on every token, then the rows that survive at their original positions: last logits."""
    from visprune.models.decoder import attend, causal_blocked, finish_layer

    lm = model.model.language_model
    hidden, positions = embeds, torch.arange(embeds.shape[1]).expand(embeds.shape[0], -1)
    for i, layer in enumerate(lm.layers):
        if i == cut + 1:
            hidden, positions = _take_rows(hidden, rows), rows
        context, _, _, _ = attend(layer, lm.rotary_emb, hidden, positions, blocked=causal_blocked(hidden.shape[1]))
        hidden = finish_layer(layer, hidden, context)
    return model.lm_head(lm.norm(hidden[:, -1]))


# ---- budgets and recipes ---------------------------------------------------------------------------------------


def test_the_flops_count_charges_the_cut_layers_mlp_for_every_token(tiny):
    """AdaptPrune's count is FastV's cut with layer K-1's output projection and MLP run on all N tokens."""
    shape, n = tiny.shape, 576
    recipe = budget_recipe(shape, 0.6, "adaptprune")
    (cut,) = [i for i, r in enumerate(recipe.removed) if r]
    kept = n - recipe.removed[cut]
    by_hand = sum(layer_cost(shape, n, n) for _ in range(cut + 1)) + \
        sum(layer_cost(shape, kept, kept) for _ in range(cut + 1, shape.num_layers))
    assert recipe.achieved["visual_flops_reduction"] == round(1 - by_hand / visual_flops(shape, []), 6)
    assert recipe.achieved["visual_flops_reduction"] >= 0.6
    fastv_count = visual_flops_reduction(shape, recipe.removed)  # the same counts charged as FastV's cut
    assert fastv_count > recipe.achieved["visual_flops_reduction"]
    assert recipe.keep[-1] < budget_recipe(shape, 0.6, "fastv").keep[-1]  # so it keeps fewer for the budget


def test_a_budget_one_cut_after_layer_0_cannot_reach_says_how_far_it_goes(tiny):
    with pytest.raises(BudgetUnreachableError) as info:
        budget_recipe(tiny.shape, 0.9, "adaptprune")
    assert "87.4%" in str(info.value) and "at most 0.87" in info.value.hint
    assert budget_recipe(tiny.shape, 0.87, "adaptprune").keep[-1] >= 1


def test_a_recipe_pruning_at_the_last_layer_is_refused():
    with pytest.raises(RecipeError) as info:
        recipe_from_dict({"method": "adaptprune", "num_visual_tokens": 576, "removed": [0] * 7 + [100]})
    assert "next layer" in str(info.value) and "earlier layer" in info.value.hint
    assert Recipe("adaptprune", 576, [0, 100] + [0] * 6).keep[-1] == 476
