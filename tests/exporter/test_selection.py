"""The in-graph token selections (exporter/selection.py) against straightforward references written from each
method's description (plain loops and Python sets, float64), and the pruned prefill module around them.

No ONNX export here: these run in seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from calibrate.recipe import Recipe
from calibrate.scoring import visual_scores
from calibrate.stage import budget_recipe
from conftest import TINY_RECIPE_60, plain_forward
from exporter import selection
from exporter.graphs import VisionFeatures
from exporter.pruned_lm import PrunedLlamaPrefill, _take_rows
from exporter.selection import SelectionInputs
from visprune.methods import METHODS
from visprune.models.decoder import attend, causal_blocked, finish_layer, take_columns

SEEDS = range(5)


def random_point(seed: int, batch: int = 2, prefix: int = 3, n: int = 40, num_visual: int = 64, text: int = 6,
                 heads: int = 4, kv_heads: int = 2, head_dim: int = 8, hidden: int = 16,
                 all_columns: bool = False) -> SelectionInputs:
    """A pruning point with random contents: n of num_visual image tokens still present (a different sorted
    subset per batch row), causal attention probabilities of the visual keys (the prefill's view; `all_columns`:
    of every key, as calibration sees them), keys (and the next layer's raw keys), hidden states and the per-image
    scores."""
    g = torch.Generator().manual_seed(seed)
    seq = prefix + n + text
    visual_ids = torch.stack([torch.randperm(num_visual, generator=g)[:n].sort().values for _ in range(batch)])
    logits = torch.randn(batch, heads, seq, seq, generator=g) * 3
    logits.masked_fill_(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    starts = torch.full((batch,), prefix)
    return SelectionInputs(
        image_starts=starts, visual_ids=visual_ids, hidden=torch.randn(batch, seq, hidden, generator=g),
        probs=probs if all_columns else take_columns(probs, selection.visual_positions(starts, n)), key=torch.randn(batch, kv_heads, seq, head_dim, generator=g),
        random_scores=torch.rand(num_visual, generator=g), image_scores=torch.rand(batch, num_visual, generator=g),
        next_keys=torch.randn(batch, seq, kv_heads * head_dim, generator=g), num_visual=num_visual)


def visual(v: SelectionInputs, b: int) -> list[torch.Tensor]:
    """Row b's visual hidden states, one float64 vector per token present."""
    return [v.hidden[b, int(v.image_starts[b]) + i].double() for i in range(v.visual_ids.shape[1])]


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y) / (math.sqrt(float(x @ x)) * math.sqrt(float(y @ y)))


def largest(scores: list[float], keep: int) -> set[int]:
    return set(sorted(range(len(scores)), key=lambda i: -scores[i])[:keep])


def reference_divprune(vectors: list[torch.Tensor], keep: int) -> set[int]:
    """DivPrune's reference algorithm: cosine distance 1 - cos; the first pick is the token farthest from its
    nearest other token; each next one the not-yet-chosen token farthest from the chosen set (its min distance to
    it). The min over the chosen set is kept up to date pick by pick (same values, fewer loops)."""
    n = len(vectors)
    unit = np.stack([x.numpy() / np.linalg.norm(x.numpy()) for x in vectors])  # float64
    distance = 1.0 - unit @ unit.T
    nearest_other = [min(distance[i][j] for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: nearest_other[i])]
    to_chosen = list(distance[chosen[0]])
    while len(chosen) < keep:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: to_chosen[i]))
        to_chosen = [min(a, b) for a, b in zip(to_chosen, distance[chosen[-1]])]
    assert len(set(chosen)) == len(chosen)
    return set(chosen)


