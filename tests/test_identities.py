"""pogdiff.identities: the one few-shot cut (count <= few_shot_max) and identity counting."""

from __future__ import annotations

import numpy as np
import torch

import pogdiff.metrics
from pogdiff.identities import few_shot_rows, identity_counts, is_few_shot, shot_split


def test_is_few_shot_is_at_most_few_shot_max_on_ints_tensors_and_arrays():
    assert is_few_shot(2, 2) and not is_few_shot(3, 2) and is_few_shot(0, 0)
    assert is_few_shot(torch.tensor([1, 2, 3]), 2).tolist() == [True, True, False]
    assert is_few_shot(np.array([5, 0]), 1).tolist() == [False, True]


def test_identity_counts_and_rows():
    labels = ["b", "a", "b", "c", "b"]
    counts = identity_counts(labels)
    assert list(counts.items()) == [("a", 1), ("b", 3), ("c", 1)]
    assert few_shot_rows(labels, counts, 1) == [False, True, False, True, False]
    assert shot_split(counts, 1) == {"all": ["a", "b", "c"], "few": ["a", "c"], "many": ["b"]}
    assert not hasattr(pogdiff.metrics, "shot_split")  # one home: pogdiff.identities
