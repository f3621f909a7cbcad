"""The command-line flags PoGDiff adds to diffusers' `train_text_to_image.py`, declared once.

`train_pogdiff.py` declares upstream's flags in upstream's order and then calls `add_pogdiff_arguments`: every
flag that is not upstream's sits in that one group at the end of `--help`, and `check_pogdiff_args` validates
them. `python -m pogdiff.index` reuses the index part (`add_index_arguments`: neighbours, psi, text density),
and `checkpointing.run_settings` reads the same declarations to know which flags change a run's result.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from .errors import UserError
from .psi import PSI_TERMS, PsiParams
from .sampling import SAMPLING_SCHEMES, sampling_power
from .training import NEIGHBOR_FORWARD_MODES, OBJECTIVES

# The text-density VAE's flags, passed to `index.build_or_load_index` under the same names.
DENSITY_FLAGS = (
    "density_latent_dim",
    "density_hidden_dim",
    "density_epochs",
    "density_lr",
    "density_num_samples",
    "density_temperature",
    "density_w_min",
    "density_w_max",
)


def _float_or_none(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def _non_negative_float(value: str) -> float:
    """A finite float >= 0 (argparse names the flag when this raises)."""
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value!r}")
    return number


def add_index_arguments(parser) -> None:
    """The neighbour, psi and text-density flags, shared by `train_pogdiff.py` and `python -m pogdiff.index`.

    `parser` is an `argparse.ArgumentParser` or argument group.
    """
    parser.add_argument(
        "--neighbor_encoder",
        type=str,
        default="facebook/dinov2-base",
        help="Image encoder that decides neighbours: an HF id, 'vae' (the base model's VAE, no download), "
        "'face' (dlib), 'pixels' (tests) or 'module:function'.",
    )
    parser.add_argument(
        "--num_neighbors",
        type=int,
        default=5,
        help="k: neighbours per image, by image-embedding cosine (Eq. 8).",
    )
    parser.add_argument(
        "--psi_a1", type=float, default=1.0, help="a1 of Eq. 9: exponent of s for the same identity."
    )
    parser.add_argument(
        "--psi_a2", type=float, default=1.0, help="a2 of Eq. 9: extra exponent of s when identities differ."
    )
    parser.add_argument(
        "--psi_a3", type=float, default=1.0, help="a3 of Eq. 11-12: divides psi (overall scale)."
    )
    parser.add_argument(
        "--psi_terms",
        type=str,
        default="img,txt",
        choices=PSI_TERMS,
        # The choices contain commas, so argparse's `{img,txt,txt,img,...}` would be unreadable.
        metavar="TERMS",
        help="Factors of psi (paper Table 6 ablation): 'img,txt' (both; 'txt,img' is the same), 'img' (image "
        "similarity only), 'txt' (inverse text density only) or 'none' (= vanilla).",
    )
    parser.add_argument(
        "--density_latent_dim", type=int, default=16, help="Latent size of the text-density VAE."
    )
    parser.add_argument(
        "--density_hidden_dim", type=int, default=256, help="Hidden size of the text-density VAE."
    )
    parser.add_argument(
        "--density_epochs", type=int, default=200, help="Training epochs of the text-density VAE."
    )
    parser.add_argument(
        "--density_lr", type=float, default=1e-3, help="Learning rate of the text-density VAE."
    )
    parser.add_argument(
        "--density_num_samples",
        type=int,
        default=16,
        help="Posterior draws per ELBO estimate (>= 16 advised).",
    )
    parser.add_argument(
        "--density_temperature", type=float, default=1.0, help="T in log w = -ELBO/T - logmeanexp(-ELBO/T)."
    )
    parser.add_argument(
        "--density_w_min",
        type=_float_or_none,
        default=0.1,
        help="Lower clip of the inverse-density weights ('none': no clipping).",
    )
    parser.add_argument(
        "--density_w_max",
        type=_float_or_none,
        default=10.0,
        help="Upper clip of the inverse-density weights ('none': no clipping).",
    )
    parser.add_argument(
        "--few_shot_max",
        type=int,
        default=2,
        help="Identities with at most this many images count as minority (few-shot).",
    )


def show_defaults(container) -> None:
    """Appends the default to the help of every flag of `container` (a parser or an argument group) whose help does
    not mention one already, so that `--help` shows every default (as ArgumentDefaultsHelpFormatter would, but for
    one group only: the trainer's upstream flags keep upstream's help)."""
    actions = getattr(container, "_group_actions", None) or container._actions
    for action in actions:
        if (
            not action.option_strings
            or action.default is argparse.SUPPRESS
            or action.help is argparse.SUPPRESS
        ):
            continue
        help_text = action.help or ""
        if "default" in help_text.lower():
            continue
        shown = "off" if isinstance(action, argparse._StoreTrueAction) else "%(default)s"
        action.help = f"{help_text} (default: {shown})".strip()


def index_build_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `build_or_load_index` keywords that come straight from the flags of `add_index_arguments`."""
    return {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "variant": args.variant,
        "neighbor_encoder": args.neighbor_encoder,
        "num_neighbors": args.num_neighbors,
        "resolution": args.resolution,
        **{name: getattr(args, name) for name in DENSITY_FLAGS},
    }


