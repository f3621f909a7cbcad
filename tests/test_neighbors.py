"""k-NN graph, Cat(w) neighbour sampling and psi (pogdiff/neighbors.py)."""

import math

import numpy as np
import pytest
import torch

from pogdiff.neighbors import (
    _column_topk,
    _matmul_error_bound,
    _row_topk,
    knn_cosine,
    neighbor_weights,
    sample_neighbor_positions,
)


def brute_force_knn(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs in float64, rounded to float32, self excluded, sorted by (similarity desc, index asc)."""
    xn = torch.nn.functional.normalize(x.float(), dim=1).double()
    sims = (xn @ xn.T).float().numpy()
    n = len(x)
    values, ids = [], []
    for i in range(n):
        others = np.array([j for j in range(n) if j != i])
        order = np.lexsort((others, -sims[i, others]))[:k]
        ids.append(others[order])
        values.append(sims[i, others[order]])
    return torch.tensor(np.array(values)), torch.tensor(np.array(ids), dtype=torch.long)


def ternary_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    """Rows with exactly 4 entries +-1: normalised entries are +-0.5, so every cosine is a multiple of 1/4
    and exact in any summation order; lots of exact ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, dim)
    for i in range(n):
        cols = torch.randperm(dim, generator=g)[:4]
        x[i, cols] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    return x


@pytest.mark.parametrize(
    ("n", "dim", "k", "chunk_sizes"),
    [(40, 8, 1, [1, 7, 40]), (97, 16, 5, [3, 32, 97, 500]), (450, 24, 3, [200, 450])],
)
def test_knn_matches_brute_force(n, dim, k, chunk_sizes):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dim, generator=g)
    x[n - 1] = x[2]  # an exact duplicate: a valid neighbour of row 2 (exclusion is by index)
    x[5] = 3 * x[2]  # the same direction at another scale
    ref_sims, ref_ids = brute_force_knn(x, k)
    for chunk_size in chunk_sizes:  # 200 on 450 rows: the grouped column top-k with a remainder group
        sims, ids = knn_cosine(x, k, chunk_size=chunk_size, show_progress=False)
        assert sims.dtype == torch.float32 and ids.dtype == torch.int64
        assert torch.equal(ids, ref_ids), chunk_size
        assert torch.equal(sims, ref_sims), chunk_size
        assert not bool((ids == torch.arange(n)[:, None]).any())
    assert ids[2, 0].item() in (5, n - 1) and sims[2, 0].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape", [(300, 300), (45, 700), (300, 50), (40, 333)])
@pytest.mark.parametrize("k", [1, 13])
def test_grouped_topk_equal_torch_topk(shape, k):
    """The grouped CPU top-k shortcuts return torch.topk's values and valid positions, ties included."""
    g = torch.Generator().manual_seed(shape[0] + k)
    for sims in (torch.randn(shape, generator=g), (torch.randn(shape, generator=g) * 2).round()):
        values, cols = _row_topk(sims, k)
        assert torch.equal(values, torch.topk(sims, k, dim=1).values)
        assert torch.equal(sims.gather(1, cols), values)
        assert all(len(set(row)) == k for row in cols.tolist())
        values, rows = _column_topk(sims, k)
        assert torch.equal(values, torch.topk(sims.T, k, dim=1).values)
        assert torch.equal(sims.T.gather(1, rows), values)
        assert all(len(set(col)) == k for col in rows.tolist())


def test_knn_ties_lower_index_first_and_chunk_invariance():
    x = ternary_rows(300, 12, seed=0)
    ref_sims, ref_ids = brute_force_knn(x, 6)
    results = [knn_cosine(x, 6, chunk_size=c, show_progress=False) for c in (7, 64, 299, 300)]
    for sims, ids in results:
        assert torch.equal(ids, ref_ids)
        assert torch.equal(sims, ref_sims)
    # The data really is tie-heavy: within most rows some neighbours share a similarity.
    sims = results[0][0]
    assert (sims[:, 1:] == sims[:, :-1]).any(dim=1).float().mean() > 0.5


