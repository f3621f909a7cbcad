"""Training objectives: vanilla, PoGDiff (paper Eq. 6/13), CBDM and T2H baselines.

Every loss takes predictions and targets (never the model) and returns `(loss, logs)`, where `loss` is a
scalar tensor and `logs` a dict of detached scalar tensors (or floats), read only when they are logged
(reading them at every micro-step would stall an accelerator). Shapes: predictions and targets (B, C, H, W); `snr_weights`
are optional (B,) Min-SNR weights (diffusers' `mse_loss_weights` from `compute_snr`), which multiply
every per-sample term.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from pogdiff.families import Conditioning, cat_conditioning, neighbor_conditioning, unet_prediction
from pogdiff.neighbors import sample_categorical, sample_neighbor_positions
from pogdiff.psi import PsiParams, compute_psi

from .registry import Registry


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


@dataclass
class NeighborDraw:
    """The neighbour drawn for each sample of a batch and the psi weight of its consistency term."""

    rows: torch.Tensor  # (B,) dataset row of the neighbour (PoGDiff) or random partner (CBDM)
    psi: torch.Tensor  # (B,) weight used in the loss; 0 where the neighbour forward is skipped
    psi_drawn: torch.Tensor  # (B,) psi before skipping (for logging what the method asked for)
    needs_forward: torch.Tensor  # (B,) bool: rows whose neighbour prediction must be computed
    same_identity: torch.Tensor | None = None  # (B,) bool: the neighbour shows the sample's own identity


def draw_pogdiff_neighbors(
    index,
    rows: torch.Tensor,
    generator: torch.Generator,
    psi: PsiParams,
    *,
    caption_dropped: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
) -> NeighborDraw:
    """Draw j ~ Cat(w) among each sample's k neighbours (Eq. 8) and compute their psi (Eq. 12) with `psi`.

    A sample whose caption was dropped (classifier-free guidance training) gets psi = 0: its condition is the
    empty prompt, not the identity the neighbour was chosen for. Samples whose neighbour has the very same
    caption are skipped too: there the neighbour prediction equals the sample's own, so the term is exactly 0.
    `text_ids` are the rows' captions as trained in this epoch (`RowCaptions.ids`, for rows with several
    captions); the index's (first) captions when None.
    """
    rows = rows.cpu()
    sims = index.neighbor_sims[rows]
    positions = sample_neighbor_positions(sims, generator)
    neighbor_rows = index.neighbor_ids[rows, positions]
    sim = sims[torch.arange(len(rows)), positions]
    same_identity = index.identity_ids[rows] == index.identity_ids[neighbor_rows]
    weights = compute_psi(sim, same_identity, index.txt_log_weights[rows], psi)
    if caption_dropped is not None:
        weights = torch.where(caption_dropped.cpu(), torch.zeros_like(weights), weights)
    # The captions this epoch trains on (`RowCaptions.ids`); the index's first captions when not given.
    text_ids = index.text_ids if text_ids is None else text_ids.cpu()
    same_text = text_ids[rows] == text_ids[neighbor_rows]
    needs = needs_neighbor_forward(weights, same_text=same_text)
    return NeighborDraw(
        rows=neighbor_rows,
        psi=torch.where(needs, weights, torch.zeros_like(weights)),
        psi_drawn=weights,
        needs_forward=needs,
        same_identity=same_identity,
    )


class StepMeans:
    """Means of logged values over the micro-steps of one optimizer step (gradient accumulation).

    Each value comes with a weight (1 for a per-micro-step value such as a loss; the number of rows it averages
    for a per-row statistic such as the minority's psi), and a key absent from a micro-step does not count
    there: a minority-only mean is not diluted by micro-steps that drew no minority image. Values may be
    tensors on the accelerator: they are summed there and read once, in `pop` (no host sync per micro-step).
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._weights: dict[str, float] = {}

    def add(self, key: str, value: torch.Tensor | float, weight: float = 1.0) -> None:
        if weight > 0:
            if isinstance(value, torch.Tensor):
                value = value.detach().double()
            self._sums[key] = self._sums.get(key, 0.0) + value * weight
            self._weights[key] = self._weights.get(key, 0.0) + weight

    def pop(self) -> dict[str, float]:
        """The weighted means since the last `pop` as floats (one device-to-host copy per device), and a fresh
        start."""
        sums = {k: torch.as_tensor(v, dtype=torch.float64).reshape(()) for k, v in self._sums.items()}
        values: dict[str, float] = {}
        for device in {t.device for t in sums.values()}:
            keys = [k for k, t in sums.items() if t.device == device]
            values.update(zip(keys, torch.stack([sums[k] for k in keys]).tolist()))
        means = {k: values[k] / self._weights[k] for k in self._sums}
        self._sums, self._weights = {}, {}
        return means

    def update(self, other: StepMeans) -> None:
        """Adds another micro-step's sums and weights (e.g. the logs `objective_step` returns)."""
        for key, value in other._sums.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._weights[key] = self._weights.get(key, 0.0) + other._weights[key]


def pogdiff_draw_logs(draw: NeighborDraw, minority: torch.Tensor, step_means: StepMeans) -> None:
    """The mechanism's diagnostics of one micro-step: psi for the minority and the majority (per row, before
    skipping), the share of rows skipped, and the share of drawn neighbours of the sample's own identity."""
    step_means.add("frac_skipped", 1.0 - draw.needs_forward.float().mean())
    for key, rows in (("psi_minority", minority), ("psi_majority", ~minority)):
        count = int(rows.sum())
        if count:
            step_means.add(key, draw.psi_drawn[rows].mean(), weight=count)
    if draw.same_identity is not None:
        step_means.add("neighbor_same_identity", draw.same_identity.float().mean())


def draw_random_partners(num_rows: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """CBDM's y': the caption of a uniformly random training sample (whole set), one per batch element."""
    return torch.randint(0, num_rows, (batch_size,), generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# The objectives as registered objects: what `training.objective_step` draws, runs and logs for each `--objective`.
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Drawn:
    """What an objective's `draw` hands to its forwards: the (possibly replaced) target, the conditioning of drawn
    neighbours or partners, PoGDiff's `NeighborDraw`, and any value its `add_logs` reads (`stats`)."""

    target: torch.Tensor
    neighbor_hidden_states: Conditioning | torch.Tensor | None = None
    draw: NeighborDraw | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossInputs:
    """Everything an objective's forwards + loss may read for one batch (the arguments of
    `training.objective_loss`)."""

    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    encoder_hidden_states: Conditioning | torch.Tensor
    neighbor_hidden_states: Conditioning | torch.Tensor | None = None
    draw: NeighborDraw | None = None
    snr_weights: torch.Tensor | None = None
    num_train_timesteps: int = 1000
    cbdm_tau: float = 1.0
    cbdm_gamma: float = 0.25
    neighbor_forward: Callable | None = None
    neighbor_grad: bool = False
    any_rank: Callable[[bool], bool] | None = None


class Objective:
    """One `--objective`: a name, what it needs from the trainer, its draw, its forwards + loss and its logs.

    The base class is plain fine-tuning (one forward, `vanilla_loss`); an objective overrides what it changes.
    `register_objective(MyObjective())` makes it an `--objective` choice of `train_pogdiff.py` (parsers built from
    then on), of `training.objective_step` / `objective_loss` and of `benchmarks/bench_step.py`.

    Attributes:
        name: the `--objective` value.
        needs_index: the trainer builds (or loads) the PoGDiff index (`index.PoGDiffIndex`: neighbours, psi
            weights, text density) and passes it to `draw`.
        uses_neighbors: draws among the index's k neighbours and runs PoGDiff's no-grad neighbour forward: the
            trainer checks `--num_neighbors` < N and builds `training.make_neighbor_forward` for it.
        uses_partners: draws random partners among all rows (CBDM's y').
    """

    name: str = "vanilla"
    needs_index: bool = False
    uses_neighbors: bool = False
    uses_partners: bool = False

    def draw(
        self,
        settings,
        inputs,
        *,
        noise_scheduler,
        captions,
        generator: torch.Generator,
        index=None,
        num_rows: int | None = None,
    ) -> Drawn:
        """What the objective draws before its forwards (from `generator` only, for exact resumes).

        `settings` is `training.ObjectiveSettings`, `inputs` the `training.NoisedBatch`, `captions` the
        `training.CaptionStates` (`captions.of_rows(rows)`: the conditioning of other rows' captions)."""
        return Drawn(inputs.target)

    def loss(self, unet: Callable, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, Any]]:
        """The UNet forward(s) and the loss; logs as `vanilla_loss`'s (detached scalars)."""
        model_pred = unet_prediction(
            unet, inputs.noisy_latents, inputs.timesteps, inputs.encoder_hidden_states
        )
        return vanilla_loss(model_pred, inputs.target, inputs.snr_weights)

    def add_logs(
        self, drawn: Drawn, logs: dict[str, Any], means: StepMeans, *, rows: torch.Tensor, minority
    ) -> None:
        """Adds the step's logs to `means` (`StepMeans`); `minority` (N,) bool marks few-shot rows."""
        for key, value in logs.items():
            means.add(key, value)


# Every `--objective`, by name, in `--help` order.
OBJECTIVES: Registry[Objective] = Registry("--objective")
register_objective = OBJECTIVES.register
get_objective = OBJECTIVES.choice


class Vanilla(Objective):
    """Plain fine-tuning: diffusers' train_text_to_image loss."""


class PoGDiff(Objective):
    """PoGDiff (Eq. 13): a neighbour j ~ Cat(w) of each sample and psi from the index, then `pogdiff_loss`.

    Forwards: one under `torch.no_grad()` for just the rows that need a neighbour prediction
    (`draw.needs_forward`), on the same x_t and t with the neighbour's text (`neighbor_hidden_states`, one row per
    needed sample), then the forward with grad. Both go through the same (possibly DDP / FSDP / DeepSpeed-wrapped)
    model: under no_grad, DDP records nothing for the backward, and sharded engines gather their parameters as for
    any forward. `neighbor_forward` (from `training.make_neighbor_forward`) replaces that eager forward, e.g. by a
    CUDA graph replay; it returns the same compact predictions, or None to fall back to the eager forward.
    With `neighbor_grad` (`--neighbor_grad`, the paper's literal Algorithm 1) the neighbour rows need grad too, so
    they join the sample rows in one forward on the enlarged batch, as CBDM's do (`neighbor_forward` unused).
    `any_rank` keeps the number of forwards the same on every rank (see `training.objective_loss`).
    """

    name = "pogdiff"
    needs_index = True
    uses_neighbors = True

    def draw(
        self, settings, inputs, *, noise_scheduler, captions, generator, index=None, num_rows=None
    ) -> Drawn:
        draw = draw_pogdiff_neighbors(
            index,
            inputs.rows,
            generator,
            settings.psi,
            caption_dropped=inputs.caption_dropped,
            text_ids=captions.row_text_ids,
        )
        neighbor_hidden_states = None
        if bool(draw.needs_forward.any()):
            neighbor_hidden_states = captions.of_rows(draw.rows[draw.needs_forward])
        return Drawn(inputs.target, neighbor_hidden_states, draw)

    def loss(self, unet, inputs: LossInputs):
        x, t, cond, draw = inputs.noisy_latents, inputs.timesteps, inputs.encoder_hidden_states, inputs.draw
        neighbor_hidden_states = inputs.neighbor_hidden_states
        if inputs.neighbor_grad:
            rows = draw.needs_forward.nonzero().flatten().to(x.device, non_blocking=True)
            both = unet_prediction(
                unet,
                torch.cat([x, x.index_select(0, rows)]),
                torch.cat([t, t.index_select(0, rows)]),
                cat_conditioning([cond, neighbor_conditioning(cond, neighbor_hidden_states, rows)])
                if neighbor_hidden_states is not None
                else cond,
            )
            model_pred, neighbor_pred = both[: len(x)], both[len(x) :]
            return pogdiff_loss(
                model_pred, inputs.target, neighbor_pred, draw.psi, inputs.snr_weights, neighbor_grad=True
            )

        neighbor_pred = None
        # The draw lives on the CPU: deciding what to skip never waits for the accelerator.
        needed = bool(draw.needs_forward.any())
        padded = inputs.any_rank is not None and inputs.any_rank(needed) and not needed
        if padded:
            # Another rank runs its neighbour forward: this one joins with a one-row forward whose result is
            # dropped, so that the sharded engine's parameter gathers match across ranks. psi is 0 on every row
            # here, so the loss is exactly the skipped one.
            with torch.no_grad():
                unet_prediction(unet, x[:1], t[:1], cond[:1])
        if needed:
            rows = draw.needs_forward.nonzero().flatten().to(x.device, non_blocking=True)
            # The neighbour's caption on the sample's own image (SDXL: the sample's own time ids).
            neighbor_hidden_states = neighbor_conditioning(cond, neighbor_hidden_states, rows)
            # Before the forward with grad: its activations are freed before the training activations are
            # allocated, so the extra forward adds time but (almost) no peak memory.
            with torch.no_grad():
                if inputs.neighbor_forward is not None:
                    neighbor_pred = inputs.neighbor_forward(x, t, neighbor_hidden_states, rows)
                if neighbor_pred is None:
                    # Compact: only the rows with psi > 0, in batch order (what pogdiff_loss reads).
                    neighbor_pred = unet_prediction(
                        unet, x.index_select(0, rows), t.index_select(0, rows), neighbor_hidden_states
                    )
        model_pred = unet_prediction(unet, x, t, cond)
        loss, logs = pogdiff_loss(model_pred, inputs.target, neighbor_pred, draw.psi, inputs.snr_weights)
        if inputs.any_rank is not None:
            # The cost of rank consistency: the share of micro-steps this rank ran a forward only to keep step.
            logs["neighbor_forward_padded"] = float(padded)
        return loss, logs

    def add_logs(self, drawn, logs, means, *, rows, minority) -> None:
        neighbor_mse = logs.pop("neighbor_mse", None)
        logs.pop("frac_skipped", None)  # the draw's own count below also knows same-caption skips
        super().add_logs(drawn, logs, means, rows=rows, minority=minority)
        draw = drawn.draw
        is_minority = minority[rows] if minority is not None else torch.zeros(len(rows), dtype=torch.bool)
        pogdiff_draw_logs(draw, is_minority, means)
        if neighbor_mse is not None:
            means.add("neighbor_mse", neighbor_mse, weight=int(draw.needs_forward.sum()))


class CBDM(Objective):
    """CBDM (Qin et al. 2023): a random partner's caption per sample; the partner branch needs grad, so both
    conditions go through ONE forward on the doubled batch (a DDP model may only run one forward per backward)."""

    name = "cbdm"
    uses_partners = True

    def draw(
        self, settings, inputs, *, noise_scheduler, captions, generator, index=None, num_rows=None
    ) -> Drawn:
        partners = draw_random_partners(num_rows, len(inputs.rows), generator)
        return Drawn(inputs.target, captions.of_rows(partners))

    def loss(self, unet, inputs: LossInputs):
        x, t, cond = inputs.noisy_latents, inputs.timesteps, inputs.encoder_hidden_states
        both = unet_prediction(
            unet,
            torch.cat([x, x]),
            torch.cat([t, t]),
            cat_conditioning([cond, neighbor_conditioning(cond, inputs.neighbor_hidden_states)]),
        )
        model_pred, partner_pred = both.chunk(2)
        return cbdm_loss(
            model_pred,
            inputs.target,
            partner_pred,
            t,
            inputs.num_train_timesteps,
            tau=inputs.cbdm_tau,
            gamma=inputs.cbdm_gamma,
            snr_weights=inputs.snr_weights,
        )


class T2H(Objective):
    """T2H (Zhang et al. 2024): targets transferred toward denser batch members (`t2h_targets`, from the index's
    text density), then one forward and the MSE."""

    name = "t2h"
    needs_index = True

    def draw(
        self, settings, inputs, *, noise_scheduler, captions, generator, index=None, num_rows=None
    ) -> Drawn:
        device = inputs.latents.device
        target, accepted = t2h_targets(
            inputs.latents,
            inputs.noisy_latents,
            inputs.timesteps,
            # add_noise already moved the scheduler's table to the latents' device: no copy per step.
            noise_scheduler.alphas_cumprod.to(device),
            index.elbo[inputs.rows].to(device),
            generator,
            noise=inputs.noise,
            prediction_type=noise_scheduler.config.prediction_type,
        )
        return Drawn(target, stats={"accepted": accepted})

    def add_logs(self, drawn, logs, means, *, rows, minority) -> None:
        super().add_logs(drawn, logs, means, rows=rows, minority=minority)
        means.add("t2h_accept_rate", drawn.stats["accepted"].float().mean())


for _objective in (Vanilla(), PoGDiff(), CBDM(), T2H()):
    register_objective(_objective)
