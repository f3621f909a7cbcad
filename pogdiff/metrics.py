"""Evaluation metrics for imbalanced text-to-image fine-tuning (paper Sec. 4.1, App. C, App. F).

Every function here is pure and works on feature matrices of shape ``(n, d)``, one row per image,
given as a ``torch.Tensor`` or a ``numpy`` array. They are converted to float64 numpy arrays first:
the Fréchet distance subtracts traces of similar size, and float32 loses digits there.

Cosine-based metrics (DINO score, gRecall) normalise rows themselves, so callers may pass raw
features; a zero row has cosine 0 with everything.

All metrics are computed per identity and then averaged over identities, so a majority identity
with 30 images weighs as much as a minority identity with 2 (the paper's tables do the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import UserError

GRECALL_RULES = ("nearest", "any")
METRICS = ("dino", "grecall", "fid")


def as_float64(features: Any) -> np.ndarray:
    """Returns ``features`` (torch tensor, numpy array or nested list) as a 2-D float64 numpy array."""
    if hasattr(features, "detach"):
        features = features.detach().to("cpu").double().numpy()
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise UserError(
            f"Expected a feature matrix of shape (n_images, dim), got shape {array.shape}. "
            "Pass one row per image (stack single vectors with `[v]` or `v[None]`)."
        )
    return array


def l2_normalize(features: Any) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero instead of becoming NaN."""
    array = as_float64(features)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms > 0, norms, 1.0)


def cosine_matrix(features_a: Any, features_b: Any) -> np.ndarray:
    """Cosine similarity of every row of ``features_a`` with every row of ``features_b``, shape (n_a, n_b)."""
    a, b = l2_normalize(features_a), l2_normalize(features_b)
    if a.shape[1] != b.shape[1]:
        raise UserError(
            f"Feature dimensions differ ({a.shape[1]} vs {b.shape[1]}): both sets must come from the same "
            "feature extractor."
        )
    return a @ b.T


def dino_score(gen_feats: Any, real_feats: Any) -> float:
    """DINO score of one identity: mean cosine over all (generated, real) image pairs.

    With DINOv2 features this is the paper's "DINO score" (App. C); the formula does not depend on
    which extractor produced the features.
    """
    sims = cosine_matrix(gen_feats, real_feats)
    if sims.size == 0:
        raise UserError("dino_score needs at least one generated and one real image.")
    return float(sims.mean())


