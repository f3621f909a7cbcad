"""PoGDiff's neighbours (paper Sec. 3.2.3, Eq. 8).

Once before training: image embeddings -> `knn_cosine` (top-k neighbours by cosine, self excluded). Each training
step: `sample_neighbor_positions` draws one neighbour per sample from Cat(w) (Eq. 8); `pogdiff.psi` then turns
the drawn similarity, the identity match and the inverse text density into psi (Eq. 12).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .errors import UserError


def _check_embeddings(embeddings: torch.Tensor, k: int) -> None:
    if embeddings.ndim != 2 or not embeddings.is_floating_point():
        raise UserError(
            f"knn_cosine expects a 2-D floating-point tensor of embeddings (N, D), got shape "
            f"{tuple(embeddings.shape)} and dtype {embeddings.dtype}."
        )
    n = embeddings.shape[0]
    if not 1 <= k < n:
        raise UserError(
            f"--num_neighbors must satisfy 1 <= k < N (the sample itself is excluded), got k={k} with "
            f"N={n} samples. Lower --num_neighbors or add training samples."
        )
    finite = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()[:10].tolist()
        raise UserError(
            f"The image embeddings contain non-finite values (NaN or inf) in rows {bad} "
            f"({int((~finite).sum())} rows in all). Check the images at these dataset indices and the "
            f"neighbour encoder's output."
        )
    zero = (embeddings == 0).all(dim=1)
    if bool(zero.any()):
        bad = torch.nonzero(zero).flatten()[:10].tolist()
        raise UserError(
            f"The image embeddings of rows {bad} ({int(zero.sum())} rows in all) are all zeros, so their "
            f"cosine similarity is undefined. Check the images at these dataset indices (blank images?) "
            f"and the neighbour encoder."
        )


def _order_by_value_then_index(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by value descending, ties by id ascending (two stable sorts = a lexicographic sort)."""
    order = torch.argsort(ids, dim=1, stable=True)
    values, ids = values.gather(1, order), ids.gather(1, order)
    order = torch.argsort(values, dim=1, descending=True, stable=True)
    return values.gather(1, order), ids.gather(1, order)


# Entries per group in `_row_topk` / `_column_topk`; 16 was fastest on 2048- and 4096-wide blocks (AVX-512 CPU).
_GROUP = 16


def _row_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sims.topk(k, dim=1)` (ties in any order), about 1.5x as fast on CPU.

    torch's CPU top-k costs ~3 ns per entry. Group the columns by stride (group j holds columns j, j + w,
    j + 2w, ... with w = cols // 16), so that the group maxima are a max over the middle axis of a
    (rows, 16, w) view: a vectorised reduction. Every top-k entry lies in one of the k groups with the
    largest maxima, so the top-k then runs over the k groups' maxima and their 16 k members only.
    """
    rows, cols = sims.shape
    width = cols // _GROUP
    if sims.device.type != "cpu" or width <= k:
        return torch.topk(sims, k, dim=1)
    group_max = sims[:, : width * _GROUP].view(rows, _GROUP, width).amax(dim=1)
    best_groups = torch.topk(group_max, k, dim=1).indices
    offsets = width * torch.arange(_GROUP, device=sims.device)
    cand_cols = (best_groups[:, :, None] + offsets[None, None, :]).reshape(rows, -1)
    if width * _GROUP < cols:
        rest = torch.arange(width * _GROUP, cols, device=sims.device)
        cand_cols = torch.cat([cand_cols, rest[None, :].expand(rows, -1)], dim=1)
    values, pos = torch.topk(sims.gather(1, cand_cols), k, dim=1)
    return values, cand_cols.gather(1, pos)


def _column_topk(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sims.T.topk(k, dim=1)` (ties in any order), about twice as fast on CPU.

    A top-k over strided columns is slow, while a max over rows is a fast vectorised reduction. So take
    the max of each group of 16 consecutive rows, keep the k groups with the largest max per column (every
    top-k entry lies in one of them), and run the strided top-k over those 16 k rows only.
    """
    rows, cols = sims.shape
    groups = rows // _GROUP
    if sims.device.type != "cpu" or groups <= k:
        return torch.topk(sims.T, k, dim=1)
    group_max = sims[: groups * _GROUP].view(groups, _GROUP, cols).amax(dim=1)
    best_groups = torch.topk(group_max, k, dim=0).indices
    offsets = torch.arange(_GROUP, device=sims.device)
    cand_rows = (best_groups[:, None, :] * _GROUP + offsets[None, :, None]).reshape(-1, cols)
    if groups * _GROUP < rows:
        rest = torch.arange(groups * _GROUP, rows, device=sims.device)
        cand_rows = torch.cat([cand_rows, rest[:, None].expand(-1, cols)])
    values, pos = torch.topk(sims.gather(0, cand_rows).T, k, dim=1)
    return values, cand_rows.T.gather(1, pos)


def _float32_candidates(
    x: torch.Tensor, num_candidates: int, chunk_size: int, show_progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top `num_candidates` of every row of x @ x.T (self excluded) by float32 matmul, ties in any order.

    The similarity matrix is symmetric, so only blocks on and above the diagonal are multiplied, and each
    serves both its row block and (transposed) its column block: half the FLOPs of a plain search.
    """
    n = x.shape[0]
    values_out = torch.full((n, num_candidates), float("-inf"), device=x.device)
    ids_out = torch.zeros((n, num_candidates), dtype=torch.long, device=x.device)

    def merge(start: int, values: torch.Tensor, ids: torch.Tensor) -> None:
        stop = start + values.shape[0]
        values = torch.cat([values_out[start:stop], values], dim=1)
        ids = torch.cat([ids_out[start:stop], ids], dim=1)
        values, order = torch.topk(values, num_candidates, dim=1)
        values_out[start:stop], ids_out[start:stop] = values, ids.gather(1, order)

    starts = list(range(0, n, chunk_size))
    pairs = [(i, j) for a, i in enumerate(starts) for j in starts[a:]]
    for row_start, col_start in tqdm(pairs, desc="k-NN blocks", disable=not show_progress):
        sims = x[row_start : row_start + chunk_size] @ x[col_start : col_start + chunk_size].T
        if row_start == col_start:
            # Self is excluded by index; each row keeps n - 1 >= num_candidates finite entries.
            sims.fill_diagonal_(float("-inf"))
        values, ids = _row_topk(sims, min(num_candidates, sims.shape[1]))
        merge(row_start, values, ids + col_start)
        if row_start != col_start:
            values, ids = _column_topk(sims, min(num_candidates, sims.shape[0]))
            merge(col_start, values, ids + row_start)
    return values_out, ids_out


