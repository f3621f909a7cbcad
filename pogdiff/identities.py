"""Identities and the few-shot split: how many images each identity has, and which identities are few-shot.

An identity is *few-shot* (the paper's "minority") when it has at most ``few_shot_max`` training images
(``--few_shot_max``, paper Tables 1-5: all-shot vs few-shot). That one cut is used by the index summary, the
trainer's per-sample minority mask and log line, the validation prompts and the evaluation's tables, so it is
defined here once. Standard library only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

Count = TypeVar("Count")


def is_few_shot(count: Count, few_shot_max: int) -> Count:
    """Whether an identity with `count` training images is few-shot: ``count <= few_shot_max``.

    Elementwise on a tensor or array of counts (giving a bool tensor / array), a bool on an int.
    """
    return count <= few_shot_max


def identity_counts(labels: Iterable[str]) -> dict[str, int]:
    """Images per identity from per-row identity labels, sorted by name."""
    return dict(sorted(Counter(labels).items()))


def few_shot_rows(identities: Sequence[str], counts: Mapping[str, int], few_shot_max: int) -> list[bool]:
    """Per row: whether the row's identity (``identities[row]``, counted in `counts`) is few-shot."""
    return [is_few_shot(counts[name], few_shot_max) for name in identities]


def shot_split(train_counts: Mapping[str, int], few_shot_max: int = 2) -> dict[str, list[str]]:
    """Groups identities by their number of training images (paper Tables 1-5: all-shot vs few-shot).

    Returns sorted identity lists: ``all`` (every identity), ``few`` (at most ``few_shot_max`` training
    images) and ``many`` (the rest).
    """
    identities = sorted(train_counts)
    few = [name for name in identities if is_few_shot(train_counts[name], few_shot_max)]
    many = [name for name in identities if not is_few_shot(train_counts[name], few_shot_max)]
    return {"all": identities, "few": few, "many": many}