def grecall(
    gen_feats: Any, train_feats: Any, threshold: float = 0.7, rule: str = "nearest"
) -> tuple[int, int]:
    """Generative recall of one identity (paper Sec. 4.1): ``(covered, total)`` training images.

    A training image is *covered* when the model generated an image similar to it (cosine >= threshold).

    - ``rule="nearest"`` (default): each generated image covers at most one training image, its nearest
      one, and only if that similarity reaches the threshold. A model that always draws the same picture
      covers one image however many training images resemble it, so this rewards diversity.
    - ``rule="any"``: a training image is covered if any generated image reaches the threshold.

    ``nearest`` never exceeds ``any``. The identity's gRecall is ``covered / total``; the model's gRecall
    is the mean of that ratio over identities (:func:`aggregate_metrics`).
    """
    if rule not in GRECALL_RULES:
        raise UserError(f"Unknown gRecall rule {rule!r}; choose one of {GRECALL_RULES}.")
    sims = cosine_matrix(gen_feats, train_feats)
    total = sims.shape[1]
    if total == 0 or sims.shape[0] == 0:
        return 0, total
    if rule == "nearest":
        nearest = sims.argmax(axis=1)
        reached = sims[np.arange(sims.shape[0]), nearest] >= threshold
        covered = len(set(nearest[reached].tolist()))
    else:
        covered = int((sims.max(axis=0) >= threshold).sum())
    return covered, total


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    # Round-off makes zero eigenvalues of a rank-deficient covariance slightly negative.
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID when features are Inception's).

    ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((sqrt(S_a) S_b sqrt(S_a))^(1/2))``, in float64. The
    trace term uses the eigenvalues of the symmetric PSD matrix ``sqrt(S_a) S_b sqrt(S_a)`` (same trace as
    ``sqrtm(S_a S_b)``), clipping round-off negatives, so it stays real and finite when the covariances
    are rank-deficient, as they always are for a few images in hundreds of dimensions. Covariances use
    ``n - 1`` (like ``np.cov``), hence each set needs at least 2 images. With fewer images than dimensions
    the computation runs, exactly, in the span of the centred images.
    """
    a, b = as_float64(feats_a), as_float64(feats_b)
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise UserError(
            f"frechet_distance needs at least 2 images per set to estimate a covariance, got "
            f"{a.shape[0]} and {b.shape[0]}."
        )
    if a.shape[1] != b.shape[1]:
        raise UserError(f"Feature dimensions differ ({a.shape[1]} vs {b.shape[1]}).")
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    centred_a, centred_b = a - a.mean(axis=0), b - b.mean(axis=0)
    if a.shape[0] + b.shape[0] < a.shape[1]:
        # Both covariances vanish outside the span of the centred rows. In an orthonormal basis of that span
        # the traces and the eigenvalues below are the same, and the matrices are (n_a + n_b) sized instead
        # of d x d: 20 images in DINOv2's 768 dimensions cost milliseconds instead of seconds.
        basis, _ = np.linalg.qr(np.concatenate([centred_a, centred_b]).T)
        centred_a, centred_b = centred_a @ basis, centred_b @ basis
    cov_a = centred_a.T @ centred_a / (a.shape[0] - 1)
    cov_b = centred_b.T @ centred_b / (b.shape[0] - 1)
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    eigvals = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(eigvals, 0.0, None)).sum())
    distance = mean_term + float(np.trace(cov_a)) + float(np.trace(cov_b)) - 2.0 * trace_sqrt
    # The exact value is >= 0; round-off on identical sets can give -1e-16.
    return max(distance, 0.0)


def identity_metrics(
    gen_feats: Any,
    train_feats: Any,
    real_feats: Any | None,
    threshold: float = 0.7,
    rule: str = "nearest",
) -> dict[str, Any]:
    """All metrics of one identity.

    ``train_feats`` are the identity's training images (gRecall's reference, by definition);
    ``real_feats`` are the real images DINO score and FID compare against (held-out images when there
    are some, else the training images; ``None`` or empty when the identity has none).

    Returns ``dino``, ``grecall``, ``fid`` (float, or ``None`` when not computable), the gRecall counts,
    the image counts, and ``missing``: metric -> reason for every ``None``.
    """
    gen = as_float64(gen_feats)
    train = as_float64(train_feats)
    real = (
        as_float64(real_feats) if real_feats is not None and len(real_feats) else np.zeros((0, gen.shape[1]))
    )
    missing: dict[str, str] = {}
    result: dict[str, Any] = {"n_generated": gen.shape[0], "n_train": train.shape[0], "n_real": real.shape[0]}

    if gen.shape[0] == 0:
        missing = {name: "no generated images" for name in METRICS}
        result.update(dino=None, grecall=None, grecall_covered=0, grecall_total=train.shape[0], fid=None)
        return {**result, "missing": missing}

    covered, total = grecall(gen, train, threshold=threshold, rule=rule)
    result.update(grecall_covered=covered, grecall_total=total)
    result["grecall"] = covered / total if total else None
    if not total:
        missing["grecall"] = "no training images"

    result["dino"] = dino_score(gen, real) if real.shape[0] else None
    if not real.shape[0]:
        missing["dino"] = "no real images"

    if gen.shape[0] >= 2 and real.shape[0] >= 2:
        result["fid"] = frechet_distance(gen, real)
    else:
        result["fid"] = None
        missing["fid"] = (
            f"needs >= 2 images on each side, got {gen.shape[0]} generated and {real.shape[0]} real"
        )
    return {**result, "missing": missing}


def mean_over_identities(
    values: Mapping[str, float | None], identities: Iterable[str]
) -> tuple[float | None, int]:
    """Mean of the non-missing ``values`` of ``identities``, and how many entered it (``None`` if none)."""
    present = [values[name] for name in identities if values.get(name) is not None]
    if not present:
        return None, 0
    return math.fsum(present) / len(present), len(present)


def aggregate_metrics(
    per_identity: Mapping[str, Mapping[str, Any]],
    split: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = METRICS,
) -> dict[str, dict[str, Any]]:
    """Averages per-identity results (from :func:`identity_metrics`) over each identity group of ``split``.

    Returns ``{metric: {group: mean | None, "n_<group>": identities averaged, "missing": {identity: reason}}}``
    for every group in ``split`` (e.g. ``all``, ``few``, ``many`` from :func:`shot_split`). Missing values
    are left out of the mean and listed with their reason, never averaged in as NaN.
    """
    summary: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        values = {name: result.get(metric) for name, result in per_identity.items()}
        entry: dict[str, Any] = {}
        for group, identities in split.items():
            entry[group], entry[f"n_{group}"] = mean_over_identities(values, identities)
        entry["missing"] = {
            name: per_identity[name].get("missing", {}).get(metric, "not computed")
            for name in sorted(per_identity)
            if values[name] is None
        }
        summary[metric] = entry
    return summary


# Column order and direction of the paper's tables (Tables 1, 2, 5): higher is better except FID.
TABLE_COLUMNS = (("dino", "DINO", "↑", 3), ("grecall", "gRecall", "↑", 3), ("fid", "FID", "↓", 2))


def markdown_table(
    summaries: Mapping[str, Mapping[str, Mapping[str, Any]]], groups: Sequence[str] = ("all", "few")
) -> str:
    """One markdown table in the paper's shape: a row per model, a column per metric x shot group.

    ``summaries`` maps a model name to :func:`aggregate_metrics` output. A mean over no identities
    prints as ``n/a``.
    """
    header = ["Model"] + [
        f"{label} {arrow} {group.capitalize()}" for _, label, arrow, _ in TABLE_COLUMNS for group in groups
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, summary in summaries.items():
        cells = [model]
        for metric, _, _, digits in TABLE_COLUMNS:
            for group in groups:
                value = summary[metric][group]
                cells.append("n/a" if value is None else f"{value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
