"""Seeded, resumable sample order for training: uniform, identity powers (balanced = kohya-style repeats), or
by inverse text density.

The order of an epoch is a pure function of (seed, epoch), so a run resumed from a checkpoint replays exactly
the stream the uninterrupted run saw, on one process or many (accelerate shards the batches of this one global
order across ranks, so ranks never duplicate each other's samples).

The `--sampling` choices are `SamplingScheme`s in `SAMPLING_SCHEMES`: a new scheme is one weight function given
to `register_sampling_scheme`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from .errors import UserError
from .registry import Registry
from .seeds import CAPTION_STREAM, derive_seed

# The identity schemes as powers of `--sampling_power`: an image of an identity with n images is drawn with
# weight n^(p - 1), so the identity as a whole gets n^p.
SAMPLING_POWERS = {"uniform": 1.0, "sqrt": 0.5, "balanced": 0.0}


@dataclass(frozen=True)
class SamplingScheme:
    """One `--sampling` choice: per-sample draw weights for the training set.

    `weights(identities, index, power)` returns (N,) draw probabilities (any non-negative scale; the trainer
    multiplies in `--sampling_weight_column` and normalises) or None for plain shuffling. `identities` are the
    rows' identity names, `index` the PoGDiff index (`index.PoGDiffIndex`: neighbours, text density; None unless
    `needs_index`), `power` the resolved `--sampling_power` (None unless the scheme is an identity power).
    `power` is the scheme's point on the `--sampling_power` dial, for the identity schemes only.
    """

    name: str
    weights: Callable[[Sequence[str], Any, float | None], torch.Tensor | None]
    needs_index: bool = False
    power: float | None = None


# Every `--sampling` choice, by name, in `--help` order. `register_sampling_scheme` adds one.
SAMPLING_SCHEMES: Registry[SamplingScheme] = Registry("--sampling")
register_sampling_scheme = SAMPLING_SCHEMES.register
get_sampling_scheme = SAMPLING_SCHEMES.choice


def sampling_power(scheme: str, power: float | None) -> float | None:
    """The power p of `--sampling` / `--sampling_power`, or None for `density` (not a function of counts).

    `--sampling_power` is the dial and the identity schemes are its named points (uniform 1, sqrt 0.5,
    balanced 0); giving both a named non-uniform scheme and a power is ambiguous and refused.
    """
    named = get_sampling_scheme(scheme)
    if power is not None:
        if not math.isfinite(power):
            raise UserError(f"--sampling_power must be a finite number, got {power}.")
        if scheme != "uniform":
            raise UserError(
                f"--sampling {scheme} and --sampling_power {power} both set how images are drawn: give one "
                f"(--sampling {scheme} is --sampling_power {SAMPLING_POWERS.get(scheme, 'n/a')})."
            )
        return float(power)
    return named.power


def identity_sampling_weights(identities: Sequence[str], power: float) -> torch.Tensor | None:
    """Per-sample draw probabilities (sum 1) for `--sampling_power p`, or None for p == 1 (uniform).

    An image of an identity with n images gets weight n^(p - 1), so identities are drawn in proportion to n^p:
    p = 1 every image equally (None: the sampler shuffles instead of drawing with replacement), p = 0.5 the
    usual sqrt middle ground, p = 0 every identity equally (kohya-style repeats), p < 0 favours the rarest.
    """
    if not math.isfinite(power):
        raise UserError(f"--sampling_power must be a finite number, got {power}.")
    if power == 1.0:
        return None
    counts = Counter(identities)
    weights = torch.tensor([float(counts[name]) ** (power - 1.0) for name in identities], dtype=torch.float64)
    return weights / weights.sum()


def with_row_weights(weights: torch.Tensor | None, row_weights: Sequence[float], column: str) -> torch.Tensor:
    """Per-sample draw probabilities (sum 1): the scheme's `weights` (None = uniform) times a per-row weight
    from the data (`--sampling_weight_column`: kohya's repeats or SimpleTuner's probability, as a column).

    Raises UserError, naming `column` and the row, for a weight that is negative, NaN or inf, or when every
    weight is 0.
    """
    values = torch.tensor([float(w) for w in row_weights], dtype=torch.float64)
    bad = (~torch.isfinite(values) | (values < 0)).nonzero().flatten()
    if len(bad):
        row = int(bad[0])
        raise UserError(
            f"--sampling_weight_column {column!r}: row {row} has weight {row_weights[row]!r}; weights must be "
            f"finite and >= 0 ({len(bad)} rows are not)."
        )
    if not bool((values > 0).any()):
        raise UserError(f"--sampling_weight_column {column!r}: every weight is 0, so nothing can be drawn.")
    base = torch.ones_like(values) if weights is None else weights.double()
    combined = base * values
    return combined / combined.sum()


def density_sampling_weights(txt_log_weights: torch.Tensor) -> torch.Tensor:
    """`--sampling density`: per-sample draw probabilities proportional to the index's inverse text density.

    These are the weights psi_txt uses (exp of the index's clipped log-weights), so captions that are rare in
    text-embedding space are drawn more often without any identity label: on data whose captions cluster by
    who is shown, that approaches identity balance.
    """
    log_w = txt_log_weights.double()
    if log_w.ndim != 1 or log_w.numel() == 0 or not bool(torch.isfinite(log_w).all()):
        raise UserError(
            "The index's text log-weights must be a finite, non-empty 1-D tensor; rebuild the index."
        )
    return torch.softmax(log_w, dim=0)


def _identity_weights(identities: Sequence[str], index: Any, power: float | None) -> torch.Tensor | None:
    return identity_sampling_weights(identities, power)


def _density_weights(identities: Sequence[str], index: Any, power: float | None) -> torch.Tensor:
    return density_sampling_weights(index.txt_log_weights)


for _name in ("uniform", "balanced", "sqrt"):
    register_sampling_scheme(SamplingScheme(_name, _identity_weights, power=SAMPLING_POWERS[_name]))
register_sampling_scheme(SamplingScheme("density", _density_weights, needs_index=True))


class RowCaptions:
    """Every row's captions as ids into one list of distinct captions, and the one each epoch trains on.

    A row may hold several captions (train_text_to_image picks one at random). The choice is a pure function
    of (seed, epoch, row), so the training sample, its role as somebody's PoGDiff neighbour and the same-text
    skip all see the *same* caption of a row in an epoch, and a resumed run sees the same choices.
    """

    def __init__(self, captions: Sequence[str | Sequence[str]], seed: int) -> None:
        rows = [[caption] if isinstance(caption, str) else [str(c) for c in caption] for caption in captions]
        if any(len(row) == 0 for row in rows):
            raise UserError("A row has an empty list of captions; give every row at least one caption.")
        self.distinct: list[str] = list(dict.fromkeys(c for row in rows for c in row))
        position = {c: i for i, c in enumerate(self.distinct)}
        self.per_row: list[list[int]] = [[position[c] for c in row] for row in rows]
        self.seed = seed
        self.first = torch.tensor([row[0] for row in self.per_row], dtype=torch.int64)
        self.has_several = any(len(row) > 1 for row in self.per_row)
        self._epoch: int | None = None
        self._ids = self.first

    def choice(self, row: int, epoch: int) -> int:
        """Position, among row `row`'s captions, of the one epoch `epoch` trains on."""
        n = len(self.per_row[row])
        if n == 1:
            return 0
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, row, CAPTION_STREAM))
        return int(torch.randint(n, (1,), generator=generator))

    def text(self, row: int, epoch: int) -> str:
        return self.distinct[self.per_row[row][self.choice(row, epoch)]]

    def ids(self, epoch: int) -> torch.Tensor:
        """(N,) int64: each row's chosen caption in epoch `epoch`, as an id into `distinct`."""
        if not self.has_several:
            return self.first
        if epoch != self._epoch:
            self._ids = torch.tensor(
                [row[self.choice(i, epoch)] for i, row in enumerate(self.per_row)], dtype=torch.int64
            )
            self._epoch = epoch
        return self._ids


