"""FitPrune's greedy rule and score vectors on hand-made numbers."""

import pytest
import torch

from calibrate.scoring import greedy_deletion_count, select_removals, tokens_to_remove, visual_scores

SCORES = torch.tensor([0.3, 0.1, 0.4, 0.2])  # total 1.0; ascending 0.1, 0.2, 0.3, 0.4


@pytest.mark.parametrize("target, expected", [
    (0.65, 2),   # R(0)=1.0, R(1)=0.9, R(2)=0.7, R(3)=0.4: the largest k with R(k) >= 0.65 is 2
    (0.70, 2),   # mass exactly at the target is still enough
    (0.71, 1),
    (0.90, 1),
    (0.95, 0),
    (1.00, 0),
    (1.50, 0),   # already below target: delete nothing
    (0.0, 3),    # the scan never drops below target: keep one token (the reference reused a stale count)
    (0.40, 3),   # R(3) = 0.4 >= 0.4
])
def test_greedy_deletion_count_hand_made(target, expected):
    assert greedy_deletion_count(SCORES, target) == expected


def test_greedy_deletion_count_ignores_input_order():
    assert greedy_deletion_count(SCORES.flip(0), 0.65) == greedy_deletion_count(SCORES, 0.65) == 2


def test_removed_tokens_are_the_intersection_of_both_low_sets():
    a_self = torch.tensor([0.1, 0.5, 0.2, 0.9])  # two lowest: 0, 2
    a_cross = torch.tensor([0.3, 0.1, 0.05, 0.8])  # two lowest: 2, 1
    assert tokens_to_remove(a_self, a_cross, 2, 2).tolist() == [2]
    assert tokens_to_remove(a_self, a_cross, 3, 3).tolist() == [0, 1, 2]
    assert tokens_to_remove(a_self, a_cross, 0, 3).tolist() == []


def test_alpha_zero_removes_nothing_at_the_reference_state():
    a = torch.tensor([0.05, 0.3, 0.15, 0.5])
    assert select_removals(a, a.flip(0), float(a.sum()), float(a.sum()), alpha=0.0).numel() == 0


def test_visual_scores_follow_the_row_blocks():
    # one sample: prefix 1 | visual 2 | text 2; M rows are queries, columns keys
    m = torch.tensor([
        [1.0, 0.0, 0.0, 0.0, 0.0],
        [0.2, 0.8, 0.0, 0.0, 0.0],
        [0.1, 0.3, 0.6, 0.0, 0.0],
        [0.1, 0.2, 0.4, 0.3, 0.0],
        [0.0, 0.5, 0.1, 0.2, 0.2],
    ])
    # padding row/column must not leak in
    padded = torch.zeros(2, 6, 6)
    padded[0, :5, :5] = m
    padded[1, :5, :5] = m
    padded[0, 5, :] = 9.0
    a_self, a_cross = visual_scores(padded, prefix=[1, 1], visual=[2, 2], text=[2, 2])
    torch.testing.assert_close(a_self[0], torch.tensor([(0.8 + 0.3) / 2, 0.6 / 2], dtype=torch.float64))
    torch.testing.assert_close(a_cross[0], torch.tensor([(0.2 + 0.5) / 2, (0.4 + 0.1) / 2], dtype=torch.float64))
    assert a_self[0].dtype == torch.float64