def _matmul_error_bound(dim: int, device: torch.device) -> float:
    """Bound on |float32 matmul - exact| for a dot product of two unit vectors of length `dim`.

    Accumulation error is at most about dim * 2^-24 (|x . y| <= 1), in any summation order. Where the matmul
    may round its inputs (TF32 on CUDA when allowed, bf16 on a CPU with reduced float32 matmul precision, or
    a device whose float32 matmul we cannot inspect), add twice bf16's unit roundoff, the coarser of the two;
    that only sends more rows to the exact stage 3.
    """
    reduced = torch.get_float32_matmul_precision() != "highest"
    if device.type == "cpu":
        reduced = reduced or getattr(torch.backends.mkldnn.matmul, "fp32_precision", "ieee") not in (
            "ieee",
            "none",
        )
    elif device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        reduced = (
            reduced or matmul.allow_tf32 or getattr(matmul, "fp32_precision", "ieee") not in ("ieee", "none")
        )
    else:
        reduced = True
    return (dim + 2) * 2.0**-24 + (2 * 2.0**-8 if reduced else 0.0)


# Extra candidates per row kept by the float32 search for exact re-scoring; see `knn_cosine`.
_CANDIDATE_MARGIN = 8


# Block size by device: on CPU 2048 x 2048 blocks (16 MiB) stay cache-friendly for the top-k passes and were
# ~10% faster than 4096 at N = 100k here; on GPUs larger blocks amortise kernel launches.
def default_chunk_size(device: torch.device) -> int:
    """`knn_cosine`'s block size on `device`: 2048 on CPU, 8192 on an accelerator."""
    return 2048 if device.type == "cpu" else 8192