class EpochSampler(Sampler[int]):
    """Sample order of one epoch as a function of (seed, epoch): a permutation, or weighted draws.

    With `weights` None this is a seeded random permutation of range(num_samples) (plain shuffling). With
    weights, `num_samples` indices are drawn with replacement, so an epoch holds as many samples as a uniform
    one and `--num_train_epochs` keeps its meaning. Call `set_epoch` before iterating (accelerate's dataloader
    also does).
    """

    def __init__(self, num_samples: int, seed: int, weights: torch.Tensor | None = None):
        if num_samples < 1:
            raise UserError("The training dataset is empty: nothing to sample.")
        if weights is not None and len(weights) != num_samples:
            raise UserError(f"Got {len(weights)} sampling weights for {num_samples} samples.")
        self.num_samples = num_samples
        self.seed = seed
        self.weights = weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> list[int]:
        """The full sample order of `epoch` (what every rank's shard is cut from)."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        if self.weights is None:
            return torch.randperm(self.num_samples, generator=generator).tolist()
        return torch.multinomial(
            self.weights, self.num_samples, replacement=True, generator=generator
        ).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices(self.epoch))

    def __len__(self) -> int:
        return self.num_samples


class SampleCounter:
    """How often each dataset row was drawn for training (checkpointed, so a resumed run keeps counting).

    Registered with `accelerator.register_for_checkpointing`; the per-identity totals say what a sampling
    scheme actually did, which is the honest answer to "did the minority get more steps?".
    """

    def __init__(self, num_rows: int):
        self.counts = torch.zeros(num_rows, dtype=torch.long)

    def update(self, rows: torch.Tensor) -> None:
        self.counts += torch.bincount(rows.cpu().long(), minlength=len(self.counts))

    def per_identity(self, identities: Sequence[str], counts: torch.Tensor | None = None) -> dict[str, int]:
        counts = self.counts if counts is None else counts
        totals: dict[str, int] = {}
        for name, n in zip(identities, counts.tolist()):
            totals[name] = totals.get(name, 0) + int(n)
        return totals

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].clone()


def sampling_label(args) -> str:
    """How images are drawn, as the flags say it (for logs and the model card)."""
    if get_sampling_scheme(args.sampling).power is None:
        # Not a point of the --sampling_power dial (density, a registered scheme): its name says it.
        label = f"--sampling {args.sampling}"
    else:
        named = {p: name for name, p in SAMPLING_POWERS.items()}.get(args.sampling_power)
        label = f"--sampling {named}" if named else f"--sampling_power {args.sampling_power:g}"
    if getattr(args, "sampling_weight_column", None):
        label += f" x --sampling_weight_column {args.sampling_weight_column}"
    return label
