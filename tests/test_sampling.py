"""Sample order: uniform permutations, identity-balanced and sqrt schemes, sharding across ranks, resume."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
from torch.utils.data import BatchSampler

from pogdiff.density import elbo, fit_text_density, inverse_density_log_weights
from pogdiff.sampling import (
    SAMPLING_POWERS,
    EpochSampler,
    SampleCounter,
    density_sampling_weights,
    derive_seed,
    identity_sampling_weights,
    sampling_power,
)

# Two majority identities (30 images) and three minority ones (2 images): the paper's long-tail shape.
IDENTITIES = ["a"] * 30 + ["b"] * 30 + ["c"] * 2 + ["d"] * 2 + ["e"] * 2
COUNTS = Counter(IDENTITIES)


def draws(sampler: EpochSampler, n: int) -> list[int]:
    out: list[int] = []
    epoch = 0
    while len(out) < n:
        out += sampler.indices(epoch)
        epoch += 1
    return out[:n]


def expected_share(scheme: str) -> dict[str, float]:
    mass = {k: {"uniform": n, "balanced": 1.0, "sqrt": math.sqrt(n)}[scheme] for k, n in COUNTS.items()}
    total = sum(mass.values())
    return {k: v / total for k, v in mass.items()}


@pytest.mark.parametrize("scheme", ["uniform", "balanced", "sqrt"])
def test_identity_frequencies_over_10000_draws(scheme):
    sampler = EpochSampler(
        len(IDENTITIES), seed=0, weights=identity_sampling_weights(IDENTITIES, SAMPLING_POWERS[scheme])
    )
    rows = draws(sampler, 10_000)
    observed = Counter(IDENTITIES[r] for r in rows)
    for name, p in expected_share(scheme).items():
        # 4 binomial standard deviations: a false alarm has probability < 1e-4 per identity.
        tolerance = 4 * math.sqrt(p * (1 - p) / 10_000)
        assert abs(observed[name] / 10_000 - p) <= tolerance, (name, observed[name], p)
    if scheme == "balanced":
        # Within an identity, images are drawn uniformly: both images of "c" appear about equally.
        c_rows = Counter(r for r in rows if IDENTITIES[r] == "c")
        assert len(c_rows) == 2 and abs(c_rows[60] - c_rows[61]) <= 4 * math.sqrt(10_000 * 0.2 * 0.5 * 0.5)


def test_weights_are_exact():
    weights = identity_sampling_weights(IDENTITIES, SAMPLING_POWERS["balanced"])
    assert torch.allclose(weights[0], torch.tensor(1 / 5 / 30, dtype=torch.float64))
    assert torch.allclose(weights[60], torch.tensor(1 / 5 / 2, dtype=torch.float64))
    sqrt_weights = identity_sampling_weights(IDENTITIES, SAMPLING_POWERS["sqrt"])
    z = 2 * math.sqrt(30) + 3 * math.sqrt(2)
    assert math.isclose(float(sqrt_weights[:30].sum()), math.sqrt(30) / z, rel_tol=1e-12)
    assert identity_sampling_weights(IDENTITIES, SAMPLING_POWERS["uniform"]) is None
    with pytest.raises(ValueError, match="--sampling must be one of"):
        sampling_power("repeats", None)
    with pytest.raises(ValueError, match="--sampling_power must be a finite number"):
        identity_sampling_weights(IDENTITIES, float("nan"))


def test_sampling_power_resolves_the_named_schemes_and_refuses_both():
    assert [sampling_power(s, None) for s in ("uniform", "sqrt", "balanced")] == [1.0, 0.5, 0.0]
    assert sampling_power("density", None) is None
    assert sampling_power("uniform", -0.5) == -0.5
    with pytest.raises(ValueError, match="give one"):
        sampling_power("balanced", 0.3)
    with pytest.raises(ValueError, match="finite"):
        sampling_power("uniform", float("inf"))


@pytest.mark.parametrize("power", [0.25, -0.5])
def test_sampling_power_frequencies_over_10000_draws(power):
    """Identity with n images drawn with probability n^p / sum(n^p): within 4 binomial standard deviations."""
    sampler = EpochSampler(len(IDENTITIES), seed=1, weights=identity_sampling_weights(IDENTITIES, power))
    observed = Counter(IDENTITIES[r] for r in draws(sampler, 10_000))
    total = sum(n**power for n in COUNTS.values())
    for name, n in COUNTS.items():
        p = n**power / total
        assert abs(observed[name] / 10_000 - p) <= 4 * math.sqrt(p * (1 - p) / 10_000), (
            name,
            observed[name],
            p,
        )


def test_density_sampling_favours_rare_captions_without_identity_labels():
    """Captions clustered by identity (30, 30, 2, 2, 2 per cluster), identities never given: the inverse text
    density alone gives every image of a cluster nearly the same weight, every minority image more than any
    majority image, and the minority at least its balanced share (at the default clip bounds [0.1, 10] it
    overshoots: balance is 0.2 per identity; --density_w_max tempers it)."""
    g = torch.Generator().manual_seed(0)
    names = sorted(COUNTS)
    centres = 3 * torch.randn(len(names), 32, generator=g)
    embeddings = torch.stack(
        [centres[names.index(n)] + 0.3 * torch.randn(32, generator=g) for n in IDENTITIES]
    )
    model = fit_text_density(embeddings, latent_dim=4, hidden_dim=64, epochs=200, seed=0, show_progress=False)
    log_w = inverse_density_log_weights(elbo(model, embeddings, num_samples=16, seed=0))
    weights = density_sampling_weights(log_w)
    assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-12)
    share = {n: float(weights[[i for i, x in enumerate(IDENTITIES) if x == n]].sum()) for n in names}
    majority, minority = weights[:60], weights[60:]
    assert float(minority.min()) > float(majority.max())
    assert all(share[n] >= 0.2 for n in ("c", "d", "e")) and all(share[n] < 30 / 66 for n in ("a", "b"))
    # Draws follow the weights (4 binomial standard deviations).
    observed = Counter(IDENTITIES[r] for r in draws(EpochSampler(len(IDENTITIES), 2, weights), 10_000))
    for n, p in share.items():
        assert abs(observed[n] / 10_000 - p) <= 4 * math.sqrt(p * (1 - p) / 10_000), (n, observed[n], p)


def test_uniform_is_a_seeded_permutation_unchanged():
    sampler = EpochSampler(len(IDENTITIES), seed=7)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        # The order uniform sampling has always had: a permutation drawn from the (seed, epoch) generator.
        reference = torch.randperm(
            len(IDENTITIES), generator=torch.Generator().manual_seed(derive_seed(7, epoch))
        )
        assert order == reference.tolist()
        assert sorted(order) == list(range(len(IDENTITIES)))
    assert sampler.indices(0) != sampler.indices(1)
    assert EpochSampler(len(IDENTITIES), seed=8).indices(0) != sampler.indices(0)


def test_weighted_epoch_has_as_many_samples_as_uniform():
    weights = identity_sampling_weights(IDENTITIES, SAMPLING_POWERS["balanced"])
    assert len(EpochSampler(len(IDENTITIES), 0, weights).indices(0)) == len(IDENTITIES)


@pytest.mark.parametrize("scheme", ["uniform", "balanced"])
def test_two_ranks_draw_disjoint_shares_of_one_stream(scheme):
    """accelerate shards the batches of the one global order: ranks split positions, never duplicate them."""
    sampler = EpochSampler(
        len(IDENTITIES), seed=0, weights=identity_sampling_weights(IDENTITIES, SAMPLING_POWERS[scheme])
    )
    batch_sampler = BatchSampler(sampler, batch_size=4, drop_last=False)
    global_order = sampler.indices(0)
    shards = [
        [b for b in BatchSamplerShard(batch_sampler, num_processes=2, process_index=rank)]
        for rank in range(2)
    ]
    # Round-robin batches: rank 0 takes batches 0, 2, 4...; rank 1 takes 1, 3, 5...
    n_full = len(global_order) // 8 * 8
    interleaved = [i for pair in zip(*shards) for batch in pair for i in batch]
    assert interleaved[:n_full] == global_order[:n_full]
    # Together the ranks see exactly the global draws (as a multiset: weighted draws may repeat a row).
    union = Counter(i for shard in shards for batch in shard[: n_full // 8] for i in batch)
    assert union == Counter(global_order[:n_full])
    assert shards[0][0] != shards[1][0]


def test_resume_skips_into_the_same_stream():
    """What accelerate's skip_first_batches does on resume: the remaining batches are those not yet seen."""
    sampler = EpochSampler(
        len(IDENTITIES), seed=3, weights=identity_sampling_weights(IDENTITIES, SAMPLING_POWERS["sqrt"])
    )
    batch_sampler = BatchSampler(sampler, batch_size=4, drop_last=False)
    sampler.set_epoch(2)
    full = list(batch_sampler)
    sampler.set_epoch(2)
    resumed = list(SkipBatchSampler(batch_sampler, skip_batches=2))
    assert resumed == full[2:]