def knn_cosine(
    embeddings: torch.Tensor, k: int, chunk_size: int | None = None, show_progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of every row by cosine similarity, the row itself excluded.

    Args:
        embeddings: (N, D) image embeddings; any scale (rows are L2-normalised here), on any device (the
            computation runs there).
        k: neighbours per row (`--num_neighbors`), 1 <= k < N.
        chunk_size: rows per block (default 2048 on CPU, 8192 on an accelerator). Memory is
            O(chunk_size**2 + N * D), never N x N.
        show_progress: show a tqdm bar over the blocks.

    Returns:
        `(sims, ids)`: (N, k) float32 cosine similarities sorted descending and (N, k) int64 row indices.
        The self-exclusion is by index, so an exact duplicate of a row is a valid neighbour of it (with
        similarity 1). Ties are broken by lower index first.

    The similarity is the float64 dot product of the L2-normalised float32 rows, rounded to float32.
    Three stages: (1) a float32 matmul search over blocks (see `_float32_candidates`) keeps k + 8
    candidates per row; (2) they are re-scored in float64 and the best k kept by (value desc, index
    asc); (3) a row where an unseen row could still tie or beat the k-th re-scored value, given the
    matmul's error bound, is recomputed against all N rows in float64. So the result is exact, and it
    does not depend on `chunk_size` or on how a matmul kernel rounds (float32 kernels round differently
    for different block shapes, which would otherwise decide near-ties and the order of duplicate rows).
    Stage 3 is rare in practice (it needs 9 extra rows within ~1e-4 of a row's k-th similarity, e.g.
    many exact duplicates; on GPUs, where the matmul may use TF32, the bound is looser and stage 3 more
    frequent). N = 100,000 x 768 took 44 s on this project's 2-core CPU (benchmarks/bench_index.py, idle
    machine); use a GPU for larger N.
    """
    _check_embeddings(embeddings, k)
    if chunk_size is None:
        chunk_size = default_chunk_size(embeddings.device)
    if chunk_size < 1:
        raise UserError(f"chunk_size must be >= 1, got {chunk_size}.")
    x = torch.nn.functional.normalize(embeddings.float(), dim=1)
    n, dim, device = x.shape[0], x.shape[1], x.device
    num_candidates = min(k + _CANDIDATE_MARGIN, n - 1)
    cand_values, cand_ids = _float32_candidates(x, num_candidates, chunk_size, show_progress)

    # Stage 2, in slices of ~32 MiB of float64 candidate rows.
    sims_out = torch.empty((n, k), device=device)
    ids_out = torch.empty((n, k), dtype=torch.long, device=device)
    rows_per_slice = max(1, 2**22 // (num_candidates * dim))
    for start in range(0, n, rows_per_slice):
        stop = min(start + rows_per_slice, n)
        ids = cand_ids[start:stop]
        exact = torch.bmm(x[ids].double(), x[start:stop, :, None].double()).squeeze(2).float()
        exact, ids = _order_by_value_then_index(exact, ids)
        sims_out[start:stop], ids_out[start:stop] = exact[:, :k], ids[:, :k]

    # Stage 3: every row outside the candidates has a float32 score <= the last candidate's, so an exact
    # similarity <= that + the error bound; if this can reach the k-th value, the row is recomputed.
    if num_candidates < n - 1:
        unsafe = cand_values[:, -1] + _matmul_error_bound(dim, device) >= sims_out[:, -1]
        unsafe_rows = torch.nonzero(unsafe).flatten()
        # ~32 MiB of float64 similarities per slice on CPU, ~512 MiB on an accelerator (fewer launches).
        rows_per_slice = max(1, (2**22 if device.type == "cpu" else 2**26) // n)
        for start in range(0, len(unsafe_rows), rows_per_slice):
            rows = unsafe_rows[start : start + rows_per_slice]
            sims = torch.cat(
                [
                    (x[rows].double() @ x[col : col + chunk_size].double().T).float()
                    for col in range(0, n, chunk_size)
                ],
                dim=1,
            )
            sims[torch.arange(len(rows), device=device), rows] = float("-inf")
            values, ids = torch.sort(sims, dim=1, descending=True, stable=True)
            sims_out[rows], ids_out[rows] = values[:, :k], ids[:, :k]
    return sims_out, ids_out


def sample_categorical(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw per row from Cat(weights / weights.sum(row)); rows must have a positive sum.

    Inverse-CDF sampling with one float64 uniform per row, drawn on the CPU from `generator`: the draws
    depend only on the generator's state (not on the device or a kernel), and each call advances it by
    exactly B numbers, which keeps resumed runs in step. Entries of weight 0 are never drawn.
    """
    if generator.device.type != "cpu":
        raise UserError(
            f"Pass a CPU torch.Generator (got one on {generator.device}); the draws are made on the CPU so "
            f"that they do not depend on the device."
        )
    cdf = torch.cumsum(weights.detach().to("cpu", torch.float64), dim=1)
    total = cdf[:, -1:]
    if not bool(((total > 0) & torch.isfinite(total)).all()) or bool((weights < 0).any()):
        raise UserError("Categorical weights must be >= 0 with a positive, finite sum in every row.")
    u = torch.rand((weights.shape[0], 1), generator=generator, dtype=torch.float64)
    # Position p is drawn iff cdf[p-1] <= u * total < cdf[p], an interval empty when weight p is 0; in
    # float64, u < 1 keeps u * total < total = cdf[-1], so p < k.
    return torch.searchsorted(cdf, u * total, right=True).squeeze(1).to(weights.device)


def neighbor_weights(sims: torch.Tensor) -> torch.Tensor:
    """Eq. 8 probabilities w_j = max(s_j, 0) / sum_j max(s_j, 0) per row; uniform where all s_j <= 0."""
    clamped = sims.float().clamp(min=0)
    total = clamped.sum(dim=1, keepdim=True)
    uniform = torch.full_like(clamped, 1.0 / clamped.shape[1])
    # torch.where evaluates both branches: the clamp keeps the unused one free of 0/0.
    return torch.where(total > 0, clamped / total.clamp(min=torch.finfo(clamped.dtype).tiny), uniform)


def sample_neighbor_positions(sims: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw a neighbour position per row from Cat(w) of Eq. 8 (see `neighbor_weights`).

    Args:
        sims: (B, k) cosine similarities of each sample's k neighbours (a row of `knn_cosine`'s output).
        generator: CPU generator; same state -> same draws.

    Returns:
        (B,) int64 positions in [0, k) on `sims.device`; index the neighbour ids with them.
    """
    if sims.ndim != 2 or sims.shape[1] < 1:
        raise UserError(f"sims must have shape (B, k) with k >= 1, got {tuple(sims.shape)}.")
    return sample_categorical(neighbor_weights(sims), generator)
