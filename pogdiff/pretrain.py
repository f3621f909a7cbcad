"""Pretrain the tiny Stable Diffusion: our offline stand-in for Stable Diffusion's own pretraining.

`pogdiff/testing.py` builds a tiny Stable Diffusion with *random* weights: its VAE decodes noise and its UNet
knows nothing, so fine-tuning it and judging the images would say nothing about a fine-tuning method. A real
Stable Diffusion arrives pretrained from the Hub, which no machine of ours can reach. So (SPEC section 6) a demo
first makes a base model here, on data *disjoint* from the identities it later fine-tunes and evaluates:

1. `pretrain_vae`: the VAE (AutoencoderKL) learns to reconstruct the images: per-image sum of squared errors
   plus `kl_weight` x the KL of the posterior to N(0, I), summed per image as in latent diffusion's
   autoencoder. The KL weight is small (default 1e-5), so the latent keeps detail and its scale is arbitrary.
2. `latent_scaling_factor`: SD multiplies latents by `vae.config.scaling_factor` (0.18215 for SD1.5) so that
   they have unit standard deviation, the scale the DDPM noise schedule assumes. We measure it the same way:
   1 / std of posterior samples of the pretraining images (the mean is not removed, as in SD1.5).
3. `pretrain_unet`: the UNet learns text-conditioned denoising with the vanilla objective
   (`pogdiff.objectives.vanilla_loss`, i.e. diffusers' train_text_to_image loss) on the images' captions. By
   default the text encoder stays frozen at its random initialisation; a share of captions is dropped to "" so
   that classifier-free guidance works at sampling time, as in SD. With `train_text_encoder=True` it learns
   beside the UNet (same optimiser and rate), the stand-in for SD's CLIP, which arrives trained: a random
   encoder need not map a name inside a long caption and the same name in a short prompt to related states,
   a trained one learns to when it sees both caption styles of the same images. Fine-tuning keeps it frozen
   either way, as upstream's `train_text_to_image.py` does.
   The base model predicts v (SD 2.x's parameterisation) rather than epsilon (SD1.5's). With epsilon on 16x16
   latents the loss barely rewards reading the caption: at high noise, where the caption decides what is drawn,
   an error in the image costs only SNR(t) (about 0.01) times as much in epsilon space. Measured on the digits
   demo (500 steps, batch 32): the epsilon UNet's loss was the same with the right and a wrong caption
   (0.0399 vs 0.0400, t >= 300) and a digit classifier recognised its samples at chance level up to 900 steps;
   the v UNet's loss was 0.221 vs 0.320 and the classifier recognised all 50 of its samples (guidance 2).
   Fine-tuning inherits the choice from the scheduler config
   (`train_pogdiff.py` then regresses v, and PoGDiff's neighbour term lives in v space too).
4. `build_base_model` does all of it from an `imagefolder` and saves a `StableDiffusionPipeline` folder (plus
   `pretraining.json`), which `train_pogdiff.py --pretrained_model_name_or_path` then loads like a Hub id.

Everything is seeded: the same seed on the same machine gives the same weights. Command line::

    python -m pogdiff.pretrain --train_data_dir digits-0-4 --output_dir outputs/base-model

This is a stand-in, not Stable Diffusion: a few thousand images and minutes of CPU, not billions and months.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from pogdiff.data import load_image_text_dataset, preprocess_image, resolve_columns, row_image_loader
from pogdiff.objectives import vanilla_loss
from pogdiff.testing import TINY_RESOLUTION, tiny_sd_components

from .errors import UserError, report_user_errors
from .noising import noise_latents

DEFAULT_KL_WEIGHT = 1e-5
DEFAULT_CAPTION_DROPOUT = 0.1
# v-prediction (as in SD 2.x), not SD1.5's epsilon: the module docstring gives the measurement behind it.
DEFAULT_PREDICTION_TYPE = "v_prediction"


def images_to_tensor(images: Sequence[Image.Image], resolution: int = TINY_RESOLUTION) -> torch.Tensor:
    """(N, 3, resolution, resolution) in [-1, 1]: the training script's transform (resize, centre crop)."""
    if not images:
        raise UserError("No images to pretrain on: the image list is empty.")
    return torch.stack([preprocess_image(image, resolution, center_crop=True) for image in images])


