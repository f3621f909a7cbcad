"""The forward diffusion of one training step: noise -> timesteps -> x_t -> target, as train_text_to_image.py does it.

One pure function, shared by the trainer (:func:`pogdiff.training.noised_batch`) and the demo's offline
pretraining (:func:`pogdiff.pretrain.pretrain_unet`). Every draw comes from the given generator, in a fixed
order, never from the global RNG, so that a resumed run repeats the uninterrupted one bitwise and the pretrained
demo model is the same on every run:

1. ``noise``: standard normal, the shape of ``latents``;
2. with ``noise_offset``: one more normal per (sample, channel), times ``noise_offset``, added to ``noise``;
3. with ``input_perturbation``: one more normal the shape of ``latents``, times ``input_perturbation``, added to
   a copy of ``noise`` that only ``x_t`` sees (the target stays ``noise``);
4. ``timesteps``: uniform integers in ``[0, num_train_timesteps)``, one per sample.

A draw whose option is 0 is skipped, so the stream of the plain case is noise then timesteps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import UserError


class Noised(NamedTuple):
    """What :func:`noise_latents` returns: the noise, the timesteps, x_t and the training target."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    target: torch.Tensor


def noise_latents(
    latents: torch.Tensor,
    noise_scheduler,
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
) -> Noised:
    """Noise `latents` (B, C, H, W) at random timesteps with `noise_scheduler` (a diffusers scheduler with
    ``add_noise`` / ``get_velocity``), drawing from `generator` in the order of the module's docstring.

    The target is ``noise`` for ``prediction_type="epsilon"`` and the velocity for ``"v_prediction"``.

    Raises:
        UserError: the scheduler's ``prediction_type`` is neither.
    """
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += noise_offset * torch.randn(
            (bsz, latents.shape[1], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype
        )
    noised = noise
    if input_perturbation:
        noised = noise + input_perturbation * torch.randn(
            latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=latents.device
    ).long()
    noisy_latents = noise_scheduler.add_noise(latents, noised, timesteps)

    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    return Noised(noise, timesteps, noisy_latents, target)
