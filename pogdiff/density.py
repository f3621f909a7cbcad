"""Inverse text density, the second factor of PoGDiff's psi (paper Sec. 3.2.3, Eq. 10-11).

A small MLP VAE is fitted to the pooled text embeddings of all N training samples (duplicates included:
how often a prompt occurs is exactly the signal), its ELBO approximates log p(y), and rare prompts get
large weights exp(-ELBO). The ELBO of a 768-d embedding spans hundreds of nats, so everything is done in
log space and the weights are normalised to mean 1, clipped and renormalised (`inverse_density_log_weights`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import UserError
from .seeds import derive_seed

# Bounds on log-variances and observation log-scales: keep exp() finite and stop the observation scale of
# a (nearly) constant embedding dimension from collapsing to 0, where its log-likelihood would diverge.
_LOGVAR_RANGE = (-12.0, 8.0)
_LOG_SCALE_RANGE = (-6.0, 3.0)


def _linear(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear with torch's default init bound 1/sqrt(fan_in), drawn from `generator`, not the global RNG."""
    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features)
    bound = 1.0 / math.sqrt(in_features)
    with torch.no_grad():
        layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
        layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)
    return layer


class TextDensityVAE(nn.Module):
    """MLP VAE over standardised text embeddings with a learned per-dimension Gaussian observation scale.

    encoder: D -> hidden -> (mu, logvar) in R^latent;  decoder: latent -> hidden -> D (the mean).
    Inputs are standardised with the `mean` / `std` buffers (set from the training embeddings by
    `fit_text_density`); `elbo` adds the standardisation's log-Jacobian back, so ELBOs are in nats of the
    raw embedding. Initialisation draws only from `generator` (seed 0 when None), never the global RNG.
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 16,
        hidden_dim: int = 256,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        self.latent_dim = latent_dim
        self.register_buffer("mean", torch.zeros(input_dim))
        self.register_buffer("std", torch.ones(input_dim))
        self.encoder = nn.Sequential(
            _linear(input_dim, hidden_dim, generator),
            nn.SiLU(),
            _linear(hidden_dim, 2 * latent_dim, generator),
        )
        self.decoder = nn.Sequential(
            _linear(latent_dim, hidden_dim, generator), nn.SiLU(), _linear(hidden_dim, input_dim, generator)
        )
        self.log_scale = nn.Parameter(torch.zeros(input_dim))

    def standardize(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings.float() - self.mean) / self.std

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of standardised inputs x."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar.clamp(*_LOGVAR_RANGE)

    def log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log N(x | decoder(z), diag(scale^2)) summed over dimensions, per row (standardised space)."""
        log_scale = self.log_scale.clamp(*_LOG_SCALE_RANGE)
        residual = (x - self.decoder(z)) * torch.exp(-log_scale)
        return -0.5 * (residual.square() + 2 * log_scale + math.log(2 * math.pi)).sum(dim=-1)

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(N(mu, exp(logvar)) || N(0, I)) per row."""
        return 0.5 * (mu.square() + logvar.exp() - logvar - 1).sum(dim=-1)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Single-draw ELBO per row of standardised x, with reparameterisation noise (B, latent) given."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * noise
        return self.log_likelihood(x, z) - self.kl(mu, logvar)


def _check_embeddings(embeddings: torch.Tensor, min_rows: int) -> None:
    if embeddings.ndim != 2 or embeddings.shape[0] < min_rows:
        raise UserError(
            f"The text-density VAE needs a 2-D tensor of at least {min_rows} text embeddings (N, D), got "
            f"shape {tuple(embeddings.shape)}."
        )
    if not bool(torch.isfinite(embeddings).all()):
        raise UserError(
            "The text embeddings contain NaN or inf; check the text encoder's output for the training captions."
        )


def _column_mean_std(x: torch.Tensor, rows_per_chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and sample std (N - 1) in float64, two passes over row chunks: no float64 copy of x."""
    n = x.shape[0]
    mean = sum(chunk.double().sum(dim=0) for chunk in x.split(rows_per_chunk)) / n
    squares = sum((chunk.double() - mean).square().sum(dim=0) for chunk in x.split(rows_per_chunk))
    return mean, (squares / max(n - 1, 1)).sqrt()