def batch_indices(
    num_items: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """`steps` batches of indices, walking through fresh random permutations of range(num_items) (epochs).

    Every item is seen once per epoch, as with a shuffled DataLoader; an epoch's last short batch is filled
    from the next permutation, so every batch has exactly `batch_size` items (at most `num_items`).
    """
    if num_items < 1 or batch_size < 1:
        raise UserError(
            f"Need >= 1 item and batch_size >= 1, got {num_items} items, batch_size {batch_size}."
        )
    batch_size = min(batch_size, num_items)
    pool = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(num_items, generator=generator)])
        yield pool[:batch_size]
        pool = pool[batch_size:]


def _optimizer_and_schedule(
    params: list[torch.nn.Parameter], lr: float, steps: int, warmup_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with diffusers' defaults (weight decay 1e-2) and diffusers' cosine schedule after a linear warmup
    (the rate decays to 0 at the last step, so a short run ends on small, low-noise updates)."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    schedule = get_scheduler(
        "cosine", optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(steps, 1)
    )
    return optimizer, schedule


@torch.no_grad()
def reconstruction_error(vae, pixel_values: torch.Tensor, batch_size: int = 64) -> float:
    """Mean squared error per pixel (in [-1, 1] units) of decode(posterior mean) against the images."""
    vae.eval()
    total = 0.0
    for start in range(0, len(pixel_values), batch_size):
        x = pixel_values[start : start + batch_size]
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        total += float(((recon - x) ** 2).sum())
    return total / pixel_values.numel()