def reference_dart(v: SelectionInputs, b: int, keep: int, pivots: int = 8) -> set[int]:
    """DART: the `pivots` tokens with the largest key L1 norm (all KV heads); then, pivot by pivot in descending
    norm order, the pivot's share of the remaining budget among the not-yet-taken tokens least cosine-similar to
    it (shares split evenly, the first ones larger)."""
    n, start = v.visual_ids.shape[1], int(v.image_starts[0])
    norms = [float(v.key[b, :, start + i].double().abs().sum()) for i in range(n)]
    pivots = min(pivots, keep)
    pivot_list = sorted(range(n), key=lambda i: -norms[i])[:pivots]
    rest = keep - pivots
    shares = [rest // pivots + (1 if j < rest % pivots else 0) for j in range(pivots)]
    assert sum(shares) == rest
    vectors, taken = visual(v, b), set(pivot_list)
    for pivot, share in zip(pivot_list, shares):
        similarity = {i: cosine(vectors[pivot], vectors[i]) for i in range(n) if i not in taken}
        taken |= set(sorted(similarity, key=lambda i: similarity[i])[:share])
    assert len(taken) == keep
    return taken


def picked(indices: torch.Tensor, b: int) -> set[int]:
    row = indices[b].tolist()
    assert len(set(row)) == len(row), f"repeated picks: {row}"
    return set(row)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("keep", [1, 2, 9, 20, 39])
def test_divprune_picks_what_the_reference_greedy_max_min_picks(seed, keep):
    v = random_point(seed)
    got = selection.divprune(v, keep)
    assert got.shape == (2, keep)
    for b in range(2):
        assert picked(got, b) == reference_divprune(visual(v, b), keep)


def test_divprune_first_pick_is_the_most_isolated_token_and_duplicates_are_not_both_kept():
    """Hand-made features: token 5 is far from everything; tokens 0 and 1 are identical (distance 0), so keeping
    both before every distinct direction is chosen would be the self-distance bug DivPrune's code relies on."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 16, generator=g)
    base[1] = base[0]
    base[5] = -base[:5].sum(0)  # pointing away from the rest
    v = SelectionInputs(image_starts=torch.tensor([1]), visual_ids=torch.arange(6).unsqueeze(0),
                        hidden=torch.cat([torch.randn(1, 1, 16, generator=g), base.unsqueeze(0),
                                          torch.randn(1, 2, 16, generator=g)], dim=1))
    got = selection.divprune(v, 5)[0].tolist()
    assert got[0] == reference_divprune(visual(v, 0), 1).pop() == 5
    assert set(got) == reference_divprune(visual(v, 0), 5) and not {0, 1} <= set(got)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("keep", [1, 5, 8, 9, 15, 23, 39])
def test_dart_picks_what_the_reference_pivot_loop_picks(seed, keep):
    v = random_point(seed)
    got = selection.dart(v, keep, pivots=METHODS["dart"].params["pivots"])
    assert got.shape == (2, keep)
    for b in range(2):
        assert picked(got, b) == reference_dart(v, b, keep)


def test_dart_uses_the_registered_number_of_pivots_and_counts_them_in_keep():
    v = random_point(11)
    for pivots in (1, 3, 8):
        for b in range(2):
            assert picked(selection.dart(v, 20, pivots=pivots), b) == reference_dart(v, b, 20, pivots)
    assert METHODS["dart"].params == {"pivots": 8}


def head_combined_scores(v: SelectionInputs, combined: torch.Tensor) -> tuple[list, list]:
    """calibrate/scoring.py's (a_self, a_cross) per row, from heads-combined probabilities [B, S, S]."""
    batch, seq, _ = combined.shape
    n = v.visual_ids.shape[1]
    return visual_scores(combined, v.image_starts.tolist(), [n] * batch, [seq - int(v.image_starts[0]) - n] * batch)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("keep", [1, 7, 20, 39])
def test_fitprune_variants_rank_as_calibration_scores_them(seed, keep):
    """The product (heads max), its ablations (self term, cross term, heads averaged) and FastV's last-token score,
    against calibrate/scoring.py on the same probabilities (and the last row read directly)."""
    v, everything = random_point(seed), random_point(seed, all_columns=True).probs
    head_max, head_mean = everything.amax(dim=1), everything.mean(dim=1)
    (max_self, max_cross), (mean_self, mean_cross) = head_combined_scores(v, head_max), head_combined_scores(v, head_mean)
    start = int(v.image_starts[0])
    span = slice(start, start + v.visual_ids.shape[1])
    for b in range(2):
        expected = {
            "fitprune_product": largest((max_self[b] * max_cross[b]).tolist(), keep),
            "fitprune_self": largest(max_self[b].tolist(), keep),
            "fitprune_cross": largest(max_cross[b].tolist(), keep),
            "fitprune_head_mean": largest((mean_self[b] * mean_cross[b]).tolist(), keep),
            "last_token": largest([float(everything[b, :, -1, span.start + i].double().mean())
                                   for i in range(span.stop - span.start)], keep),
        }
        for name, want in expected.items():
            assert picked(getattr(selection, name)(v, keep), b) == want, name


def test_the_fitprune_variants_are_not_all_the_same_ranking():
    """Guard for the test above: on random data the ablations must actually select differently."""
    v = random_point(0)
    names = ["fitprune_product", "fitprune_self", "fitprune_cross", "fitprune_head_mean", "last_token"]
    sets = {name: frozenset(getattr(selection, name)(v, 20)[0].tolist()) for name in names}
    assert len(set(sets.values())) == len(names)


@pytest.mark.parametrize("seed", SEEDS)
def test_visionzip_and_random_score_image_indices_not_positions(seed):
    """Both read a per-image-index score: with a subset of the image present, position i is image index
    visual_ids[i]."""
    v = random_point(seed)
    for b in range(2):
        ids = v.visual_ids[b].tolist()
        assert picked(selection.visionzip(v, 10), b) == largest([float(v.image_scores[b, i]) for i in ids], 10)
        assert picked(selection.random(v, 10), b) == largest([float(v.random_scores[i]) for i in ids], 10)


SELECTIONS = sorted({m.selection for m in METHODS.values() if m.selection})


@pytest.mark.parametrize("name", SELECTIONS)
@pytest.mark.parametrize("pre_llm", [False, True], ids=["in-llm", "pre-llm"])
def test_every_selection_returns_keep_distinct_positions_in_range(name, pre_llm):
    """keep in {1, 7, n-1}, with all image tokens present (pre-LLM) or a subset (in-LLM)."""
    params = next(m.params for m in METHODS.values() if m.selection == name)
    n = 64 if pre_llm else 40
    v = random_point(3, n=n)
    for keep in (1, 7, n - 1):
        got = getattr(selection, name)(v, keep, **params)
        assert got.shape == (2, keep) and got.dtype == torch.int64, (name, keep)
        for b in range(2):
            assert len(picked(got, b)) == keep and 0 <= min(got[b]) and max(got[b]) < n, (name, keep)


@pytest.mark.parametrize("name", SELECTIONS)
def test_every_selection_ranks_in_float32_under_a_float16_model(name, monkeypatch):
    """fp16 hidden states and keys (probabilities stay float32, as decoder.attend makes them): every TopK and ArgMax
    over scores sees float32, as the float16 export's float32 islands require (a float16 sum of a 7B model's
    4096 key magnitudes can overflow, and its rounding reorders near-ties)."""
    params = next(m.params for m in METHODS.values() if m.selection == name)
    v = random_point(4)
    v.hidden, v.key, v.next_keys = v.hidden.half(), v.key.half(), v.next_keys.half()
    seen = []
    topk, argmax = torch.topk, torch.Tensor.argmax

    def recording_topk(input, *args, **kwargs):
        seen.append(input.dtype)
        return topk(input, *args, **kwargs)

    def recording_argmax(self, *args, **kwargs):
        seen.append(self.dtype)
        return argmax(self, *args, **kwargs)

    monkeypatch.setattr(torch, "topk", recording_topk)
    monkeypatch.setattr(torch.Tensor, "argmax", recording_argmax)
    getattr(selection, name)(v, 20, **params)
    scores = [dtype for dtype in seen if dtype != torch.int64]  # index sorts are fine
    assert scores and set(scores) == {torch.float32}, seen


def test_every_registered_selection_exists():
    assert SELECTIONS and all(callable(getattr(selection, name, None)) for name in SELECTIONS)


# ---- VisionZip's score in the vision graph -------------------------------------------------------------------


def test_visionzip_scores_are_the_feature_layers_cls_attention_heads_summed(tiny):
    model = tiny.model
    assert model.model.vision_tower.config._attn_implementation == "eager"
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = VisionFeatures(model)(pixels)
        features, scores = VisionFeatures(model, cls_scores=True)(pixels)
        attentions = model.model.vision_tower(pixels, output_attentions=True).attentions
    expected = attentions[model.config.vision_feature_layer][:, :, 0, 1:].sum(1)
    assert scores.shape == (2, 576) and scores.dtype == torch.float32
    assert torch.allclose(scores, expected.float(), atol=1e-5, rtol=0), (scores - expected).abs().max()
    assert torch.equal(features, plain)
    # not some other layer's row (guards against an off-by-one between hidden_states and layers)
    others = [i for i in range(len(attentions)) if i % len(attentions) != model.config.vision_feature_layer % len(attentions)]
    assert all((scores - attentions[i][:, :, 0, 1:].sum(1)).abs().max() > 1e-3 for i in others)


# ---- the pruned prefill module on tiny ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["divprune", "visionzip"])
def test_pre_llm_prefill_shrinks_the_image_before_the_first_layer(tiny, two_prompts, method):
    embeds, start, image_scores = two_prompts
    recipe = budget_recipe(tiny.shape, 0.6, method)
    removed = recipe.removed_before_llm
    assert removed > 0 and not any(recipe.removed)
    batch, seq, _ = embeds.shape
    with torch.no_grad():
        logits, presents, kept = PrunedLlamaPrefill(tiny.model, recipe, start)(
            embeds, image_scores=image_scores if METHODS[method].vision_score else None)
    assert len(presents) == 2 * tiny.shape.num_layers
    assert all(t.shape[2] == seq - removed for t in presents)
    assert len(kept) == 1 and kept[0].shape == (batch, 576 - removed)
    assert (kept[0].diff(dim=1) > 0).all()  # ascending: original order
    for b in range(batch):
        if method == "divprune":
            image = [embeds[b, start + i].double() for i in range(576)]
            assert set(kept[0][b].tolist()) == reference_divprune(image, 576 - removed)
        else:
            assert set(kept[0][b].tolist()) == largest(image_scores[b].tolist(), 576 - removed)
    # the rest is the unpruned model over the surviving rows, at their original positions
    rows = torch.cat([torch.arange(start).expand(batch, -1), start + kept[0],
                      torch.arange(start + 576, seq).expand(batch, -1)], dim=1)
    with torch.no_grad():
        expected_logits, expected_kv = plain_forward(tiny.model, _take_rows(embeds, rows), rows)
    assert (logits - expected_logits).abs().max() <= 1e-5
    assert all(torch.allclose(a, e, atol=1e-5, rtol=0) for a, e in zip(presents, expected_kv))


def test_visionzip_prefill_needs_its_scores_and_uses_them(tiny, two_prompts):
    embeds, start, image_scores = two_prompts
    recipe = budget_recipe(tiny.shape, 0.6, "visionzip")
    prefill = PrunedLlamaPrefill(tiny.model, recipe, start)
    with torch.no_grad():
        _, _, kept = prefill(embeds, image_scores=image_scores)
        _, _, flipped = prefill(embeds, image_scores=image_scores.flip(0))
    assert torch.equal(kept[0][0], flipped[0][1]) and torch.equal(kept[0][1], flipped[0][0])


def reference_fitprune_prefill(model, hidden: torch.Tensor, start: int, removed: list[int]):
    """FitPrune at inference written out: per pruning layer, a_self * a_cross (calibrate/scoring.py) from the
    head-max probabilities, keep the best in original order; KV taken before pruning."""
    lm = model.model.language_model
    batch, seq, _ = hidden.shape
    positions = torch.arange(seq).expand(batch, -1)
    visual_ids = torch.arange(576).expand(batch, -1)
    kv, kept = [], []
    for layer, count in zip(lm.layers, removed):
        context, probs, key, value = attend(layer, lm.rotary_emb, hidden, positions,
                                            blocked=causal_blocked(hidden.shape[1]))
        kv += [key, value]
        if count:
            n, s = visual_ids.shape[1], hidden.shape[1]
            a_self, a_cross = visual_scores(probs.amax(dim=1), [start] * batch, [n] * batch, [s - start - n] * batch)
            survivors = [sorted(largest((a_self[b] * a_cross[b]).tolist(), n - count)) for b in range(batch)]
            local = torch.tensor(survivors)
            rows = torch.cat([torch.arange(start).expand(batch, -1), start + local,
                              torch.arange(start + n, s).expand(batch, -1)], dim=1)
            hidden, context, positions = (_take_rows(t, rows) for t in (hidden, context, positions))
            visual_ids = torch.gather(visual_ids, 1, local)
            kept.append(visual_ids)
        hidden = finish_layer(layer, hidden, context)
    return model.lm_head(lm.norm(hidden[:, -1])), kv, kept


def test_in_llm_fitprune_prefill_is_unchanged(tiny, two_prompts):
    """The calibrated 60 % recipe: the same kept indices, caches and logits as FitPrune written out by hand."""
    embeds, start, _ = two_prompts
    recipe = Recipe("fitprune", 576, TINY_RECIPE_60)
    with torch.no_grad():
        logits, presents, kept = PrunedLlamaPrefill(tiny.model, recipe, start)(embeds)
        expected_logits, expected_kv, expected_kept = reference_fitprune_prefill(tiny.model, embeds, start,
                                                                                 TINY_RECIPE_60)
    assert [k.tolist() for k in kept] == [k.tolist() for k in expected_kept]
    assert [k.shape[1] for k in kept] == recipe.keep[:6]
    assert [t.shape[2] for t in presents[::2]] == [embeds.shape[1] - sum(TINY_RECIPE_60[:i]) for i in range(8)]
    assert (logits - expected_logits).abs().max() <= 1e-5
    assert all(torch.allclose(a, e, atol=1e-5, rtol=0) for a, e in zip(presents, expected_kv))


def test_dart_prefill_cuts_once_with_the_reference_choice(tiny, two_prompts):
    """DART in the model: one cut at the recipe's layer, from that layer's keys and input_layernorm output."""
    embeds, start, _ = two_prompts
    recipe = budget_recipe(tiny.shape, 0.6, "dart")
    (layer_index,) = [i for i, r in enumerate(recipe.removed) if r]
    keep = 576 - recipe.removed[layer_index]
    with torch.no_grad():
        _, presents, kept = PrunedLlamaPrefill(tiny.model, recipe, start)(embeds)
        lm = tiny.model.model.language_model
        hidden, positions = embeds, torch.arange(embeds.shape[1]).expand(2, -1)
        for layer in lm.layers[:layer_index]:
            context, _, _, _ = attend(layer, lm.rotary_emb, hidden, positions, blocked=causal_blocked(hidden.shape[1]))
            hidden = finish_layer(layer, hidden, context)
        layer = lm.layers[layer_index]
        _, _, key, _ = attend(layer, lm.rotary_emb, hidden, positions, blocked=causal_blocked(hidden.shape[1]))
        point = SelectionInputs(torch.full((2,), start), torch.arange(576).expand(2, -1), layer.input_layernorm(hidden), key=key)
    assert len(kept) == 1 and kept[0].shape == (2, keep) and (kept[0].diff(dim=1) > 0).all()
    for b in range(2):
        assert set(kept[0][b].tolist()) == reference_dart(point, b, keep)
    assert all(t.shape[2] == embeds.shape[1] for t in presents[:2 * (layer_index + 1)])
    assert all(t.shape[2] == embeds.shape[1] - recipe.removed[layer_index] for t in presents[2 * (layer_index + 1):])