def add_pogdiff_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag `train_pogdiff.py` has beyond upstream's, as one group (the last one of `--help`)."""
    pog = parser.add_argument_group("PoGDiff (flags that train_text_to_image.py does not have)")
    pog.add_argument(
        "--objective",
        type=str,
        default="pogdiff",
        choices=list(OBJECTIVES),
        help="pogdiff (paper Eq. 13); vanilla (plain fine-tuning); cbdm (Qin et al. 2023); t2h (Zhang et al. 2024).",
    )
    pog.add_argument(
        "--neighbor_grad",
        action="store_true",
        help=(
            "PoGDiff: let the gradient flow through the neighbour's prediction eps(x_t, y') as well (the paper's "
            "literal Algorithm 1; one forward with grad on the batch plus its neighbour rows). Default: that "
            "prediction is a fixed target (no_grad), about 1.25x a vanilla step instead of 1.55x."
        ),
    )
    pog.add_argument(
        "--neighbor_forward",
        choices=NEIGHBOR_FORWARD_MODES,
        default="auto",
        help="PoGDiff's no-grad neighbour forward: 'cuda_graph' replays a CUDA graph of it (removes its kernel "
        "launch time, which dominates at SD1.5 size on fast GPUs), 'eager' runs it as plain PyTorch, 'auto' "
        "picks cuda_graph on CUDA unless DeepSpeed / FSDP shard the UNet or torch.compile is on.",
    )
    pog.add_argument(
        "--identity_column",
        type=str,
        default="identity",
        help="Column naming who/what each image shows; if absent, the caption is the identity.",
    )
    add_index_arguments(pog)
    pog.add_argument(
        "--index_cache_dir",
        type=str,
        default=None,
        help="Where the neighbour/density index is cached (default: output_dir), keyed by data and parameters.",
    )
    pog.add_argument(
        "--caption_dropout_prob",
        type=float,
        default=0.0,
        help="Replace captions by '' with this probability (classifier-free guidance); such samples get psi = 0.",
    )
    pog.add_argument(
        "--sampling",
        type=str,
        default="uniform",
        choices=list(SAMPLING_SCHEMES),
        help=(
            "Sample order: uniform; balanced (every identity equally, kohya-style repeats); sqrt (identities by "
            "sqrt(count)); density (images by the index's inverse text density: balancing without identity labels)."
        ),
    )
    pog.add_argument(
        "--sampling_power",
        type=float,
        default=None,
        help=(
            "Balancing as a dial: an image of an identity with n images is drawn with weight n^(p-1), so 1 = "
            "uniform, 0.5 = sqrt, 0 = balanced (those --sampling names are its aliases). Default: --sampling."
        ),
    )
    pog.add_argument(
        "--sampling_weight_column",
        type=str,
        default=None,
        help=(
            "A dataset column of per-image draw weights (kohya's repeats, SimpleTuner's probability, as data), "
            "multiplied into --sampling's weights. Default: none (a kohya folder's N_name repeats when read with "
            "--caption_extension)."
        ),
    )
    pog.add_argument(
        "--cbdm_tau", type=float, default=1.0, help="CBDM's tau (regulariser weight, times t/T)."
    )
    pog.add_argument("--cbdm_gamma", type=float, default=0.25, help="CBDM's gamma (commitment term weight).")
    pog.add_argument(
        "--caption_extension",
        type=str,
        default=None,
        help="Read --train_data_dir as a kohya-style folder: captions in sidecar files with this extension "
        "(e.g. .txt) beside each image, identities from sub-folder names (N_name: N repeats). Default: the "
        "imagefolder layout with metadata.jsonl, as upstream.",
    )
    pog.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode every image (VAE latent distribution) and caption (text encoder) once before training; "
        "needs deterministic transforms (--center_crop, no --random_flip) and one caption per image.",
    )
    pog.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Also validate every X optimisation steps (with small data sets an epoch is a few steps). Without "
        "--validation_prompts, prompts of a few majority and few-shot identities are chosen from the data.",
    )
    pog.add_argument(
        "--num_validation_images",
        type=int,
        default=1,
        help="Images per validation prompt (each with its own fixed seed, the same at every validation).",
    )
    pog.add_argument(
        "--num_validation_inference_steps", type=int, default=50, help="DDIM steps of the validation images."
    )
    pog.add_argument(
        "--validation_guidance_scale",
        type=_non_negative_float,
        default=None,
        help="Classifier-free guidance of the validation images (evaluate_pogdiff.py has its own "
        "--guidance_scale). Default: the pipeline's (7.5 for Stable Diffusion), stated in each grid's title.",
    )
    pog.add_argument(
        "--allow_changed_settings",
        action="store_true",
        help="Resume even when the checkpoint was written with settings that change the result (they are listed "
        "in a warning); the run then no longer equals an uninterrupted one.",
    )
    pog.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run (without a resume) in an output folder (--output_dir) that holds another run's "
        "checkpoints: they are deleted first. Without it such a run is refused, so that two runs never mix.",
    )
    pog.add_argument(
        "--use_lora",
        action="store_true",
        help="Train LoRA adapters on the UNet (peft) instead of all weights.",
    )
    pog.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    pog.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank).")
    pog.add_argument(
        "--lora_target_modules",
        type=str,
        default="to_k,to_q,to_v,to_out.0",
        help="Comma-separated UNet module names that get LoRA adapters.",
    )
    show_defaults(pog)


