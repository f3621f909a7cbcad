"""A tiny, deterministic, offline Stable Diffusion and a tiny imbalanced dataset.

Nothing here downloads anything. `build_tiny_sd` builds every component of a Stable Diffusion 1.x pipeline
from configs (UNet, VAE, CLIP text encoder, a CLIP tokenizer over a vocabulary this module writes, a DDPM
scheduler with the SD1.5 beta schedule) and saves it with `save_pretrained` in the diffusers layout. A test
then passes that folder as `--pretrained_model_name_or_path`, which is exactly the code path a Hub id takes.

The weights are random: images decoded by this VAE mean nothing and the text encoder knows no language. That
is fine for tests of code paths. A demo that judges images must first pretrain the tiny model (see
`examples/`), and should say so.

Command line (builds the model and, with ``--prompt``, samples one image with diffusers'
`StableDiffusionPipeline` and a `DDIMScheduler` made from the model's scheduler config, 50 steps by default:
the sampler `PoGDiffPipeline` uses)::

    python -m pogdiff.testing --output_dir outputs/tiny-sd --prompt "An image of Lukas."
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Pixel resolution the tiny model is built for. The VAE downsamples 2x, so latents are 16x16x4: small
# enough for 2 CPU cores, large enough for the UNet's one downsampling stage.
TINY_RESOLUTION = 32

# Identities of the tiny dataset: two majority (6 images) and two minority (2 images), so that both
# PoGDiff's psi (rare prompts weigh more) and the few-shot split have something to act on.
TINY_DATASET_COUNTS: dict[str, int] = {"alice": 6, "bruno": 6, "chen": 2, "dara": 2}

_BASE_COLOURS = {
    "alice": (220, 40, 40),
    "bruno": (40, 180, 60),
    "chen": (40, 70, 220),
    "dara": (230, 200, 30),
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode table (the alphabet of its byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    shift = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + shift)
            shift += 1
    return dict(zip(printable, [chr(c) for c in codes]))


def write_tiny_clip_vocab(folder: str | os.PathLike) -> Path:
    """Write a character-level CLIP BPE vocabulary (`vocab.json`, `merges.txt`) into `folder`.

    Every byte symbol appears alone and with CLIP's end-of-word marker, so any text tokenizes (one token per
    character) and no merges are needed. 514 tokens in all, including the start/end tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def sd15_noise_scheduler():
    """Stable Diffusion 1.5's training schedule (DDPM, scaled-linear betas), so code sees SD's alphas."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def tiny_sd_components(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Build the components of a tiny Stable Diffusion pipeline, deterministically from `seed`.

    Returns the keyword arguments of `StableDiffusionPipeline` (safety checker and feature extractor None).
    The tokenizer needs a folder for its vocabulary files; a temporary one is used when none is given.
    """
    import tempfile

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if tokenizer_dir is None:
        tokenizer_dir = tempfile.mkdtemp(prefix="pogdiff-tok-")
    write_tiny_clip_vocab(tokenizer_dir)
    # transformers 5 builds a working CLIP tokenizer only through from_pretrained(folder); handing the file
    # paths to the constructor silently yields a two-token vocabulary.
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.model_max_length = 77

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": sd15_noise_scheduler(),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def build_tiny_sd(output_dir: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny Stable Diffusion in the diffusers layout and return the folder path.

    `StableDiffusionPipeline.from_pretrained(folder)` then loads it as it would a Hub id. The folder is
    rebuilt each call (the build is deterministic, so the content is the same for the same seed).
    """
    import tempfile

    from diffusers import StableDiffusionPipeline

    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="pogdiff-tok-") as tok_dir:
        pipe = StableDiffusionPipeline(**tiny_sd_components(seed=seed, tokenizer_dir=tok_dir))
        pipe.save_pretrained(output_dir, safe_serialization=True)
    return str(output_dir)


def tiny_sdxl_components(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """The components of a tiny Stable Diffusion XL pipeline, deterministically from `seed`: what SDXL has that SD
    has not, at the tiny model's size.

    Two text encoders (`CLIPTextModel` and `CLIPTextModelWithProjection`, hidden size 32 each: the UNet attends
    to their concatenated penultimate states, 64 wide) with two tokenizers, a UNet with SDXL's added conditioning
    (`addition_embed_type="text_time"`: the second encoder's 32-wide pooled projection plus six time ids embedded
    in 8 dims each, 80 inputs), and a VAE with SDXL's scaling factor. The first encoder, the VAE and the UNet's
    layout are the tiny SD's. Keyword arguments of `StableDiffusionXLPipeline`.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    sd = tiny_sd_components(seed=seed, tokenizer_dir=tokenizer_dir)
    tokenizer = sd["tokenizer"]
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**{**sd["text_encoder"].config.to_dict(), "projection_dim": 32})
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**{**dict(sd["vae"].config), "scaling_factor": 0.13025, "force_upcast": True})
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        **{
            **dict(sd["unet"].config),
            "cross_attention_dim": 64,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
        }
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": sd["text_encoder"],
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": sd["scheduler"],
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def build_tiny_sdxl(output_dir: str | os.PathLike, seed: int = 0) -> str:
    """Save a tiny Stable Diffusion XL in the diffusers layout (`StableDiffusionXLPipeline`) and return the folder."""
    import tempfile

    from diffusers import StableDiffusionXLPipeline

    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="pogdiff-tok-") as tok_dir:
        pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=seed, tokenizer_dir=tok_dir))
        pipe.save_pretrained(output_dir, safe_serialization=True)
    return str(output_dir)