def fit_text_density(
    embeddings: torch.Tensor,
    *,
    latent_dim: int = 16,
    hidden_dim: int = 256,
    epochs: int = 200,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    max_steps: int = 2000,
    show_progress: bool = True,
) -> TextDensityVAE:
    """Fit a `TextDensityVAE` to the text embeddings of all N training samples.

    Args:
        embeddings: (N, D) pooled text embeddings, one row per training sample; keep duplicated captions
            (frequency is what the density measures).
        latent_dim, hidden_dim: VAE sizes.
        epochs: passes over the data, capped by `max_steps` optimiser steps in all: the cap keeps the fit
            short on large datasets (N = 10,000 x 768 fits in ~15 s on 2 CPU cores with the defaults).
        batch_size, lr: Adam mini-batch training on the negative ELBO.
        seed: seeds a local generator for initialisation, shuffling and reparameterisation noise; the global
            RNG is not touched, and the same seed on the same machine gives the same model.
        max_steps: cap on optimiser steps (see `epochs`).
        show_progress: show a tqdm bar.

    Returns:
        The fitted model in eval mode, on the device of `embeddings`.
    """
    _check_embeddings(embeddings, min_rows=2)
    if min(epochs, batch_size, max_steps, latent_dim, hidden_dim) < 1 or not lr > 0:
        raise UserError(
            f"fit_text_density needs epochs, batch_size, max_steps, latent_dim, hidden_dim >= 1 and lr > 0, "
            f"got epochs={epochs}, batch_size={batch_size}, max_steps={max_steps}, latent_dim={latent_dim}, "
            f"hidden_dim={hidden_dim}, lr={lr}."
        )
    device = embeddings.device
    n, dim = embeddings.shape
    cpu_generator = torch.Generator().manual_seed(seed)
    # Keyed apart from the initialisation stream: on the CPU the same seed would reuse its very numbers.
    noise_generator = torch.Generator(device=device).manual_seed(derive_seed(seed, 1))

    model = TextDensityVAE(dim, latent_dim, hidden_dim, generator=cpu_generator).to(device)
    mean, std = _column_mean_std(embeddings.detach())
    model.mean.copy_(mean.float())
    # A constant dimension carries no information; scale 1 keeps it at 0 instead of dividing by 0.
    model.std.copy_(torch.where(std > 0, std, torch.ones_like(std)).float())
    data = model.standardize(embeddings.detach())

    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = min(epochs * steps_per_epoch, max_steps)
    model.train()
    progress = tqdm(total=total_steps, desc="text-density VAE", disable=not show_progress)
    step = 0
    while step < total_steps:
        order = torch.randperm(n, generator=cpu_generator).to(device)
        for start in range(0, n, batch_size):
            if step == total_steps:
                break
            batch = data[order[start : start + batch_size]]
            noise = torch.randn(
                (batch.shape[0], latent_dim), generator=noise_generator, device=device, dtype=batch.dtype
            )
            # Per-dimension mean keeps the loss scale (and Adam's effective step) independent of D.
            loss = -model(batch, noise).mean() / dim
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            progress.update(1)
            if show_progress:
                progress.set_postfix(neg_elbo_per_dim=f"{loss.item():.3f}", refresh=False)
    progress.close()
    return model.eval()


@torch.no_grad()
def elbo(
    model: TextDensityVAE,
    embeddings: torch.Tensor,
    num_samples: int = 16,
    seed: int = 0,
    batch_size: int = 4096,
) -> torch.Tensor:
    """Per-sample ELBO (a lower bound on log p(y), in nats of the raw embedding), as float64 (N,).

    The expected log-likelihood is averaged over `num_samples` posterior draws (SPEC asks >= 16, the
    default; any >= 1 is accepted); the KL term is exact. Every sample uses the same `num_samples` standard
    normal draws (z = mu + sigma * eps_s, eps_s from a local generator seeded with `seed`): common random
    numbers make the *differences* between samples, which is what the weights use, less noisy, and the
    result reproducible. ELBOs are computed once per distinct row, so identical captions get identical
    values. The standardisation's log-Jacobian, -sum(log std), is included: it is the same for every
    sample and cancels in `inverse_density_log_weights`.
    """
    if num_samples < 1:
        raise UserError(f"num_samples must be >= 1 (SPEC recommends >= 16), got {num_samples}.")
    _check_embeddings(embeddings, min_rows=1)
    model.eval()
    device = model.mean.device
    unique, inverse = torch.unique(embeddings.detach().to(device), dim=0, return_inverse=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    eps = torch.randn((num_samples, model.latent_dim), generator=generator, device=device)
    log_jacobian = -model.std.double().log().sum()
    out = []
    for start in range(0, unique.shape[0], batch_size):
        x = model.standardize(unique[start : start + batch_size])
        mu, logvar = model.encode(x)
        sigma = torch.exp(0.5 * logvar)
        log_lik = sum(model.log_likelihood(x, mu + sigma * e).double() for e in eps)
        out.append(log_lik / num_samples - model.kl(mu, logvar).double() + log_jacobian)
    return torch.cat(out)[inverse]


def _log_mean_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, dim=0) - math.log(x.numel())


