"""The recipe search on the tiny model and the default calibration set (CPU)."""

import pytest
import torch

from calibrate.flops import visual_flops_reduction
from conftest import make_search
from visprune.errors import BudgetUnreachableError


@pytest.fixture(scope="module")
def results(default_search):
    return {r: default_search.search(r) for r in (0.4, 0.6, 0.8)}


def test_reduction_zero_removes_nothing(default_search):
    result = default_search.search(0.0)
    assert result.best.recipe_removed == [0] * default_search.shape.num_layers


@pytest.mark.parametrize("target", [0.4, 0.6, 0.8])
def test_achieved_reduction_meets_the_target_within_two_points(results, default_search, target):
    removed = results[target].best.recipe_removed
    achieved = visual_flops_reduction(default_search.shape, removed)
    assert target <= achieved <= target + 0.02
    assert achieved == pytest.approx(results[target].best.visual_reduction)


def test_higher_targets_never_keep_more_tokens(results, default_search):
    n = default_search.shape.num_visual_tokens

    def tokens_kept_over_layers(removed):
        kept, total = n, 0
        for r in removed:
            kept -= r
            total += kept
        return total

    totals = [tokens_kept_over_layers(results[t].best.recipe_removed) for t in (0.4, 0.6, 0.8)]
    assert totals[0] >= totals[1] >= totals[2]
    assert sum(results[0.4].best.recipe_removed) < sum(results[0.8].best.recipe_removed)


def test_the_smallest_feasible_alpha_is_kept(results):
    for result in results.values():
        feasible = [s.alpha for s in result.steps if s.feasible]
        assert result.best.feasible and result.best.alpha == min(feasible)
        assert len(result.steps) == 7  # bisection of [0, 1] to 0.01


def test_an_unreachable_budget_is_an_error(default_search):
    with pytest.raises(BudgetUnreachableError, match="Hint: Ask for at most"):
        default_search.search(0.999)


def test_reference_pass_reproduces_the_hugging_face_forward(tiny, default_search):
    """Layer outputs and head-max scores of our replay equal HF's eager forward for a sample."""
    from visprune.models import chat_prompt, encode_image_prompt, load_image
    from calibrate.data import default_calibration_set

    sample = default_calibration_set().samples[0]
    prompt = encode_image_prompt(tiny.processor, load_image(sample.image), chat_prompt(tiny.processor, sample.question),
                                 tiny.image_token_id)
    with torch.no_grad():
        out = tiny.model(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values,
                         output_hidden_states=True, output_attentions=True)
    trunk = default_search.trunk
    for layer in range(len(trunk.outputs) - 1):  # the last entry of HF's tuple is after the final norm
        torch.testing.assert_close(trunk.outputs[layer][0], out.hidden_states[layer + 1][0], atol=1e-5, rtol=1e-5)
    start, n = prompt.image_start, prompt.num_visual
    head_max = out.attentions[3][0].amax(0).double()
    expected_self = head_max[start:start + n, start:start + n].sum(0) / n
    expected_cross = head_max[start + n:, start:start + n].sum(0) / (prompt.seq_len - start - n)
    torch.testing.assert_close(trunk.a_self[3][0], expected_self, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(trunk.a_cross[3][0], expected_cross, atol=1e-6, rtol=1e-5)


def test_trunk_reuse_and_batching_do_not_change_the_recipe(tiny, small_states):
    """Shortcuts must be exact: same recipes with the trunk cache off, and at batch size 1."""
    plain = make_search(tiny, small_states, batch_size=4)
    no_trunk = make_search(tiny, small_states, batch_size=4, trunk_cache_bytes=0)
    batch_one = make_search(tiny, small_states, batch_size=1)
    for alpha in (0.05, 0.2):
        recipes = [s.evaluate(alpha, 0.6).recipe_removed for s in (plain, no_trunk, batch_one)]
        assert recipes[0] == recipes[1] == recipes[2]
        assert sum(recipes[0]) > 0
    assert plain.layers_computed < no_trunk.layers_computed  # the trunk really saved work


def test_pruned_tokens_keep_their_original_positions(tiny, small_states):
    search = make_search(tiny, small_states[:2], batch_size=2, trunk_cache_bytes=0)
    states = [None, None]
    search._prune_layer(0, states, alpha=0.3)
    search._prune_layer(1, states, alpha=0.3)
    for state, original in zip(states, small_states[:2]):
        assert state.num_visual < original.num_visual
        kept_positions = state.positions[state.prefix:state.prefix + state.num_visual]
        assert kept_positions.tolist() == (original.prefix + state.kept).tolist()
        assert state.positions[-1] == original.positions[-1]  # text keeps its unpruned positions
