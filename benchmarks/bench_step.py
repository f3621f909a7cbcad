"""Training-step time and memory of vanilla, PoGDiff, CBDM and T2H, through the trainer's own code path.

`train_step` below is the loop body of `train_pogdiff.py`: the trainer's own `noised_batch` (VAE encode -> noise
-> timesteps -> add_noise -> text encode -> target) and `objective_step` (the objective's draws, forwards and
loss) from `pogdiff/training.py`, then backward -> clip -> AdamW step. Only accelerate's thin wrappers are written out: the mixed-precision
forward (autocast + fp32 outputs, what `accelerator.prepare` does to the UNet), `loss.backward()` and
`torch.nn.utils.clip_grad_norm_`. The methods run interleaved in one process (A B C D A B C D ...) after a
warm-up, each on its own copy of the UNet with its own optimizer, so that slow drift of a shared machine (other
jobs, clocks, caches) hits every method alike. Each round feeds the same batch and seed to every method.

The PoGDiff neighbour term is skipped (no extra forward) for rows with psi == 0 or a neighbour with the sample's
own caption. `--skippable_fraction F` builds a synthetic index in which a fraction F of each batch are rows whose k
neighbours all share their caption (as in datasets captioned "An image of {name}."), so exactly round(F * B) rows
per batch skip the neighbour forward.

    python benchmarks/bench_step.py --preset tiny --batch_size 8 --steps 30 --output_dir outputs/bench
    python benchmarks/bench_step.py --preset sd15 --batch_size 8 --steps 20 --output_dir outputs/bench  # GPU

Writes `bench_step.json` and `bench_step.md` (table, machine, versions, command line) into `--output_dir`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

# Run as `python benchmarks/bench_step.py`, Python puts benchmarks/ (not the repository root) on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from pogdiff.families import SDTextEncoders, cat_conditioning  # noqa: E402
from pogdiff.index import PoGDiffIndex  # noqa: E402
from pogdiff.objectives import OBJECTIVES  # noqa: E402
from pogdiff.psi import PsiParams  # noqa: E402
from pogdiff.seeds import derive_seed  # noqa: E402
from pogdiff.testing import sd15_noise_scheduler  # noqa: E402
from pogdiff.training import (  # noqa: E402
    NEIGHBOR_FORWARD_MODES,
    CaptionStates,
    ObjectiveSettings,
    encode_latent_parameters,
    fused_adamw_kwargs,
    make_neighbor_forward,
    noised_batch,
    objective_step,
)

GIB = 2**30

# Not an objective: diffusers' own train_text_to_image.py step, written out as it is there (see
# `reference_train_step`), to check that the trainer's vanilla step is no slower than the script it mirrors.
REFERENCE = "diffusers"
# PoGDiff with `--neighbor_forward eager` next to PoGDiff with the --neighbor_forward chosen, in the same run.
POGDIFF_EAGER = "pogdiff-eager"


def known_methods() -> tuple[str, ...]:
    """What --methods accepts: the reference, every registered objective (`pogdiff.objectives.OBJECTIVES`), and
    PoGDiff's eager neighbour forward."""
    return (REFERENCE, *OBJECTIVES, POGDIFF_EAGER)


@dataclass(frozen=True)
class Preset:
    """Model size, default resolution, precision, device and CPU threads of a benchmark preset."""

    resolution: int
    mixed_precision: str
    device: str
    description: str
    threads: int | None  # None: torch's default