def inverse_density_log_weights(
    elbo: torch.Tensor,
    temperature: float = 1.0,
    w_min: float | None = 0.1,
    w_max: float | None = 10.0,
) -> torch.Tensor:
    """Log inverse-density weights log w_i, with w_i proportional to exp(-ELBO_i / T), mean(w) == 1.

    Unclipped: log w_i = -ELBO_i/T - logmeanexp(-ELBO/T), computed in float64 log space, so ELBOs of any
    magnitude (1e4 nats and beyond) give finite weights; the global constant is absorbed by a3 anyway.

    Clipped (`w_min` and/or `w_max` given): w_i = clip(exp(c - ELBO_i/T), w_min, w_max) with the one
    constant c that makes mean(w) == 1, found by bisection. This is "clip, then renormalise to mean 1"
    carried to its fixed point: the weights respect the bounds *and* have mean 1 (a single clip-then-divide
    would push them back outside the bounds), and their order is that of the densities. Ranks of samples
    clipped to the same bound are lost, by design: that is what the bounds are for. Needs
    w_min <= 1 <= w_max, since the mean of weights in [w_min, w_max] lies in that interval.

    Returns:
        (N,) float32 log-weights on the device of `elbo`.
    """
    if elbo.ndim != 1 or elbo.numel() == 0:
        raise UserError(f"elbo must be a non-empty 1-D tensor, got shape {tuple(elbo.shape)}.")
    if not bool(torch.isfinite(elbo).all()):
        raise UserError("The ELBO contains NaN or inf; refit the text-density VAE (check its embeddings).")
    if not temperature > 0:
        raise UserError(f"--density_temperature must be > 0, got {temperature}.")
    if (w_min is not None and not 0 < w_min <= 1) or (w_max is not None and not w_max >= 1):
        raise UserError(
            f"The inverse-density weight bounds must satisfy 0 < w_min <= 1 <= w_max (weights have mean 1), "
            f"got w_min={w_min}, w_max={w_max}."
        )
    x = -elbo.double() / temperature
    c0 = -float(_log_mean_exp(x))
    if w_min is None and w_max is None:
        return (x + c0).float()

    lo_bound = math.log(w_min) if w_min is not None else -math.inf
    hi_bound = math.log(w_max) if w_max is not None else math.inf

    def mean_weight(c: float) -> float:
        return float(torch.exp((x + c).clamp(lo_bound, hi_bound)).mean())

    # mean_weight is non-decreasing in c; at c_lo every weight is at w_min (or c0: no lower bound, where
    # clipping from above can only lower the mean below 1) and at c_hi every weight is at w_max.
    c_lo = min(c0, lo_bound - float(x.max())) if w_min is not None else c0
    c_hi = max(c0, hi_bound - float(x.min())) if w_max is not None else c0
    for _ in range(200):
        mid = (c_lo + c_hi) / 2
        if mid in (c_lo, c_hi):
            break
        if mean_weight(mid) < 1:
            c_lo = mid
        else:
            c_hi = mid
    log_w = (x + (c_lo + c_hi) / 2).clamp(lo_bound, hi_bound)
    # Remove the last ~1e-16 of bisection error; moves the bounds by as little.
    return (log_w - _log_mean_exp(log_w)).float()


def log_weight_summary(log_w: torch.Tensor) -> dict[str, float]:
    """min / median / max of the weights, their ratio max/min (`spread`) and log(max/min) in nats.

    Pass the unclipped log-weights (`inverse_density_log_weights(elbo, T, None, None)`) to see how much the
    temperature T spreads them; `log_spread` stays finite when `spread` overflows to inf.
    """
    lw = log_w.detach().double()
    log_spread = float(lw.max() - lw.min())
    return {
        "min": float(lw.min().exp()),
        "median": float(lw.median().exp()),
        "max": float(lw.max().exp()),
        "spread": math.exp(log_spread) if log_spread < 700 else math.inf,
        "log_spread": log_spread,
    }
