"""Training objectives: vanilla, PoGDiff (paper Eq. 6/13), CBDM and T2H baselines.

Every loss takes predictions and targets (never the model) and returns `(loss, logs)`, where `loss` is a
scalar tensor and `logs` a dict of detached scalar tensors (or floats), read only when they are logged
(reading them at every micro-step would stall an accelerator). Shapes: predictions and targets (B, C, H, W); `snr_weights`
are optional (B,) Min-SNR weights (diffusers' `mse_loss_weights` from `compute_snr`), which multiply
every per-sample term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pogdiff.neighbors import sample_categorical


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean over all but the batch dimension of (a - b)^2, in float32."""
    return F.mse_loss(a.float(), b.float(), reduction="none").mean(dim=list(range(1, a.ndim)))


def vanilla_loss(
    model_pred: torch.Tensor, target: torch.Tensor, snr_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """diffusers' train_text_to_image loss, operation for operation (so results match it bitwise)."""
    if snr_weights is None:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    else:
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
        loss = loss.mean(dim=list(range(1, len(loss.shape)))) * snr_weights
        loss = loss.mean()
    return loss, {"loss_main": loss.detach()}


def _check_psi(psi: torch.Tensor, batch_size: int) -> None:
    if psi.shape != (batch_size,):
        raise ValueError(f"psi must have shape ({batch_size},) (one per sample), got {tuple(psi.shape)}.")
    if not bool(torch.isfinite(psi).all()) or bool((psi < 0).any()):
        raise ValueError(f"psi must be finite and >= 0, got {psi.tolist()}; check the psi flags and index.")


def pogdiff_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    neighbor_pred: torch.Tensor | None,
    psi: torch.Tensor,
    snr_weights: torch.Tensor | None = None,
    neighbor_grad: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PoGDiff loss (Eq. 13): mean_b[ w_b * (mse_b(a, target) + psi_b * mse_b(a, sg(c))) ].

    a = `model_pred` (the prediction with the sample's own prompt), c = `neighbor_pred` (the prediction
    for the same x_t and t with the drawn neighbour's prompt), mse_b = per-sample mean over C, H, W,
    w_b = `snr_weights` (1 when None). c is detached: the PoG target treats p_theta(.|y') as part of the
    target, and for fixed c, ||a - eps||^2 + psi ||a - c||^2 = (1 + psi) ||a - m||^2 + const with
    m = (eps + psi c) / (1 + psi).

    The first term is `vanilla_loss` itself. Rows with psi_b == 0 are never read from `neighbor_pred`
    (they may hold anything, NaN included), so their neighbour forward can be skipped; `neighbor_pred`
    is either (B, C, H, W) or compact, holding only the rows with psi > 0 in batch order, and may be None
    when no psi is > 0. With psi all 0 the loss is the very tensor `vanilla_loss` returns, with no extra
    graph.

    `neighbor_grad=True` keeps c in the graph instead (the literal Algorithm 1 of the paper, which
    differentiates through eps_theta(x_t, y') as well): the term's gradient is 2 psi (a - c) / (C H W B) for a
    and its negative for c. The value of the loss is the same either way.

    logs: loss_main, loss_consistency, psi_mean, frac_skipped (fraction of rows with psi == 0), and
    neighbor_mse (mean of mse_b(a, c) over the rows with psi > 0, when there are any).
    """
    batch_size = model_pred.shape[0]
    _check_psi(psi, batch_size)
    main, logs = vanilla_loss(model_pred, target, snr_weights)
    # psi lives on the CPU (the trainer's draw does): which rows have a term is known without a device sync.
    psi = psi.cpu()
    active = torch.nonzero(psi > 0).flatten()
    logs.update(psi_mean=psi.float().mean(), frac_skipped=1.0 - len(active) / batch_size)
    if len(active) == 0:
        logs["loss_consistency"] = 0.0
        return main, logs
    if neighbor_pred is None or neighbor_pred.shape[0] not in (batch_size, len(active)):
        raise ValueError(
            f"neighbor_pred must hold the neighbour predictions of all {batch_size} rows or of the "
            f"{len(active)} rows with psi > 0, got "
            f"{None if neighbor_pred is None else tuple(neighbor_pred.shape)}."
        )
    device = model_pred.device
    active_on_device = active.to(device, non_blocking=True)
    if neighbor_pred.shape[0] == batch_size:
        neighbor_pred = neighbor_pred[active_on_device]
    weight = psi[active].float().to(device, non_blocking=True)
    if snr_weights is not None:
        weight = weight * snr_weights[active_on_device]
    per_sample = _per_sample_mse(
        model_pred[active_on_device], neighbor_pred if neighbor_grad else neighbor_pred.detach()
    )
    # Divide by B, not len(active): skipped rows contribute 0 to the batch mean.
    consistency = (weight * per_sample).sum() / batch_size
    logs["loss_consistency"] = consistency.detach()
    # ||a - c||^2 per element over the rows with a term: how far the two captions' predictions are apart.
    logs["neighbor_mse"] = per_sample.detach().mean()
    return main + consistency, logs


def needs_neighbor_forward(psi: torch.Tensor, same_text: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: rows whose neighbour prediction must be computed for `pogdiff_loss`.

    A row needs it iff psi > 0 and (when `same_text` is given) the neighbour's prompt differs from the
    sample's own. With the same prompt, the same x_t and the same t, the neighbour forward reproduces the
    sample's own prediction, c = sg(a), and the term psi * mse(a, sg(a)) has value 0 and gradient
    2 psi (a - sg(a)) / (C H W) = 0: skipping it is exact (up to the UNet's run-to-run rounding; it
    assumes no dropout in the UNet, the diffusers default). Pass `torch.where(mask, psi, 0)` to
    `pogdiff_loss` so that it does not read the skipped rows.
    """
    needed = psi > 0
    if same_text is not None:
        needed = needed & ~same_text.to(torch.bool)
    return needed


def cbdm_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    neighbor_pred: torch.Tensor,
    timesteps: torch.Tensor,
    num_train_timesteps: int,
    tau: float = 1.0,
    gamma: float = 0.25,
    snr_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CBDM loss (Qin et al. 2023): vanilla + tau * (t/T) * (mse(a, sg(h)) + gamma * mse(sg(a), h)).

    a = `model_pred`; h = `neighbor_pred`, the prediction for the same x_t and t with the prompt of a random
    training sample, computed WITH grad: the regulariser pulls a toward h and the commitment term pulls h
    toward a, so the gradient reaches both forwards in the ratio 1 : gamma. Per-sample terms use the mean
    over C, H, W and are multiplied by `snr_weights` when given, then averaged over the batch; the first
    term is `vanilla_loss` itself. t/T uses diffusers' timesteps in [0, T).

    logs: loss_main, loss_reg (tau-weighted regulariser), loss_commit (tau- and gamma-weighted commitment).
    """
    main, logs = vanilla_loss(model_pred, target, snr_weights)
    scale = tau * timesteps.float() / num_train_timesteps
    if snr_weights is not None:
        scale = scale * snr_weights
    reg = (scale * _per_sample_mse(model_pred, neighbor_pred.detach())).mean()
    commit = (scale * gamma * _per_sample_mse(model_pred.detach(), neighbor_pred)).mean()
    logs.update(loss_reg=reg.detach(), loss_commit=commit.detach())
    return main + reg + commit, logs


@torch.no_grad()
def t2h_targets(
    latents: torch.Tensor,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    log_density: torch.Tensor,
    generator: torch.Generator,
    prediction_type: str = "epsilon",
    *,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T2H targets (Zhang et al. 2024): re-target a sample toward a denser batch member it may come from.

    For each sample i, draw j from the batch posterior of the clean latent given x_t,i,
    w_ij ~ exp(-||x_t,i / sqrt(abar_i) - x0_j||^2 / (2 sigma_i^2)), sigma_i^2 = 1/abar_i - 1, computed
    as the equal -||x_t,i - sqrt(abar_i) x0_j||^2 / (2 (1 - abar_i)) (finite even at abar = 0, where the
    posterior is uniform), in float64 log space. If j != i and log_density[j] >= log_density[i], the
    target becomes the one that would turn x0_j into x_t,i: eps_j = (x_t,i - sqrt(abar_i) x0_j) /
    sqrt(1 - abar_i) (epsilon) or v_j = sqrt(abar_i) eps_j - sqrt(1 - abar_i) x0_j (v_prediction).
    Otherwise the original target is kept (`noise` for epsilon, sqrt(abar) noise - sqrt(1-abar) x0 for
    v_prediction). The conditioning (prompt i) is unchanged; that is the caller's.

    Args:
        latents: (B, C, H, W) clean latents x0.
        noisy_latents: (B, C, H, W) x_t = sqrt(abar) x0 + sqrt(1 - abar) noise.
        timesteps: (B,) int timesteps.
        alphas_cumprod: (T,) the scheduler's `alphas_cumprod`.
        log_density: (B,) log text density of each sample (e.g. its ELBO); higher = denser.
        generator: CPU generator; the only source of randomness (B uniforms per call).
        prediction_type: "epsilon" or "v_prediction" (the scheduler's).
        noise: (B, C, H, W) the noise that made `noisy_latents` (keyword-only).

    Returns:
        `(targets, replaced)`: (B, C, H, W) targets in `noise.dtype` and (B,) bool, True where the target
        was replaced, i.e. a sample j != i was drawn and passed the density gate (j == i passes the gate
        trivially but changes nothing, so it counts as not replaced).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"T2H supports prediction_type 'epsilon' or 'v_prediction', got {prediction_type!r}."
        )
    batch_size = latents.shape[0]
    abar = alphas_cumprod.to(latents.device, torch.float64)[timesteps]
    x0 = latents.double().flatten(1)
    xt = noisy_latents.double().flatten(1)
    sqrt_abar = abar.sqrt()
    # ||x_t,i - s_i x0_j||^2 expanded, so that no B x B x D tensor is built.
    sq_dist = (
        xt.square().sum(1)[:, None]
        - 2 * sqrt_abar[:, None] * (xt @ x0.T)
        + abar[:, None] * x0.square().sum(1)[None, :]
    ).clamp(min=0)
    posterior = torch.softmax(-sq_dist / (2 * (1 - abar[:, None])), dim=1)
    j = sample_categorical(posterior, generator)
    index = torch.arange(batch_size, device=latents.device)
    replaced = (j != index) & (log_density.to(j.device)[j] >= log_density.to(j.device))

    # New targets in float64, cast once at the end: dividing by sqrt(1 - abar) ~ 0.03 at small t would
    # amplify the rounding of half-precision latents.
    mask = replaced[:, None]
    s, s1 = sqrt_abar[:, None], (1 - abar).sqrt()[:, None]
    x0_new = torch.where(mask, x0[j], x0)
    eps_new = torch.where(mask, (xt - s * x0_new) / s1, noise.double().flatten(1))
    new_targets = eps_new if prediction_type == "epsilon" else s * eps_new - s1 * x0_new
    return new_targets.view(noise.shape).to(noise.dtype), replaced