PRESETS: dict[str, Preset] = {
    # One thread: the tiny model's ops are too small to gain from more, and on a shared machine an OpenMP
    # region waits for its slowest thread, so one descheduled thread stalls the step (seen: 0.1 s -> 8 s).
    "tiny": Preset(
        32, "no", "cpu", "pogdiff.testing.tiny_sd_components (the test model), 16x16x4 latents", threads=1
    ),
    "sd15": Preset(
        512, "bf16", "cuda", "Stable Diffusion 1.5-sized UNet / VAE / CLIP-L text encoder, random init", None
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Models and data


def sd15_components(seed: int = 0, special_token_ids=None) -> dict:
    """SD1.5-sized UNet, VAE, text encoder and scheduler built from configs with random weights (no download).

    The sizes are Stable Diffusion 1.5's (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M parameters), so
    step time and memory match a real SD1.5 fine-tune; the weights are random, which does not change either.
    `special_token_ids`: a tokenizer whose bos / eos / pad ids the text encoder gets instead of CLIP's (the
    text encoder pools at the eos token, so it must be the tokenizer's own).
    """
    bos, eos, pad = 49406, 49407, 49407
    if special_token_ids is not None:
        tok = special_token_ids
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    torch.manual_seed(seed + 2)
    # UNet2DConditionModel's defaults are SD1.5's layout apart from the cross-attention width (CLIP-L: 768).
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": sd15_noise_scheduler()}


def preset_components(preset: str, seed: int = 0) -> dict:
    """unet, vae, text_encoder, scheduler of a preset (CPU, float32)."""
    if preset == "tiny":
        from pogdiff.testing import tiny_sd_components

        return tiny_sd_components(seed)
    if preset == "sd15":
        return sd15_components(seed)
    raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}.")


def synthetic_index(
    pool_size: int, k: int = 5, seed: int = 0
) -> tuple[PoGDiffIndex, torch.Tensor, torch.Tensor]:
    """A PoGDiff index with two pools of rows: `skippable` and `active`.

    Skippable rows come in identity groups of k + 1 rows sharing one caption, each row's k neighbours being the
    rest of its group: whichever neighbour is drawn has the same caption, so the neighbour forward is skipped.
    Active rows each have their own identity and caption, and k neighbours among the other active rows: psi > 0
    (similarities in [0.3, 0.9], inverse-density weights 1) and a forward is needed. ELBOs (T2H's density) are
    standard normal.

    Returns:
        `(index, skippable_rows, active_rows)`, each pool of at least `pool_size` rows.
    """
    generator = torch.Generator().manual_seed(seed)
    groups = math.ceil(pool_size / (k + 1))
    num_skippable = groups * (k + 1)
    num_active = max(pool_size, k + 1)
    n = num_skippable + num_active

    group_of = torch.arange(num_skippable) // (k + 1)
    member = torch.arange(num_skippable) % (k + 1)
    # Neighbours of a group member: the k other members, in order.
    others = (member[:, None] + torch.arange(1, k + 1)[None, :]) % (k + 1)
    skippable_neighbors = group_of[:, None] * (k + 1) + others

    # Neighbours of an active row: k distinct other active rows.
    offsets = torch.stack(
        [torch.randperm(num_active - 1, generator=generator)[:k] + 1 for _ in range(num_active)]
    )
    active_neighbors = num_skippable + (torch.arange(num_active)[:, None] + offsets) % num_active

    sims = torch.rand((n, k), generator=generator) * 0.6 + 0.3
    identity_ids = torch.cat([group_of, groups + torch.arange(num_active)])
    index = PoGDiffIndex(
        neighbor_ids=torch.cat([skippable_neighbors, active_neighbors]),
        neighbor_sims=sims.sort(dim=1, descending=True).values,
        identity_ids=identity_ids,
        identity_names=[f"identity-{i}" for i in range(int(identity_ids.max()) + 1)],
        text_ids=identity_ids.clone(),
        txt_log_weights=torch.zeros(n),
        elbo=torch.randn(n, generator=generator),
        config={"synthetic": True, "num_neighbors": k},
    )
    return index, torch.arange(num_skippable), num_skippable + torch.arange(num_active)


def row_pixels(row: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """(3, resolution, resolution) uniform noise in [-1, 1], the same for a row every time it is drawn."""
    return (
        torch.rand((3, resolution, resolution), generator=torch.Generator().manual_seed(seed + row)) * 2 - 1
    )


def batch_rows(
    skippable: torch.Tensor,
    active: torch.Tensor,
    batch_size: int,
    skippable_fraction: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """round(F * B) distinct rows from the skippable pool and the rest from the active pool, shuffled."""
    num_skip = round(skippable_fraction * batch_size)
    rows = torch.cat(
        [
            skippable[torch.randperm(len(skippable), generator=generator)[:num_skip]],
            active[torch.randperm(len(active), generator=generator)[: batch_size - num_skip]],
        ]
    )
    return rows[torch.randperm(batch_size, generator=generator)]


# ----------------------------------------------------------------------------------------------------------
# One training step


class MixedPrecisionForward:
    """What `accelerator.prepare` does to a model's forward under --mixed_precision: autocast, fp32 outputs."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype, device_type: str) -> None:
        self.module, self.dtype, self.device_type = module, dtype, device_type

    def __call__(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            outputs = self.module(*args, **kwargs)
        return tuple(o.float() if o.dtype in (torch.float16, torch.bfloat16) else o for o in outputs)


@dataclass
class Shared:
    """Frozen models and data every method reads."""

    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object
    index: PoGDiffIndex
    all_input_ids: torch.Tensor  # (N, 77) token ids of every row's caption
    weight_dtype: torch.dtype
    device: torch.device
    latent_cache: torch.Tensor | None = None  # --cache_latents: (N, 2C, h, w) VAE distribution parameters
    text_cache: object | None = None  # --cache_latents: the captions' `families.Conditioning`
    max_grad_norm: float = 1.0
    captions: CaptionStates | None = None  # the rows' caption states, as the trainer builds them
    psi: PsiParams = PsiParams()
    noise_offset: float = 0.0


@dataclass
class Method:
    """One objective with its own UNet copy, optimizer and LR scheduler."""

    name: str  # the row of the report: an objective, `diffusers` or `pogdiff-eager`
    objective: str
    unet: torch.nn.Module
    forward: object  # the UNet's (mixed-precision) forward, as the trainer calls it
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    neighbor_forward: object = None  # PoGDiff: `make_neighbor_forward`'s callable (None: eager)
    uses_neighbors: bool = False  # the objective draws neighbours (the reference is upstream's step: no)


def optimizer_step(shared: Shared, method: Method, loss: torch.Tensor) -> None:
    """backward -> clip -> AdamW step -> LR scheduler step -> zero_grad, as both training loops end."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(method.params, shared.max_grad_norm)
    method.optimizer.step()
    method.lr_scheduler.step()
    method.optimizer.zero_grad()


def train_step(shared: Shared, method: Method, batch: dict, step_seed: int) -> dict[str, float]:
    """The loop body of `train_pogdiff.py` for one batch (no gradient accumulation, EMA or logging): the trainer's
    own `noised_batch` and `objective_step`, then the optimizer step.

    `batch` holds `index` (B,) dataset rows, `input_ids` (B, 77) and, without caches, `pixel_values`
    (B, 3, H, W) on the device. Returns the objective's logs plus `loss`.
    """
    cpu_generator = torch.Generator().manual_seed(derive_seed(step_seed, 1))  # keyed apart, as in the trainer
    generator = torch.Generator(device=shared.device).manual_seed(step_seed)
    inputs = noised_batch(
        batch,
        vae=shared.vae,
        noise_scheduler=shared.noise_scheduler,
        captions=shared.captions,
        generator=generator,
        cpu_generator=cpu_generator,
        weight_dtype=shared.weight_dtype,
        latent_cache=shared.latent_cache,
        noise_offset=shared.noise_offset,
    )
    loss, means = objective_step(
        ObjectiveSettings(method.objective, shared.psi),
        method.forward,
        inputs,
        noise_scheduler=shared.noise_scheduler,
        captions=shared.captions,
        generator=cpu_generator,
        index=shared.index,
        num_rows=len(shared.index),
        neighbor_forward=method.neighbor_forward,
    )
    # The trainer reads the loss every step (logging and its finiteness check): the same host sync here.
    logs = {**means.pop(), "loss": loss.detach().item()}
    if not math.isfinite(logs["loss"]):
        raise RuntimeError(f"Non-finite loss {logs['loss']} for {method.objective}.")

    optimizer_step(shared, method, loss)
    return logs


def reference_train_step(shared: Shared, method: Method, batch: dict, step_seed: int) -> dict[str, float]:
    """The loop body of diffusers' examples/text_to_image/train_text_to_image.py, as written there.

    Global RNG draws (`latent_dist.sample()`, `randn_like`, `randint`), the MSE in float32, the loss read
    on the host every step (upstream: `accelerator.gather(...).mean().item()`), backward, clipping, a
    torch.optim.AdamW step with torch's default implementation, LR scheduler step, `zero_grad`.
    """
    torch.manual_seed(step_seed)  # the same draws in every round, as the other methods get
    scheduler = shared.noise_scheduler
    latents = shared.vae.encode(batch["pixel_values"].to(shared.weight_dtype)).latent_dist.sample()
    latents = latents * shared.vae.config.scaling_factor
    noise = torch.randn_like(latents)
    if shared.noise_offset:
        noise += shared.noise_offset * torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1), device=latents.device
        )
    bsz = latents.shape[0]
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
    timesteps = timesteps.long()
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = shared.text_encoder(batch["input_ids"].to(shared.device), return_dict=False)[0]
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    model_pred = method.forward(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
    logs = {"loss": loss.detach().item()}
    optimizer_step(shared, method, loss)
    return logs


# ----------------------------------------------------------------------------------------------------------
# Benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="Pixels (default: the preset's).")
    parser.add_argument("--lora", action="store_true", help="Train LoRA adapters as --use_lora does.")
    parser.add_argument(
        "--cache_latents",
        action="store_true",
        help="As the trainer's flag: VAE latent distributions and caption states computed once, not per step.",
    )
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank, as the trainer).")
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per method.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps per method first.")
    parser.add_argument(
        "--skippable_fraction",
        type=float,
        default=0.0,
        help="Fraction of each batch whose PoGDiff neighbour forward is skipped (same-caption neighbours).",
    )
    parser.add_argument(
        "--methods",
        default=",".join(OBJECTIVES),
        help=f"Comma-separated subset of {', '.join(known_methods())}; '{REFERENCE}' is diffusers' own "
        "train_text_to_image.py step, for reference.",
    )
    parser.add_argument(
        "--neighbor_forward",
        choices=NEIGHBOR_FORWARD_MODES,
        default="auto",
        help="PoGDiff's neighbour forward, as the trainer's flag (auto: a CUDA graph on CUDA).",
    )
    parser.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile every UNet, as `accelerate launch --dynamo_backend inductor` does in the trainer.",
    )
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default=None, help="Default: preset's.")
    parser.add_argument(
        "--device", default=None, help="Default: cuda for sd15 (cpu without a GPU), cpu for tiny."
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: preset's)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None, help="Where to write bench_step.md / .json.")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known_methods()]
    if unknown or not methods:
        parser.error(
            f"--methods takes a comma-separated subset of {', '.join(known_methods())}, got {args.methods!r}."
        )
    if REFERENCE in methods and args.cache_latents:
        parser.error(
            f"--methods {REFERENCE} (train_text_to_image.py) has no latent cache; drop --cache_latents."
        )
    args.methods = methods
    if not 0.0 <= args.skippable_fraction <= 1.0:
        parser.error(f"--skippable_fraction must lie in [0, 1], got {args.skippable_fraction}.")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch_size must be >= 1 and --warmup >= 0.")
    preset = PRESETS[args.preset]
    args.resolution = args.resolution or preset.resolution
    args.threads = args.threads or preset.threads
    args.mixed_precision = args.mixed_precision or preset.mixed_precision
    args.device = args.device or (
        preset.device if preset.device != "cuda" or torch.cuda.is_available() else "cpu"
    )
    return args


def machine_info(device: torch.device) -> dict:
    """CPU model, core count, GPU name, library versions: what a reader needs to compare numbers."""
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size (VmHWM), or None where /proc is unavailable."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _tensor_bytes(
        v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


def build_method(
    name: str,
    base_unet: torch.nn.Module,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
) -> Method:
    """A fresh UNet copy set up as the trainer does (full fine-tune or LoRA), with AdamW and a constant LR."""
    objective = "pogdiff" if name == POGDIFF_EAGER else name
    from diffusers.optimization import get_scheduler

    unet = copy.deepcopy(base_unet)
    unet.train()
    if args.lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device, dtype=dtype)
        # Same adapter init for every method: peft's gaussian init draws from the global RNG.
        torch.manual_seed(args.seed)
        unet.add_adapter(
            LoraConfig(
                r=args.rank,
                lora_alpha=args.rank,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
    else:
        unet.to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    # The trainer's optimizer (fused on CUDA); the reference keeps train_text_to_image.py's plain AdamW.
    extra = {} if name == REFERENCE else fused_adamw_kwargs(device)
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, **extra)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    model = torch.compile(unet) if args.torch_compile else unet
    forward = model if dtype == torch.float32 else MixedPrecisionForward(model, dtype, device.type)
    neighbor_forward = None
    # The reference is upstream's step, not a registered objective.
    uses_neighbors = name != REFERENCE and OBJECTIVES[objective].uses_neighbors
    if name != POGDIFF_EAGER and uses_neighbors:
        # As the trainer: compiled models keep the eager neighbour forward.
        mode = "eager" if args.torch_compile else args.neighbor_forward
        neighbor_forward = make_neighbor_forward(forward, device, mode)
    return Method(
        name, objective, unet, forward, params, optimizer, lr_scheduler, neighbor_forward, uses_neighbors
    )


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def num_threads(threads: int | None):
    """torch.set_num_threads(threads) inside the block (None: unchanged), restored after it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Build everything, run warm-up and timed rounds, return the results dict (also written as JSON).

    Runs with the current torch thread count; `main` sets `--threads`.
    """
    device = torch.device(args.device)
    info = machine_info(device)
    dtype = {"no": torch.float32, "bf16": torch.bfloat16}[args.mixed_precision]
    components = preset_components(args.preset, args.seed)
    vae, text_encoder, scheduler = components["vae"], components["text_encoder"], components["scheduler"]
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae.to(device, dtype=dtype)
    text_encoder.to(device, dtype=dtype)

    index, skippable, active = synthetic_index(max(4 * args.batch_size, 64), k=5, seed=args.seed)
    num_texts = int(index.text_ids.max()) + 1
    token_table = torch.randint(
        0, text_encoder.config.vocab_size, (num_texts, 77), generator=torch.Generator().manual_seed(args.seed)
    )
    shared = Shared(
        vae=vae,
        text_encoder=text_encoder,
        noise_scheduler=scheduler,
        index=index,
        all_input_ids=token_table[index.text_ids],
        weight_dtype=dtype,
        device=device,
    )
    if args.cache_latents:
        shared.latent_cache = encode_latent_parameters(
            vae, lambda i: row_pixels(i, args.resolution, args.seed), len(index), show_progress=True
        )
    # The SD family's text encoding, as the trainer does it (the tokens are drawn at random: no tokenizer).
    text_encoders = SDTextEncoders([], [text_encoder])
    if args.cache_latents:
        with torch.no_grad():
            shared.text_cache = cat_conditioning(
                [text_encoders.encode(ids.to(device)) for ids in token_table.split(64)]
            )
    # The trainer's caption lookup: distinct captions' tokens, each row's caption id, optionally the cache.
    shared.captions = CaptionStates(
        text_encoders, token_table, index.text_ids, None, device, shared.text_cache
    )
    methods = [build_method(m, components["unet"], args, device, dtype) for m in args.methods]
    del components
    shared_bytes = _tensor_bytes(list(vae.parameters()) + list(text_encoder.parameters()))

    rounds = args.warmup + args.steps
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu_times: dict[str, list[float]] = {m.name: [] for m in methods}
    transient: dict[str, int] = {m.name: 0 for m in methods}
    skipped: dict[str, list[float]] = {m.name: [] for m in methods}
    progress = tqdm(total=rounds * len(methods), desc=f"bench_step {args.preset}", unit="step")
    for step in range(rounds):
        step_seed = derive_seed(args.seed, step)
        rows = batch_rows(
            skippable,
            active,
            args.batch_size,
            args.skippable_fraction,
            torch.Generator().manual_seed(step_seed),
        )
        batch = {"input_ids": shared.all_input_ids[rows], "index": rows}
        if not args.cache_latents:
            pixels = torch.stack([row_pixels(int(i), args.resolution, args.seed) for i in rows])
            batch["pixel_values"] = pixels.to(device)
        for method in methods:
            _synchronize(device)
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step_fn = reference_train_step if method.name == REFERENCE else train_step
            logs = step_fn(shared, method, batch, step_seed)
            _synchronize(device)
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times[method.name].append(elapsed)
                cpu_times[method.name].append(time.process_time() - cpu_start)
                if "frac_skipped" in logs:
                    skipped[method.name].append(logs["frac_skipped"])
                # From the second step on: the first one also allocates the optimizer state, counted apart.
                if device.type == "cuda" and step >= 1:
                    peak = torch.cuda.max_memory_allocated(device) - base
                    transient[method.name] = max(transient[method.name], peak)
            progress.update(1)
            progress.set_postfix(method=method.name, ms=f"{elapsed * 1e3:.0f}")
    progress.close()

    results = {}
    for method in methods:
        name = method.name
        ms = sorted(t * 1e3 for t in times[name])
        median = statistics.median(ms)
        vanilla_ms = statistics.median(t * 1e3 for t in times["vanilla"]) if "vanilla" in times else None
        entry = {
            "median_ms": median,
            "p25_ms": ms[len(ms) // 4],
            "p75_ms": ms[(3 * len(ms)) // 4],
            "images_per_s": args.batch_size / (median / 1e3),
            # CPU seconds of all threads: less sensitive than wall time to other jobs on a shared machine.
            "median_cpu_ms": statistics.median(cpu_times[name]) * 1e3,
            "ratio_to_vanilla": median / vanilla_ms if vanilla_ms else None,
            "frac_skipped": statistics.mean(skipped[name]) if skipped[name] else None,
            "peak_gib": None,
            "step_transient_gib": None,
        }
        if method.uses_neighbors:
            nf = method.neighbor_forward
            entry["neighbor_forward"] = (
                "eager" if nf is None else "eager (CUDA graph capture failed)" if nf.failed else "cuda_graph"
            )
        if device.type == "cuda" and transient[name]:
            resident = _tensor_bytes(method.unet.parameters()) + optimizer_state_bytes(method.optimizer)
            # A CUDA graph's memory pool stays reserved between steps: count it as the method's own.
            graph_bytes = getattr(method.neighbor_forward, "reserved_bytes", 0)
            entry["graph_pool_gib"] = graph_bytes / GIB
            resident += graph_bytes
            # What this method alone would hold: frozen VAE + text encoder, its UNet and optimizer state, and
            # the largest step-time growth (activations, gradients) seen in its own timing windows.
            entry["peak_gib"] = (shared_bytes + resident + transient[name]) / GIB
            entry["step_transient_gib"] = transient[name] / GIB
        results[name] = entry

    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    rss = peak_rss_bytes()
    return {
        "command": "python benchmarks/bench_step.py " + shlex.join(args.argv),
        "machine": info,
        "config": {
            "preset": args.preset,
            "preset_description": PRESETS[args.preset].description,
            "device": str(device),
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "mixed_precision": args.mixed_precision,
            "lora": args.lora,
            "cache_latents": args.cache_latents,
            "steps": args.steps,
            "warmup": args.warmup,
            "skippable_fraction": args.skippable_fraction,
            "methods": args.methods,
            "torch_compile": args.torch_compile,
            "neighbor_forward": args.neighbor_forward,
        },
        "process_peak_rss_gib": rss / GIB if rss is not None else None,
        "results": results,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_report(result: dict) -> str:
    """The results as a markdown table with the machine, versions and command line."""
    cfg, info = result["config"], result["machine"]
    lines = [
        f"# bench_step: {cfg['preset']} ({cfg['resolution']} px, batch {cfg['batch_size']}, "
        f"{'LoRA' if cfg['lora'] else 'full fine-tune'}{', cached latents' if cfg['cache_latents'] else ''}, "
        f"mixed precision {cfg['mixed_precision']}{', torch.compile' if cfg.get('torch_compile') else ''}, "
        f"{cfg['device']})",
        "",
        f"`{result['command']}`",
        "",
        f"- machine: {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
        + (f", GPU {info['gpu']}" if info["gpu"] else "")
        + (f"; load average {info.get('load_average_at_start')} -> {info.get('load_average_at_end')}"),
        f"- torch {info['torch']}, diffusers {info['diffusers']}, transformers {info['transformers']}",
        f"- {cfg['warmup']} warm-up + {cfg['steps']} timed steps per method, interleaved; "
        f"PoGDiff skippable fraction {cfg['skippable_fraction']}",
        "",
        "| method | median ms/step | p25-p75 ms | images/s | x vanilla | CPU ms/step | neighbour rows skipped "
        "| peak GiB (alone) | step transient GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["results"].items():
        lines.append(
            f"| {name} | {r['median_ms']:.1f} | {r['p25_ms']:.1f}-{r['p75_ms']:.1f} | {r['images_per_s']:.2f} | "
            f"{_fmt(r['ratio_to_vanilla'], '.3f')} | {r['median_cpu_ms']:.0f} | {_fmt(r['frac_skipped'], '.2f')} | "
            f"{_fmt(r['peak_gib'], '.2f')} | {_fmt(r['step_transient_gib'], '.2f')} |"
        )
    lines.append("")
    results = result["results"]
    if REFERENCE in results and "vanilla" in results:
        lines.append(
            f"The trainer's vanilla step takes {results['vanilla']['median_ms'] / results[REFERENCE]['median_ms']:.3f}x "
            f"the time of diffusers' train_text_to_image.py step (`{REFERENCE}` row) in this run."
        )
        lines.append("")
    if cfg["device"].startswith("cuda"):
        lines.append(
            "Peak (alone) = frozen VAE + text encoder + the method's UNet and optimizer state (+ for PoGDiff "
            "the CUDA memory reserved while capturing its neighbour-forward graph) + the largest growth of "
            "`torch.cuda.max_memory_allocated` within its own steps."
        )
    else:
        rss = result["process_peak_rss_gib"]
        lines.append(
            "Per-method peak memory: n/a on CPU (no per-step allocator statistics; the methods share one "
            f"process). Peak RSS of the whole process: {_fmt(rss, '.2f')} GiB."
        )
    return "\n".join(lines) + "\n"


def publish(result: dict, report: str, output_dir: str | None, name: str) -> None:
    """Print the markdown report; with an output dir, also write `{name}.md` and `{name}.json` there."""
    print(report)
    if output_dir:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        (out / f"{name}.md").write_text(report, encoding="utf-8")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # The neighbour forward's CUDA-graph capture reports its check (graph vs eager) at INFO.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pogdiff").setLevel(logging.INFO)
    with num_threads(args.threads):
        result = run_benchmark(args)
    publish(result, markdown_report(result), args.output_dir, "bench_step")
    return result


if __name__ == "__main__":
    main()