def check_pogdiff_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validates the flags of `add_pogdiff_arguments` (fills `--sampling_power` and `--lora_alpha`); a bad value
    ends the program through `parser.error`, naming the flag. Numeric ranges of every flag are `FLAG_RANGES`'."""
    check_flag_ranges(parser, args)
    try:
        PsiParams.from_args(args)
        args.sampling_power = sampling_power(args.sampling, args.sampling_power)
    except UserError as error:
        parser.error(str(error))
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    if not any(m.strip() for m in args.lora_target_modules.split(",")):
        parser.error(
            f"--lora_target_modules must name at least one UNet module, got {args.lora_target_modules!r}."
        )
    if args.cache_latents and (not args.center_crop or args.random_flip):
        parser.error(
            "--cache_latents encodes each image once, so its transforms must be deterministic: add --center_crop "
            "and drop --random_flip (a random crop or flip would be frozen into the cache)."
        )
    if args.use_lora and args.use_ema:
        parser.error("--use_ema is for full fine-tuning; with --use_lora leave it off.")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error(
            "--overwrite_output_dir deletes the checkpoints of --output_dir and --resume_from_checkpoint continues "
            "one: give one of them."
        )
    if args.caption_extension is not None and args.train_data_dir is None:
        parser.error("--caption_extension reads a --train_data_dir folder; give --train_data_dir.")


# ---- Valid ranges of every numeric flag, declared once ----------------------------------------------------------
#
# argparse checks a number's type only: `--max_grad_norm -1` (gradient ascent), `--snr_gamma 0` (loss 0) or
# `--gradient_accumulation_steps 0` (ZeroDivisionError much later) would parse. Every int / float flag of
# `train_pogdiff.py` and of `add_index_arguments` has its range here (a test checks that none is missing), and
# `check_flag_ranges` refuses a value outside it at parse time, naming the flag.


class Bounds:
    """A closed, open or half-open interval; None is unbounded on that side."""

    def __init__(
        self,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
        why: str = "",
    ) -> None:
        self.low, self.high, self.low_open, self.high_open, self.why = low, high, low_open, high_open, why

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {high}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{low}, {high}{right}"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _at_least(low: float, why: str = "") -> Bounds:
    return Bounds(low, why=why)


def _above(low: float, why: str = "") -> Bounds:
    return Bounds(low, low_open=True, why=why)


_COUNT = _at_least(1)
_PROBABILITY = Bounds(0, 1, high_open=True)
# n ** (p - 1) stays a finite float64 for any identity size n below 1e9 when |p - 1| <= 11.
_SAMPLING_POWER = Bounds(-10, 10, why="n^(p-1) must stay a finite number for every identity size n")