def test_knn_duplicates_hand_computed():
    e1, e2 = torch.eye(3)[0], torch.eye(3)[1]
    x = torch.stack([e1, e1, 2 * e1, e2, e1 + e2])
    sims, ids = knn_cosine(x, 2, chunk_size=2, show_progress=False)
    # Row 0's duplicates 1 and 2 (similarity 1) in index order; row 2's are 0 and 1.
    assert ids.tolist() == [[1, 2], [0, 2], [0, 1], [4, 0], [0, 1]]
    half = torch.tensor(1 / math.sqrt(2)).item()
    assert sims[0].tolist() == [1.0, 1.0]
    assert sims[3].tolist() == pytest.approx([half, 0.0], abs=1e-7)
    assert sims[4].tolist() == pytest.approx([half, half], abs=1e-7)
    assert sims[4, 0] == sims[4, 1]


def test_knn_large_duplicate_group():
    # 15 copies of one row: more tied neighbours than the float32 search keeps as candidates (k + 8).
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    x[10:25] = x[10]
    sims, ids = knn_cosine(x, 5, chunk_size=64, show_progress=False)
    assert ids[10].tolist() == [11, 12, 13, 14, 15]
    assert ids[24].tolist() == [10, 11, 12, 13, 14]
    assert sims[10:25].tolist() == [[1.0] * 5] * 15
    ref_sims, ref_ids = brute_force_knn(x, 5)
    assert torch.equal(ids, ref_ids) and torch.equal(sims, ref_sims)


def test_knn_errors():
    x = torch.randn(5, 4)
    for k in (0, 5, 6):
        with pytest.raises(ValueError, match=r"--num_neighbors.*N=5"):
            knn_cosine(x, k)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*\[3\]"):
        knn_cosine(bad, 2)
    bad = x.clone()
    bad[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\].*all zeros"):
        knn_cosine(bad, 2)


def test_neighbor_sampling_frequencies():
    n = 100_000
    sims = torch.tensor([[0.5, 0.3, -0.1, 0.2, 0.0]]).expand(n, 5)
    positions = sample_neighbor_positions(sims, torch.Generator().manual_seed(0))
    assert positions.dtype == torch.int64
    counts = torch.bincount(positions, minlength=5).double()
    w = torch.tensor([0.5, 0.3, 0.0, 0.2, 0.0], dtype=torch.float64)
    assert torch.allclose(neighbor_weights(sims[:1]).double(), w[None])
    tolerance = 4 * torch.sqrt(n * w * (1 - w))  # 4 binomial standard deviations
    assert bool(((counts - n * w).abs() <= tolerance).all()), counts
    assert counts[2] == 0 and counts[4] == 0  # weight-0 neighbours are never drawn


def test_neighbor_sampling_uniform_fallback_and_reproducible():
    n = 100_000
    sims = torch.tensor([[-0.2, 0.0, -0.5, -1.0]]).expand(n, 4)
    positions = sample_neighbor_positions(sims, torch.Generator().manual_seed(1))
    counts = torch.bincount(positions, minlength=4).double()
    assert bool(((counts - n / 4).abs() <= 4 * math.sqrt(n * 0.25 * 0.75)).all()), counts

    sims = torch.rand(64, 5, generator=torch.Generator().manual_seed(2))
    first = sample_neighbor_positions(sims, torch.Generator().manual_seed(3))
    again = sample_neighbor_positions(sims, torch.Generator().manual_seed(3))
    other = sample_neighbor_positions(sims, torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Only the generator drives it: the global RNG state is irrelevant and untouched.
    state = torch.get_rng_state()
    torch.manual_seed(123)
    assert torch.equal(sample_neighbor_positions(sims, torch.Generator().manual_seed(3)), first)
    torch.set_rng_state(state)


def test_matmul_error_bound_tracks_reduced_precision():
    """float32 accumulation bound; reduced-precision matmul settings (TF32, bf16) widen it."""
    exact = (768 + 2) * 2.0**-24
    assert _matmul_error_bound(768, torch.device("cpu")) == exact
    assert _matmul_error_bound(768, torch.device("cuda")) == exact  # torch's default: no TF32
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert _matmul_error_bound(768, torch.device("cpu")) == exact + 2 * 2.0**-8
        assert _matmul_error_bound(768, torch.device("cuda")) == exact + 2 * 2.0**-8
    finally:
        torch.set_float32_matmul_precision(previous)
    assert _matmul_error_bound(768, torch.device("meta")) == exact + 2 * 2.0**-8
