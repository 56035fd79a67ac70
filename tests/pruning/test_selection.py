"""One pruning step of IMP + AP against a naive reference, its shortfall rule, ties, and the sparsity of masks."""

from __future__ import annotations

import pytest
import torch

from lit_methods.pruning import masked_share, select_surviving_weights, smallest_indices


def naive_selection(weights, start, alive, prune_rate, ap_rate):
    """Python-list reference of one IMP + AP step (distinct values, so no ties)."""
    alive = list(alive)
    n = sum(alive)
    n_total, n_ap = round(prune_rate * n), round(ap_rate * n)
    by_magnitude = sorted((abs(w), i) for i, w in enumerate(weights) if alive[i])
    for _, i in by_magnitude[: n_total - n_ap]:
        alive[i] = False
    by_movement = sorted((abs(w - s), i) for i, (w, s) in enumerate(zip(weights, start)) if alive[i] and w < 0)
    removed_by_ap = [i for _, i in by_movement[:n_ap]]
    for i in removed_by_ap:
        alive[i] = False
    return alive, removed_by_ap


@pytest.mark.parametrize("ap_rate", [0.0, 0.05, 0.1])
def test_selection_matches_a_naive_reference(ap_rate):
    g = torch.Generator().manual_seed(0)
    weights = torch.randn(400, generator=g, dtype=torch.float64)
    start = torch.randn(400, generator=g, dtype=torch.float64)
    alive = torch.rand(400, generator=g) > 0.3
    got, counts = select_surviving_weights(weights, start, alive, 0.2, ap_rate)
    expected, removed_by_ap = naive_selection(weights.tolist(), start.tolist(), alive.tolist(), 0.2, ap_rate)
    assert got.tolist() == expected
    assert counts["ap"] == len(removed_by_ap) == round(ap_rate * int(alive.sum()))
    assert all(weights[i] < 0 for i in removed_by_ap)
    assert int(alive.sum()) - int(got.sum()) == round(0.2 * int(alive.sum()))


def test_selection_prunes_by_magnitude_when_too_few_weights_are_negative():
    weights = torch.tensor([-0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    alive, counts = select_surviving_weights(weights, torch.zeros(10), torch.ones(10, dtype=torch.bool), 0.5, 0.3)
    # 2 by magnitude (-0.5, 1.0), no negative weight left for AP's 3, so 2.0, 3.0, 4.0 go by magnitude
    assert counts == {"magnitude": 2, "ap": 0, "shortfall": 3}
    assert alive.tolist() == [False] * 5 + [True] * 5


def test_smallest_indices_skip_ineligible_entries_and_break_ties_by_position():
    scores = torch.tensor([3.0, 1.0, 1.0, 0.5, 1.0, 2.0])
    eligible = torch.tensor([True, True, True, False, True, True])
    assert smallest_indices(eligible, scores, 4).tolist() == [1, 2, 4, 5]  # 0.5 is not eligible; ties in order


def test_masked_share_is_the_pruned_fraction_over_all_masks():
    masks = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 1.0, 1.0, 0.0])]
    assert masked_share(masks) == 3 / 8
    assert masked_share(m for m in masks[1:]) == 1 / 4