def _identity_image(identity: str, index: int, size: int, rng: np.random.Generator) -> Image.Image:
    """A small image whose colour and shape say which identity it is, with per-image variation."""
    base = np.array(
        _BASE_COLOURS.get(identity, tuple(int(c) for c in rng.integers(0, 256, 3))), dtype=np.float64
    )
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    img = np.empty((size, size, 3), dtype=np.float64)
    shade = 0.6 + 0.4 * (xx if index % 2 == 0 else yy)
    for c in range(3):
        img[..., c] = base[c] * shade
    # A square whose position varies with the image index: same identity, different "pose".
    s = size // 4
    off = (index * 3) % (size - s)
    img[off : off + s, off : off + s] = 255 - base
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def write_tiny_dataset(
    output_dir: str | os.PathLike,
    counts: dict[str, int] | None = None,
    resolution: int = TINY_RESOLUTION,
    seed: int = 0,
    caption_template: str = "An image of {name}.",
) -> str:
    """Write a tiny imbalanced `imagefolder` dataset and return its path.

    One PNG per image and a `metadata.jsonl` with `file_name`, `text` and `identity` (the layout
    `datasets.load_dataset("imagefolder", data_dir=...)` reads). Default: two identities with 6 images and
    two with 2 (`TINY_DATASET_COUNTS`).
    """
    counts = dict(TINY_DATASET_COUNTS if counts is None else counts)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for identity, n in counts.items():
        for i in range(n):
            file_name = f"{identity}_{i:03d}.png"
            _identity_image(identity, i, resolution, rng).save(output_dir / file_name)
            rows.append(
                {"file_name": file_name, "text": caption_template.format(name=identity), "identity": identity}
            )
    with open(output_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the tiny offline Stable Diffusion (random weights).")
    parser.add_argument("--output_dir", default="outputs/tiny-sd", help="Where to save the diffusers folder.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_dir", default=None, help="Also write the tiny imbalanced dataset here.")
    parser.add_argument(
        "--prompt",
        default=None,
        help="Also sample one image from the built model (DDIM, as PoGDiffPipeline samples); saved as sample.png.",
    )
    parser.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps for --prompt.")
    args = parser.parse_args(argv)

    path = build_tiny_sd(args.output_dir, seed=args.seed)
    print(f"Tiny Stable Diffusion saved to {path} (random weights: images mean nothing).")
    if args.dataset_dir:
        print(f"Tiny imbalanced dataset written to {write_tiny_dataset(args.dataset_dir, seed=args.seed)}")
    if args.prompt:
        image_path = sample_image(path, args.prompt, args.num_inference_steps, seed=args.seed)
        print(f"StableDiffusionPipeline (DDIMScheduler, {args.num_inference_steps} steps) -> {image_path}")


def sample_image(
    model_dir: str | os.PathLike, prompt: str, num_inference_steps: int = 50, seed: int = 0
) -> Path:
    """Sample one image from the diffusers folder `model_dir` and save it there as `sample.png`.

    Plain diffusers: `StableDiffusionPipeline` with its scheduler swapped for a `DDIMScheduler` built from the
    shipped config, which is what `PoGDiffPipeline` (pipeline_pogdiff.py, a root-level script that this package
    does not import) does for a full model.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=False)
    image = pipe(
        prompt, num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed)
    ).images[0]
    out = Path(model_dir) / "sample.png"
    image.save(out)
    return out


def run_process_group(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True, ...)` that cannot outlive `timeout`.

    A launcher (torchrun, accelerate launch) starts worker processes that inherit its stdout and stderr; on a
    timeout, `subprocess.run` kills only the launcher and then waits for pipes that the workers still hold open,
    which can be forever. Here the command runs in its own session and the whole process group is killed, so a
    hung multi-process run fails the test with its output instead of hanging the suite.
    """
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    finally:
        # Workers a launcher left behind after it exited (never expected, but never left running either).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


if __name__ == "__main__":
    main()