def pretrain_vae(
    vae,
    pixel_values: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    warmup_steps: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> list[float]:
    """Train `vae` (an AutoencoderKL, in place) to reconstruct `pixel_values` ((N, 3, H, W) in [-1, 1]).

    Loss per image: sum of squared reconstruction errors of decode(z), z drawn from the posterior, plus
    `kl_weight` x KL(posterior || N(0, I)) summed over the latent; averaged over the batch. Returns the
    reconstruction MSE per pixel of every step (the number to watch; the loss itself scales with image size).
    """
    if steps < 0:
        raise UserError(f"steps must be >= 0, got {steps}.")
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    vae.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    warmup = min(50, steps // 10) if warmup_steps is None else warmup_steps
    optimizer, schedule = _optimizer_and_schedule(params, lr, steps, warmup)
    history = []
    progress = tqdm(
        batch_indices(len(pixel_values), batch_size, steps, generator),
        total=steps,
        desc="Pretraining VAE",
        disable=not show_progress,
    )
    for rows in progress:
        x = pixel_values[rows]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        squared = ((recon.float() - x.float()) ** 2).flatten(1).sum(1)
        loss = (squared + kl_weight * posterior.kl()).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite VAE loss at step {len(history) + 1}; lower the learning rate (got {lr})."
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(float(squared.detach().mean()) / x[0].numel())
        progress.set_postfix(recon_mse=f"{history[-1]:.4f}")
    vae.eval()
    return history


@torch.no_grad()
def encode_posteriors(
    vae, pixel_values: torch.Tensor, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every image (unscaled latents), computed once.

    Pretraining the UNet then draws z = mean + std * noise per step, exactly what `latent_dist.sample()`
    does, without running the encoder every step.
    """
    vae.eval()
    means, stds = [], []
    for start in range(0, len(pixel_values), batch_size):
        dist = vae.encode(pixel_values[start : start + batch_size]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor, seed: int = 0) -> float:
    """1 / standard deviation of posterior samples: SD's `scaling_factor`, measured on our VAE.

    Scaled latents then have unit variance, the signal scale the DDPM schedule (and SD1.5's 0.18215) assumes.
    """
    generator = torch.Generator().manual_seed(seed)
    samples = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    spread = float(samples.double().std())
    if not math.isfinite(spread) or spread <= 0:
        raise UserError(f"Latents have standard deviation {spread}; the VAE did not train (check its loss).")
    return 1.0 / spread


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states (the UNet's conditioning) of each prompt, as the trainer encodes captions (the
    SD family's `TextEncoders`)."""
    from .families import SDTextEncoders

    encoders = SDTextEncoders([tokenizer], [text_encoder]).eval()
    return encoders.encode(encoders.tokenize(prompts)).hidden_states


def pretrain_unet(
    unet,
    noise_scheduler,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    caption_states: torch.Tensor | None,
    caption_ids: torch.Tensor,
    *,
    scaling_factor: float,
    empty_state: torch.Tensor | None,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    caption_dropout_prob: float = DEFAULT_CAPTION_DROPOUT,
    warmup_steps: int | None = None,
    seed: int = 0,
    show_progress: bool = True,
    text_encoder: torch.nn.Module | None = None,
    caption_input_ids: torch.Tensor | None = None,
    empty_input_ids: torch.Tensor | None = None,
) -> list[float]:
    """Train `unet` (in place) with the vanilla objective: diffusers' train_text_to_image loop, minus I/O.

    Image i has posterior (latent_mean[i], latent_std[i]) and caption caption_states[caption_ids[i]]
    (hidden states of each distinct caption, precomputed: the text encoder is frozen). Each step draws
    latents from the posterior, scales them by `scaling_factor`, draws noise and timesteps, `add_noise`s,
    replaces a `caption_dropout_prob` share of captions by `empty_state` (the "" prompt, for classifier-free
    guidance), predicts and takes `vanilla_loss` against epsilon (or v). Returns the loss of every step.

    With `text_encoder` (and the token ids of each distinct caption, `caption_input_ids`, and of "",
    `empty_input_ids`), the encoder is trained too: each step encodes the batch's (possibly dropped) captions
    with gradients, and `caption_states` / `empty_state` are not used. The random draws are the same either way.
    """
    if not 0.0 <= caption_dropout_prob < 1.0:
        raise UserError(f"caption_dropout_prob must be in [0, 1), got {caption_dropout_prob}.")
    if text_encoder is not None and (caption_input_ids is None or empty_input_ids is None):
        raise ValueError("Training the text encoder needs caption_input_ids and empty_input_ids.")
    if text_encoder is None and (caption_states is None or empty_state is None):
        raise ValueError("A frozen text encoder needs caption_states and empty_state.")
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    if text_encoder is not None:
        text_encoder.requires_grad_(True).train()
        params += list(text_encoder.parameters())
    warmup = min(100, steps // 10) if warmup_steps is None else warmup_steps
    optimizer, schedule = _optimizer_and_schedule(params, lr, steps, warmup)
    history = []
    progress = tqdm(
        batch_indices(len(latent_mean), batch_size, steps, generator),
        total=steps,
        desc="Pretraining UNet",
        disable=not show_progress,
    )
    for rows in progress:
        mean, std = latent_mean[rows], latent_std[rows]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
        _, timesteps, noisy_latents, target = noise_latents(latents, noise_scheduler, generator)

        dropped = torch.rand(len(rows), generator=generator) < caption_dropout_prob
        if text_encoder is None:
            states = caption_states[caption_ids[rows]]
            states = torch.where(dropped[:, None, None], empty_state.expand_as(states), states)
        else:
            ids = caption_input_ids[caption_ids[rows]]
            ids = torch.where(dropped[:, None], empty_input_ids.expand_as(ids), ids)
            states = text_encoder(ids, return_dict=False)[0]

        model_pred = unet(noisy_latents, timesteps, states, return_dict=False)[0]
        loss, _ = vanilla_loss(model_pred, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Non-finite UNet loss at step {len(history) + 1}; lower the learning rate (got {lr})."
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(float(loss.detach()))
        progress.set_postfix(loss=f"{history[-1]:.4f}")
    unet.eval()
    if text_encoder is not None:
        text_encoder.requires_grad_(False).eval()
    return history


def _mean_of_last(values: Sequence[float], n: int = 20) -> float | None:
    return float(sum(values[-n:]) / len(values[-n:])) if values else None


def build_base_model(
    output_dir: str | os.PathLike,
    *,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    vae_steps: int = 600,
    unet_steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    vae_lr: float | None = None,
    kl_weight: float = DEFAULT_KL_WEIGHT,
    caption_dropout_prob: float = DEFAULT_CAPTION_DROPOUT,
    prediction_type: str = DEFAULT_PREDICTION_TYPE,
    resolution: int = TINY_RESOLUTION,
    seed: int = 0,
    source: str | None = None,
    show_progress: bool = True,
    train_text_encoder: bool = False,
) -> dict[str, Any]:
    """Pretrain the tiny Stable Diffusion on (`images`, `captions`) and save it as a diffusers folder.

    Components come from `tiny_sd_components(seed)`; the VAE is trained first (`vae_lr`, default `lr`), its
    `scaling_factor` set from the latent std, then the UNet (with `train_text_encoder`, the text encoder beside
    it; frozen and random otherwise), predicting `prediction_type` ("v_prediction" or
    "epsilon"; written to the scheduler config, so fine-tuning and sampling follow it). Saved with
    `StableDiffusionPipeline.save_pretrained` (loadable by plain diffusers, `PoGDiffPipeline` and
    `train_pogdiff.py`), with `pretraining.json` beside it. Returns that summary (settings, losses at start
    and end, scaling factor, wall time).
    """
    from diffusers import StableDiffusionPipeline

    if len(images) != len(captions):
        raise UserError(f"Got {len(images)} images but {len(captions)} captions; give one caption per image.")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
    started = time.perf_counter()
    pixel_values = images_to_tensor(images, resolution)
    with tempfile.TemporaryDirectory(prefix="pogdiff-tok-") as tok_dir:
        components = tiny_sd_components(seed=seed, tokenizer_dir=tok_dir)
        vae, unet = components["vae"], components["unet"]
        components["scheduler"].register_to_config(prediction_type=prediction_type)
        text_encoder, tokenizer = components["text_encoder"], components["tokenizer"]
        text_encoder.requires_grad_(False)

        recon_before = reconstruction_error(vae, pixel_values)
        pretrain_vae(
            vae,
            pixel_values,
            steps=vae_steps,
            batch_size=batch_size,
            lr=lr if vae_lr is None else vae_lr,
            kl_weight=kl_weight,
            seed=seed,
            show_progress=show_progress,
        )
        vae.requires_grad_(False)
        recon_after = reconstruction_error(vae, pixel_values)
        latent_mean, latent_std = encode_posteriors(vae, pixel_values)
        scaling_factor = latent_scaling_factor(latent_mean, latent_std, seed=seed)
        vae.register_to_config(scaling_factor=scaling_factor)

        distinct = sorted(set(captions))
        position = {caption: i for i, caption in enumerate(distinct)}
        caption_ids = torch.tensor([position[c] for c in captions], dtype=torch.long)
        if train_text_encoder:  # encoded every step, with gradients: only the token ids are needed here
            from .families import SDTextEncoders

            encoders = SDTextEncoders([tokenizer], [text_encoder])
            caption_states = empty_state = None
            trained_encoder = {
                "text_encoder": text_encoder,
                "caption_input_ids": encoders.tokenize(distinct),
                "empty_input_ids": encoders.tokenize([""]),
            }
        else:  # frozen: each distinct caption's states once
            caption_states = encode_prompts(text_encoder, tokenizer, distinct)
            empty_state = encode_prompts(text_encoder, tokenizer, [""])
            trained_encoder = {}
        unet_history = pretrain_unet(
            unet,
            components["scheduler"],
            latent_mean,
            latent_std,
            caption_states,
            caption_ids,
            scaling_factor=scaling_factor,
            empty_state=empty_state,
            steps=unet_steps,
            batch_size=batch_size,
            lr=lr,
            caption_dropout_prob=caption_dropout_prob,
            seed=seed,
            show_progress=show_progress,
            **trained_encoder,
        )

        # Saved as the base class so that plain diffusers (and train_pogdiff.py) load it like a Hub model.
        StableDiffusionPipeline(**components).save_pretrained(output_dir, safe_serialization=True)

    summary: dict[str, Any] = {
        "what": "Tiny Stable Diffusion (pogdiff/testing.py) pretrained by pogdiff/pretrain.py: a stand-in for "
        "Stable Diffusion's pretraining, not Stable Diffusion.",
        "source": source,
        "num_images": len(images),
        "captions": {caption: int((caption_ids == i).sum()) for i, caption in enumerate(distinct)},
        "resolution": resolution,
        "seed": seed,
        "vae": {
            "steps": vae_steps,
            "lr": lr if vae_lr is None else vae_lr,
            "kl_weight": kl_weight,
            "recon_mse_per_pixel_before": recon_before,
            "recon_mse_per_pixel_after": recon_after,
        },
        "scaling_factor": scaling_factor,
        "latent_mean": float(latent_mean.mean()),
        "unet": {
            "steps": unet_steps,
            "batch_size": batch_size,
            "lr": lr,
            "caption_dropout_prob": caption_dropout_prob,
            "prediction_type": prediction_type,
            "text_encoder": "trained with the UNet"
            if train_text_encoder
            else "frozen at random initialisation",
            "loss_first_20": _mean_of_last(unet_history[:20]),
            "loss_last_20": _mean_of_last(unet_history),
        },
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    with open(Path(output_dir) / "pretraining.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    return summary


def finetune_arguments(
    base: str | os.PathLike,
    train_data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    batch_size: int,
    steps: int,
    learning_rate: float,
    seed: int,
    resolution: int = TINY_RESOLUTION,
) -> list[str]:
    """train_pogdiff.py arguments shared by the demo's and the study's fine-tunes of a tiny base model.

    Centre crop + cached latents (deterministic transforms, so the cache is allowed), constant LR without
    warm-up, no intermediate checkpoints, and the base model's own VAE as the neighbour encoder (no download).
    Callers add the objective and their own flags.
    """
    return [
        "--pretrained_model_name_or_path", str(base),
        "--train_data_dir", str(train_data_dir),
        "--output_dir", str(output_dir),
        "--resolution", str(resolution),
        "--center_crop",
        "--cache_latents",
        "--train_batch_size", str(batch_size),
        "--max_train_steps", str(steps),
        "--learning_rate", str(learning_rate),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--checkpointing_steps", str(10**9),
        "--seed", str(seed),
        "--neighbor_encoder", "vae",
        "--num_neighbors", "5",
    ]  # fmt: skip


def load_training_images(
    train_data_dir: str, image_column: str | None = None, caption_column: str | None = None
) -> tuple[list[Image.Image], list[str]]:
    """The images and captions of an `imagefolder` (its `train` rows when it has a `split` column)."""
    dataset = load_image_text_dataset(train_data_dir=train_data_dir)
    image_column, caption_column, _ = resolve_columns(
        dataset.column_names, image_column, caption_column, None
    )
    captions = [str(c) for c in dataset.with_format(None)[caption_column][:]]
    image = row_image_loader(dataset, image_column)
    images = [image(i) for i in range(len(dataset))]
    return images, captions


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m pogdiff.pretrain",
        description="Pretrain the tiny offline Stable Diffusion (VAE, then UNet) on an imagefolder and save it "
        "as a diffusers folder: a stand-in for Stable Diffusion's pretraining. Use data disjoint from the "
        "identities you will fine-tune and evaluate on.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--train_data_dir", required=True, help="imagefolder with metadata.jsonl (file_name, text)"
    )
    parser.add_argument("--output_dir", required=True, help="where the diffusers folder is written")
    parser.add_argument("--image_column", default=None)
    parser.add_argument("--caption_column", default=None)
    parser.add_argument("--vae_steps", type=int, default=600)
    parser.add_argument("--unet_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="AdamW learning rate (UNet, and VAE by default)"
    )
    parser.add_argument("--vae_lr", type=float, default=None, help="VAE learning rate (default: --lr)")
    parser.add_argument("--kl_weight", type=float, default=DEFAULT_KL_WEIGHT)
    parser.add_argument("--caption_dropout_prob", type=float, default=DEFAULT_CAPTION_DROPOUT)
    parser.add_argument(
        "--prediction_type",
        choices=("v_prediction", "epsilon"),
        default=DEFAULT_PREDICTION_TYPE,
        help="what the UNet predicts (v: learns to follow captions far faster on small latents)",
    )
    parser.add_argument("--resolution", type=int, default=TINY_RESOLUTION)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="train the text encoder beside the UNet (default: frozen at its random initialisation)",
    )
    args = parser.parse_args(argv)

    images, captions = load_training_images(args.train_data_dir, args.image_column, args.caption_column)
    summary = build_base_model(
        args.output_dir,
        images=images,
        captions=captions,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        vae_lr=args.vae_lr,
        kl_weight=args.kl_weight,
        caption_dropout_prob=args.caption_dropout_prob,
        prediction_type=args.prediction_type,
        resolution=args.resolution,
        seed=args.seed,
        source=args.train_data_dir,
        train_text_encoder=args.train_text_encoder,
    )
    print(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    report_user_errors("python -m pogdiff.pretrain", main)
