"""Federated voting: plurality, deterministic ties, agreement threshold, soft votes, statistics."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest
import torch

from fedalign.vote import vote, vote_stats

# 3 clients x 4 samples. Winners: 0 (2 votes), 1 (3), 0 (1-1-1 tie), 0 (1-1-1 tie).
HARD = np.array([[0, 1, 2, 3], [0, 1, 1, 0], [2, 1, 0, 1]])


def test_hard_plurality():
    votes = np.array([[0, 1, 2, 3, 4], [0, 1, 1, 3, 2], [2, 1, 1, 0, 2]])
    labels, mask = vote(votes)
    np.testing.assert_array_equal(labels, [0, 1, 1, 3, 2])
    np.testing.assert_array_equal(mask, [True] * 5)
    assert labels.dtype == np.int64
    assert mask.dtype == np.bool_


def test_ties_go_to_the_lowest_class_whatever_the_client_order():
    votes = np.array([[3, 2, 5], [1, 0, 5], [3, 2, 4], [1, 0, 4]])
    for order in permutations(range(4)):
        labels, _ = vote(votes[list(order)])
        np.testing.assert_array_equal(labels, [1, 0, 4])


@pytest.mark.parametrize(
    ("min_agreement", "expected_mask"),
    [
        (0.0, [True, True, True, True]),
        (0.5, [True, True, True, False]),
        (0.75, [True, True, False, False]),
        (1.0, [True, False, False, False]),
    ],
)
def test_agreement_threshold(min_agreement, expected_mask):
    # K = 4; winner vote counts per sample: 4, 3, 2, 1.
    votes = np.array([[7, 1, 2, 0], [7, 1, 2, 1], [7, 1, 3, 2], [7, 0, 4, 3]])
    labels, mask = vote(votes, min_agreement=min_agreement)
    np.testing.assert_array_equal(labels, [7, 1, 2, 0])
    np.testing.assert_array_equal(mask, expected_mask)


def test_threshold_survives_float_rounding():
    # (1 - 0.7) * 10 == 3.0000000000000004 in floating point; 3 of 10 votes must still pass.
    votes = np.array([[4] * 3 + [0, 1, 2, 3, 5, 6, 7], [4] * 2 + [0, 1, 2, 3, 5, 6, 7, 8]]).T
    labels, mask = vote(votes, min_agreement=1 - 0.7)
    np.testing.assert_array_equal(labels, [4, 4])
    np.testing.assert_array_equal(mask, [True, False])


def test_soft_and_hard_can_disagree():
    # Two clients weakly for class 1, one client very strongly for class 2.
    probs = np.array([[[0.3, 0.4, 0.3]], [[0.3, 0.4, 0.3]], [[0.0, 0.05, 0.95]]])
    hard_labels, hard_mask = vote(probs.argmax(axis=2), min_agreement=0.5)
    soft_labels, soft_mask = vote(probs, soft=True, min_agreement=0.5)
    np.testing.assert_array_equal(hard_labels, [1])
    np.testing.assert_array_equal(soft_labels, [2])
    # Only one of the three clients' own argmax is class 2: below half.
    np.testing.assert_array_equal(hard_mask, [True])
    np.testing.assert_array_equal(soft_mask, [False])


def test_soft_ties_go_to_the_lowest_class():
    probs = np.array(
        [
            [[0.75, 0.25, 0.0], [0.0, 0.5, 0.5]],
            [[0.25, 0.75, 0.0], [0.0, 0.5, 0.5]],
        ]
    )
    for order in ([0, 1], [1, 0]):
        labels, mask = vote(probs[order], soft=True, min_agreement=0.5)
        np.testing.assert_array_equal(labels, [0, 1])
        np.testing.assert_array_equal(mask, [True, True])


def test_torch_input_matches_numpy():
    labels, mask = vote(torch.from_numpy(HARD), min_agreement=0.5)
    np.testing.assert_array_equal(labels, [0, 1, 0, 0])
    np.testing.assert_array_equal(mask, [True, True, False, False])
    assert isinstance(labels, np.ndarray)
    probs = torch.nn.functional.one_hot(torch.from_numpy(HARD), 4).double()
    soft_labels, soft_mask = vote(probs.requires_grad_(True), soft=True, min_agreement=0.5)
    np.testing.assert_array_equal(soft_labels, labels)
    np.testing.assert_array_equal(soft_mask, mask)


def test_no_samples():
    labels, mask = vote(np.zeros((3, 0), dtype=np.int64), min_agreement=0.5)
    assert labels.shape == (0,)
    assert mask.shape == (0,)
    stats = vote_stats(np.zeros((3, 0), dtype=np.int64), labels, mask, truth=labels)
    assert stats == {"agreement": 0.0, "kept_fraction": 0.0, "num_voters": 3, "num_samples": 0}


def test_vote_stats_hard():
    labels, mask = vote(HARD, min_agreement=0.5)
    truth = np.array([0, 2, 0, 0])
    stats = vote_stats(HARD, labels, mask, truth=truth)
    assert stats == {
        "agreement": pytest.approx(7 / 12),
        "kept_fraction": 0.5,
        "num_voters": 3,
        "num_samples": 4,
        "pseudo_label_accuracy": 0.5,
    }
    assert "pseudo_label_accuracy" not in vote_stats(HARD, labels, mask)
    nothing_kept = np.zeros(4, dtype=bool)
    assert "pseudo_label_accuracy" not in vote_stats(HARD, labels, nothing_kept, truth=truth)


def test_vote_stats_soft_counts_each_clients_argmax():
    probs = np.array([[[0.3, 0.4, 0.3]], [[0.3, 0.4, 0.3]], [[0.0, 0.05, 0.95]]])
    labels, mask = vote(probs, soft=True)
    stats = vote_stats(torch.from_numpy(probs), labels, mask, truth=np.array([2]))
    assert stats == {
        "agreement": pytest.approx(1 / 3),
        "kept_fraction": 1.0,
        "num_voters": 3,
        "num_samples": 1,
        "pseudo_label_accuracy": 1.0,
    }
    hard_view = vote_stats(probs.argmax(axis=2), labels, mask)
    assert hard_view["agreement"] == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"predictions": np.array([0, 1, 2])}, "K x N label array"),
        ({"predictions": np.zeros((0, 5), dtype=np.int64)}, "K >= 1"),
        ({"predictions": np.array([[0.0, 1.0]])}, "integer class labels"),
        ({"predictions": np.array([[0, -1, 1]])}, r"must lie in \[0, 2\)"),
        ({"predictions": np.array([[0, 3]]), "num_classes": 3}, r"must lie in \[0, 3\)"),
        ({"predictions": np.array([[0, 1]]), "num_classes": 0}, "num_classes must be >= 1"),
        ({"predictions": HARD, "min_agreement": 1.5}, r"min_agreement must lie in \[0, 1\]"),
        ({"predictions": HARD, "min_agreement": -0.1}, r"min_agreement must lie in \[0, 1\]"),
        ({"predictions": np.ones((2, 3)), "soft": True}, "K x N x C probability array"),
        ({"predictions": -np.ones((2, 3, 4)), "soft": True}, "non-negative"),
        ({"predictions": np.full((2, 3, 4), np.nan), "soft": True}, "non-negative"),
        ({"predictions": np.ones((2, 3, 4)), "soft": True, "num_classes": 5}, "expected 5"),
    ],
)
def test_vote_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        vote(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("labels", "mask", "truth", "message"),
    [
        (np.zeros(3), np.ones(4, dtype=bool), None, r"labels must have shape \(4,\)"),
        (np.zeros(4), np.ones(5, dtype=bool), None, r"mask must have shape \(4,\)"),
        (np.zeros(4), np.ones(4, dtype=bool), np.zeros(2), r"truth must have shape \(4,\)"),
    ],
)
def test_vote_stats_rejects_mismatched_lengths(labels, mask, truth, message):
    with pytest.raises(ValueError, match=message) as info:
        vote_stats(HARD, labels, mask, truth=truth)
    assert "\n" not in str(info.value)