FLAG_RANGES: dict[str, Bounds] = {
    # train_text_to_image.py's flags
    "input_perturbation": _at_least(0),
    "max_train_samples": _COUNT,
    "seed": Bounds(0, 2**32 - 1, why="numpy's seeds are 32-bit"),
    "resolution": _at_least(8, why="the VAE downsamples by 8"),
    "train_batch_size": _COUNT,
    "num_train_epochs": _COUNT,
    "max_train_steps": _at_least(1, why="0 steps would save the base model as the result"),
    "gradient_accumulation_steps": _COUNT,
    # 0 is allowed: a run that must not move the weights (e.g. to check validation or a pipeline) uses it.
    "learning_rate": _at_least(0, why="a negative learning rate climbs the loss"),
    "lr_warmup_steps": _at_least(0),
    "snr_gamma": _above(0, why="Min-SNR weights min(SNR, gamma) / SNR: 0 zeroes the loss, < 0 flips it"),
    "dream_detail_preservation": _above(0),
    "dataloader_num_workers": _at_least(0),
    "adam_beta1": _PROBABILITY,
    "adam_beta2": _PROBABILITY,
    "adam_weight_decay": _at_least(0),
    "adam_epsilon": _above(0),
    "max_grad_norm": _above(0, why="clipping to a norm <= 0 zeroes or reverses every update"),
    "local_rank": _at_least(-1),
    "checkpointing_steps": _COUNT,
    "checkpoints_total_limit": _COUNT,
    "noise_offset": _at_least(0),
    "validation_epochs": _COUNT,
    # PoGDiff's (add_index_arguments first)
    "num_neighbors": _COUNT,
    "psi_a1": _at_least(0),
    "psi_a2": _at_least(0),
    "psi_a3": _above(0),
    "density_latent_dim": _COUNT,
    "density_hidden_dim": _COUNT,
    "density_epochs": _COUNT,
    "density_lr": _above(0),
    "density_num_samples": _COUNT,
    "density_temperature": _above(0),
    "density_w_min": Bounds(0, 1, low_open=True, why="the weights have mean 1"),
    "density_w_max": _at_least(1, why="the weights have mean 1"),
    "few_shot_max": _at_least(0),
    "caption_dropout_prob": _PROBABILITY,
    "sampling_power": _SAMPLING_POWER,
    "cbdm_tau": _at_least(0),
    "cbdm_gamma": _at_least(0),
    "validation_steps": _COUNT,
    "num_validation_images": _COUNT,
    "num_validation_inference_steps": _COUNT,
    "rank": _COUNT,
    "lora_alpha": _above(0, why="LoRA's update is scaled by alpha / rank: 0 never trains"),
}


def range_errors(actions: list[argparse.Action], args: argparse.Namespace) -> list[str]:
    """One message per flag of `actions` whose value (not None) lies outside its `FLAG_RANGES` bounds."""
    errors = []
    for action in actions:
        bounds = FLAG_RANGES.get(action.dest)
        value = getattr(args, action.dest, None)
        if bounds is None or value is None or value in bounds:
            continue
        flag = "/".join(action.option_strings) or action.dest
        errors.append(
            f"{flag} must be {bounds.describe()}, got {value}" + (f" ({bounds.why})." if bounds.why else ".")
        )
    return errors


def _report_to_error(report_to: str) -> str | None:
    """Why accelerate cannot log to `--report_to` (an empty or unknown name, or a tracker not installed)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [name.strip() for name in report_to.split(",")]
    known = sorted(LOGGER_TYPE_TO_CLASS)
    if not report_to.strip() or not all(names):
        return f"--report_to must name a tracker ({', '.join(known)} or all), got {report_to!r}."
    if names == ["all"]:
        return None
    installed = {str(tracker) for tracker in get_available_trackers()}
    for name in names:
        if name not in known:
            return f"--report_to {name!r} is not a tracker accelerate knows: use one of {', '.join(known)} or all."
        if name not in installed:
            # accelerate would only log this at debug level and train without any tracking.
            return f"--report_to {name}: the {name} package is not installed. Install it, or use another tracker."
    if len(names) > 1:
        return f"--report_to takes one tracker (or all), got {report_to!r}."
    return None


def check_flag_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through `parser.error` (one line, exit 2), any numeric flag outside its declared range, an unknown
    `--lr_scheduler` and a `--report_to` that cannot log."""
    errors = range_errors(parser._actions, args)
    if errors:
        parser.error(errors[0])
    scheduler = getattr(args, "lr_scheduler", None)
    if scheduler is not None:
        from diffusers.optimization import SchedulerType

        names = [s.value for s in SchedulerType]
        if scheduler not in names:
            parser.error(f"--lr_scheduler must be one of {', '.join(names)}, got {scheduler!r}.")
    report_to = getattr(args, "report_to", None)
    if report_to is not None:
        problem = _report_to_error(report_to)
        if problem:
            parser.error(problem)
