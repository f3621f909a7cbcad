"""One training step's objective-specific work, shared by `train_pogdiff.py` and `benchmarks/`.

The script does what diffusers' train_text_to_image.py does (encode, noise, timesteps, text encoding, target);
these functions add what each objective needs on top: the neighbour draw and psi (PoGDiff), the random partner
(CBDM), the target transfer (T2H), and the UNet forwards and the loss. Keeping them here means a benchmark
times exactly the code path the trainer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pogdiff.neighbors import compute_psi, sample_neighbor_positions
from pogdiff.objectives import cbdm_loss, needs_neighbor_forward, pogdiff_loss, t2h_targets, vanilla_loss

OBJECTIVES = ("vanilla", "pogdiff", "cbdm", "t2h")


@dataclass
class NeighborDraw:
    """The neighbour drawn for each sample of a batch and the psi weight of its consistency term."""

    rows: torch.Tensor  # (B,) dataset row of the neighbour (PoGDiff) or random partner (CBDM)
    psi: torch.Tensor  # (B,) weight used in the loss; 0 where the neighbour forward is skipped
    psi_drawn: torch.Tensor  # (B,) psi before skipping (for logging what the method asked for)
    needs_forward: torch.Tensor  # (B,) bool: rows whose neighbour prediction must be computed


def draw_pogdiff_neighbors(
    index,
    rows: torch.Tensor,
    generator: torch.Generator,
    *,
    a1: float,
    a2: float,
    a3: float,
    terms: str,
    caption_dropped: torch.Tensor | None = None,
) -> NeighborDraw:
    """Draw j ~ Cat(w) among each sample's k neighbours (Eq. 8) and compute psi (Eq. 12).

    A sample whose caption was dropped (classifier-free guidance training) gets psi = 0: its condition is the
    empty prompt, not the identity the neighbour was chosen for. Samples whose neighbour has the very same
    caption are skipped too: there the neighbour prediction equals the sample's own, so the term is exactly 0.
    """
    rows = rows.cpu()
    sims = index.neighbor_sims[rows]
    positions = sample_neighbor_positions(sims, generator)
    neighbor_rows = index.neighbor_ids[rows, positions]
    sim = sims[torch.arange(len(rows)), positions]
    same_identity = index.identity_ids[rows] == index.identity_ids[neighbor_rows]
    psi = compute_psi(sim, same_identity, index.txt_log_weights[rows], a1=a1, a2=a2, a3=a3, terms=terms)
    if caption_dropped is not None:
        psi = torch.where(caption_dropped.cpu(), torch.zeros_like(psi), psi)
    same_text = index.text_ids[rows] == index.text_ids[neighbor_rows]
    needs = needs_neighbor_forward(psi, same_text=same_text)
    return NeighborDraw(
        rows=neighbor_rows,
        psi=torch.where(needs, psi, torch.zeros_like(psi)),
        psi_drawn=psi,
        needs_forward=needs,
    )


def draw_random_partners(num_rows: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """CBDM's y': the caption of a uniformly random training sample (whole set), one per batch element."""
    return torch.randint(0, num_rows, (batch_size,), generator=generator)


@torch.no_grad()
def encode_latent_parameters(
    vae,
    get_pixels: Callable[[int], torch.Tensor],
    num_rows: int,
    batch_size: int = 16,
    show_progress: bool = True,
) -> torch.Tensor:
    """The VAE's latent distribution parameters (mean and log-variance, (N, 2C, h, w)) of every row, on CPU.

    Caching the *distribution* rather than one sample keeps training stochastic exactly as without the cache:
    each step still draws `DiagonalGaussianDistribution(params).sample(generator)`.
    """
    from tqdm.auto import tqdm

    device, dtype = vae.device, vae.dtype
    chunks = []
    for start in tqdm(range(0, num_rows, batch_size), desc="Caching latents", disable=not show_progress):
        pixels = torch.stack([get_pixels(i) for i in range(start, min(start + batch_size, num_rows))])
        chunks.append(vae.encode(pixels.to(device, dtype)).latent_dist.parameters.cpu())
    return torch.cat(chunks)


def unet_prediction(unet: Callable, noisy_latents, timesteps, encoder_hidden_states) -> torch.Tensor:
    return unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]


def objective_loss(
    objective: str,
    unet: Callable,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    neighbor_hidden_states: torch.Tensor | None = None,
    draw: NeighborDraw | None = None,
    snr_weights: torch.Tensor | None = None,
    num_train_timesteps: int = 1000,
    cbdm_tau: float = 1.0,
    cbdm_gamma: float = 0.25,
) -> tuple[torch.Tensor, dict[str, float]]:
    """UNet forward(s) and the loss of `objective` for one batch.

    - vanilla / t2h: one forward, MSE to `target` (T2H's target transfer happens before, in `t2h_targets`).
    - pogdiff: the forward with grad, plus one forward under `torch.no_grad()` for just the rows that need a
      neighbour prediction (`draw.needs_forward`), on the same x_t and t with the neighbour's text
      (`neighbor_hidden_states`, one row per needed sample). It goes through the same (possibly DDP / FSDP /
      DeepSpeed-wrapped) model: under no_grad, DDP records nothing for the backward, and sharded engines
      gather their parameters as for any forward.
    - cbdm: the neighbour branch needs grad, so both conditions go through ONE forward on the doubled batch
      (a DDP model may only run one forward per backward).
    """
    if objective in ("vanilla", "t2h"):
        model_pred = unet_prediction(unet, noisy_latents, timesteps, encoder_hidden_states)
        return vanilla_loss(model_pred, target, snr_weights)

    if objective == "pogdiff":
        model_pred = unet_prediction(unet, noisy_latents, timesteps, encoder_hidden_states)
        neighbor_pred = None
        # The draw lives on the CPU: deciding what to skip never waits for the accelerator.
        if bool(draw.needs_forward.any()):
            rows = draw.needs_forward.nonzero().flatten().to(noisy_latents.device, non_blocking=True)
            with torch.no_grad():
                # Compact: only the rows with psi > 0, in batch order (what pogdiff_loss reads).
                neighbor_pred = unet_prediction(
                    unet,
                    noisy_latents.index_select(0, rows),
                    timesteps.index_select(0, rows),
                    neighbor_hidden_states,
                )
        return pogdiff_loss(model_pred, target, neighbor_pred, draw.psi.to(model_pred.device), snr_weights)

    if objective == "cbdm":
        both = unet_prediction(
            unet,
            torch.cat([noisy_latents, noisy_latents]),
            torch.cat([timesteps, timesteps]),
            torch.cat([encoder_hidden_states, neighbor_hidden_states]),
        )
        model_pred, partner_pred = both.chunk(2)
        return cbdm_loss(
            model_pred,
            target,
            partner_pred,
            timesteps,
            num_train_timesteps,
            tau=cbdm_tau,
            gamma=cbdm_gamma,
            snr_weights=snr_weights,
        )

    raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")


__all__ = [
    "OBJECTIVES",
    "NeighborDraw",
    "draw_pogdiff_neighbors",
    "draw_random_partners",
    "encode_latent_parameters",
    "objective_loss",
    "t2h_targets",
    "unet_prediction",
]