def test_sample_counter_per_identity_and_state():
    counter = SampleCounter(len(IDENTITIES))
    counter.update(torch.tensor([0, 0, 60, 61, 64]))
    assert counter.per_identity(IDENTITIES) == {"a": 2, "b": 0, "c": 2, "d": 0, "e": 1}
    restored = SampleCounter(len(IDENTITIES))
    restored.load_state_dict(counter.state_dict())
    assert torch.equal(restored.counts, counter.counts)


def test_row_captions_choose_one_caption_per_row_and_epoch():
    from pogdiff.sampling import RowCaptions

    captions = ["a cat.", ["a dog.", "a puppy.", "a cat."], "a dog."]
    table = RowCaptions(captions, seed=3)
    assert table.distinct == ["a cat.", "a dog.", "a puppy."]
    assert table.per_row == [[0], [1, 2, 0], [1]] and table.has_several
    for epoch in range(6):
        ids = table.ids(epoch)
        # The text a row trains on and the id its neighbour lookups use are the same caption.
        assert [table.distinct[int(ids[r])] for r in range(3)] == [table.text(r, epoch) for r in range(3)]
        assert ids[0] == 0 and ids[2] == 1  # single captions never change
    # Seeded by (seed, epoch, row): reproducible, and it does vary over epochs.
    assert [table.choice(1, e) for e in range(12)] == [
        RowCaptions(captions, 3).choice(1, e) for e in range(12)
    ]
    assert len({table.choice(1, e) for e in range(12)}) > 1
    single = RowCaptions(["x", "y", "x"], seed=0)
    assert not single.has_several and single.ids(5).tolist() == [0, 1, 0]


def test_row_weights_multiply_the_scheme_and_are_checked():
    from pogdiff.errors import UserError
    from pogdiff.sampling import with_row_weights

    # Uniform scheme x repeats (1, 3, 0, 4): probabilities 1/8, 3/8, 0, 4/8.
    assert with_row_weights(None, [1, 3, 0, 4], "repeats").tolist() == [0.125, 0.375, 0.0, 0.5]
    # Balanced over identities a, a, b, b (each image 1/4) x weights (1, 3, 2, 2): 1/8, 3/8, 2/8, 2/8.
    balanced = identity_sampling_weights(["a", "a", "b", "b"], 0.0)
    assert with_row_weights(balanced, [1, 3, 2, 2], "w").tolist() == [0.125, 0.375, 0.25, 0.25]
    with pytest.raises(UserError, match=r"'w': row 1 has weight -1.0"):
        with_row_weights(None, [1, -1.0, 2], "w")
    with pytest.raises(UserError, match="row 0 has weight nan"):
        with_row_weights(None, [float("nan"), 1], "w")
    with pytest.raises(UserError, match="every weight is 0"):
        with_row_weights(None, [0, 0], "w")
