"""psi, the per-sample weight of PoGDiff's consistency term (paper Sec. 3.2.3-3.2.4, Eq. 9-12).

    psi = psi_img(s, same identity) * exp(log inverse text density) / a3,   psi_img = clamp(s, 0, 1) ** exponent

`PsiParams` holds the four settings (a1, a2, a3, which factors) as one validated value: the trainer builds it
once from the flags, and every function below takes it whole, so no call site can pass a1 where a2 belongs or
skip the range checks. The neighbour draw that produces `s` lives in `neighbors.py`; the loss that uses psi in
`objectives.py`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from .errors import UserError
from .neighbors import neighbor_weights

# Which factors of psi are used (paper Table 6 ablation); "none" turns PoGDiff into vanilla fine-tuning.
PSI_TERMS = ("img,txt", "txt,img", "img", "txt", "none")


@dataclass(frozen=True)
class PsiParams:
    """a1, a2 (exponents of Eq. 9), a3 (divides psi, Eq. 11-12) and the factors in use; checked on creation.

    Raises `UserError` (naming the flag) for a non-finite value, a negative exponent, a3 <= 0 or unknown terms.
    """

    a1: float = 1.0
    a2: float = 1.0
    a3: float = 1.0
    terms: str = "img,txt"

    def __post_init__(self) -> None:
        for name in ("a1", "a2", "a3"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"--psi_{name} must be a finite number, got {value!r}.")
        if self.a1 < 0 or self.a2 < 0:
            raise UserError(
                f"--psi_a1 and --psi_a2 must be >= 0 (got a1={self.a1}, a2={self.a2}): a negative exponent would "
                "turn small similarities into huge psi and zero similarity into inf."
            )
        if not self.a3 > 0:
            raise UserError(f"--psi_a3 must be > 0 (it divides psi), got {self.a3}.")
        if self.terms not in PSI_TERMS:
            raise UserError(
                f"--psi_terms must be one of {', '.join(PSI_TERMS)} (got {self.terms!r}): 'img,txt' is PoGDiff, "
                "'img' or 'txt' drops the other factor of psi (paper Table 6), 'none' is vanilla fine-tuning."
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PsiParams:
        """From the `--psi_a1/--psi_a2/--psi_a3/--psi_terms` flags (`pogdiff.arguments`)."""
        return cls(a1=args.psi_a1, a2=args.psi_a2, a3=args.psi_a3, terms=args.psi_terms)

    @property
    def uses_img(self) -> bool:
        return "img" in self.terms

    @property
    def uses_txt(self) -> bool:
        return "txt" in self.terms


def psi_img(sim: torch.Tensor, same_identity: torch.Tensor, psi: PsiParams) -> torch.Tensor:
    """Image-similarity factor of psi (Eq. 9): clamp(s, 0, 1) ** (a1 + a2 * [identities differ]).

    The paper writes max(0, s ** e); here s is clamped *before* the power, so a negative similarity gives 0
    for every exponent (the paper's form would give NaN for a fractional exponent, and a positive value
    s**2 for a dissimilar pair of different identities). Values never exceed 1. Edge case: torch defines
    0 ** 0 = 1, so with a1 = 0 a same-identity pair gets psi_img = 1 whatever its similarity (the paper's
    s ** 0 = 1 agrees); with a1 = a2 = 0 the image term is switched off (always 1).

    Example (paper Sec. 3.2.4): s = 0.4, a1 = a2 = 1 -> 0.4 for the same identity, 0.16 otherwise.
    """
    s = sim.float().clamp(0.0, 1.0)
    exponent = psi.a1 + psi.a2 * (~same_identity.to(torch.bool)).float()
    return s.pow(exponent)


def compute_psi(
    sim: torch.Tensor, same_identity: torch.Tensor, txt_log_weight: torch.Tensor, psi: PsiParams
) -> torch.Tensor:
    """psi of Eq. 12: psi_img(s, same identity) * exp(log inverse text density) / a3.

    Args:
        sim: (B,) similarity of each sample to its drawn neighbour.
        same_identity: (B,) bool, whether the neighbour has the sample's identity.
        txt_log_weight: (B,) log inverse text density of the *sample* (`density.inverse_density_log_weights`).
        psi: the settings; a factor left out of `psi.terms` counts as 1, and terms "none" gives zeros.

    Returns:
        (B,) float32 psi >= 0. Samples whose caption was dropped for classifier-free guidance must get
        psi = 0; that is the caller's job (it knows which captions were dropped).
    """
    if psi.terms == "none":
        return torch.zeros(sim.shape, dtype=torch.float32, device=sim.device)
    out = torch.full(sim.shape, 1.0 / psi.a3, dtype=torch.float32, device=sim.device)
    if psi.uses_img:
        out = out * psi_img(sim, same_identity, psi)
    if psi.uses_txt:
        out = out * torch.exp(txt_log_weight.float())
    return out


def expected_psi(
    sims: torch.Tensor, same_identity: torch.Tensor, txt_log_weight: torch.Tensor, psi: PsiParams
) -> torch.Tensor:
    """Per-sample expectation of psi over the Cat(w) neighbour draw: sum_j w_j * psi(s_j, identity_j).

    For logging (e.g. mean psi of majority vs minority identities) without sampling noise.

    Args:
        sims: (N, k) neighbour similarities (`neighbors.knn_cosine`).
        same_identity: (N, k) bool, whether neighbour j has the sample's identity.
        txt_log_weight: (N,) log inverse text densities of the samples.
        psi: as in `compute_psi`.

    Returns:
        (N,) float32 expected psi.
    """
    k = sims.shape[1]
    values = compute_psi(
        sims.reshape(-1), same_identity.reshape(-1), txt_log_weight.float().repeat_interleave(k), psi
    ).reshape(sims.shape)
    return (neighbor_weights(sims) * values).sum(dim=1)
