"""pogdiff.noising: the one forward-diffusion path of the trainer and the offline pretraining, and its draw order."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from pogdiff.errors import UserError
from pogdiff.noising import noise_latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("offset", "perturbation"), [(0.0, 0.0), (0.1, 0.0), (0.0, 0.2), (0.05, 0.1)])
def test_noise_latents_draws_noise_offset_perturbation_then_timesteps(prediction_type, offset, perturbation):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = noise_latents(
        latents,
        scheduler,
        torch.Generator().manual_seed(1),
        noise_offset=offset,
        input_perturbation=perturbation,
    )

    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(latents.shape, generator=generator)
    if offset:
        noise += offset * torch.randn((3, 4, 1, 1), generator=generator)
    noised = noise + perturbation * torch.randn(latents.shape, generator=generator) if perturbation else noise
    timesteps = torch.randint(0, 1000, (3,), generator=generator)
    assert torch.equal(got.noise, noise) and torch.equal(got.timesteps, timesteps)
    assert torch.equal(got.noisy_latents, scheduler.add_noise(latents, noised, timesteps))
    velocity = scheduler.get_velocity(latents, noise, timesteps)
    assert torch.equal(got.target, noise if prediction_type == "epsilon" else velocity)


def test_noise_latents_refuses_an_unknown_prediction_type():
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="sample")
    with pytest.raises(UserError, match="Unknown prediction type sample"):
        noise_latents(torch.zeros(1, 4, 2, 2), scheduler, torch.Generator().manual_seed(0))
