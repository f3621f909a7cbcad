"""The command-line flags PoGDiff adds to diffusers' `train_text_to_image.py`, declared once.

`train_pogdiff.py` declares upstream's flags in upstream's order and then calls `add_pogdiff_arguments`: every
flag that is not upstream's sits in that one group at the end of `--help`, and `check_pogdiff_args` validates
them. `python -m pogdiff.index` reuses the index part (`add_index_arguments`: neighbours, psi, text density),
and each flag's roles (changes the result, keys the index cache, shows on the model card, valid range) are
declared with it (`add`, into `pogdiff.settings`), where `checkpointing.run_settings`, `index_build_kwargs`, the
model card and `check_flag_ranges` read them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from typing import Any

from . import settings
from .config import add_config_argument
from .errors import UserError
from .objectives import OBJECTIVES
from .psi import PSI_TERMS, PsiParams
from .sampling import SAMPLING_SCHEMES, sampling_power
from .settings import (
    COUNT,
    NEIGHBOR_FORWARD_MODES,
    PROBABILITY,
    SAMPLING_POWER,
    Bounds,
    above,
    at_least,
)


def add(
    container,
    *flags: str,
    exact: bool = False,
    index: bool = False,
    card: bool | str = False,
    bounds: Bounds | None = None,
    **argparse_kwargs: Any,
) -> argparse.Action:
    """`container.add_argument(*flags, **argparse_kwargs)` plus the flag's roles (`pogdiff.settings.declare`): whether
    it changes the result (`exact`), keys the index cache (`index`), shows on the model card (`card`), and its valid
    range (`bounds`). Every PoGDiff flag is declared through this, so its roles sit where it is declared."""
    action = container.add_argument(*flags, **argparse_kwargs)
    settings.declare(action.dest, exact=exact, index=index, card=card, bounds=bounds)
    return action


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
    add(
        parser,
        "--neighbor_encoder",
        exact=True,
        index=True,
        card=True,
        type=str,
        default="facebook/dinov2-base",
        help="Image encoder that decides neighbours: an HF id, 'vae' (the base model's VAE, no download), "
        "'face' (dlib), 'pixels' (tests) or 'module:function'.",
    )
    add(
        parser,
        "--num_neighbors",
        exact=True,
        index=True,
        card=True,
        bounds=COUNT,
        type=int,
        default=5,
        help="k: neighbours per image, by image-embedding cosine (Eq. 8).",
    )
    add(
        parser,
        "--psi_a1",
        exact=True,
        card=True,
        bounds=at_least(0),
        type=float,
        default=1.0,
        help="a1 of Eq. 9: exponent of s for the same identity.",
    )
    add(
        parser,
        "--psi_a2",
        exact=True,
        card=True,
        bounds=at_least(0),
        type=float,
        default=1.0,
        help="a2 of Eq. 9: extra exponent of s when identities differ.",
    )
    add(
        parser,
        "--psi_a3",
        exact=True,
        card=True,
        bounds=above(0),
        type=float,
        default=1.0,
        help="a3 of Eq. 11-12: divides psi (overall scale).",
    )
    add(
        parser,
        "--psi_terms",
        exact=True,
        card=True,
        type=str,
        default="img,txt",
        choices=PSI_TERMS,
        # The choices contain commas, so argparse's `{img,txt,txt,img,...}` would be unreadable.
        metavar="TERMS",
        help="Factors of psi (paper Table 6 ablation): 'img,txt' (both; 'txt,img' is the same), 'img' (image "
        "similarity only), 'txt' (inverse text density only) or 'none' (= vanilla).",
    )
    add(
        parser,
        "--density_latent_dim",
        exact=True,
        index=True,
        card=True,
        bounds=COUNT,
        type=int,
        default=16,
        help="Latent size of the text-density VAE.",
    )
    add(
        parser,
        "--density_hidden_dim",
        exact=True,
        index=True,
        card=True,
        bounds=COUNT,
        type=int,
        default=256,
        help="Hidden size of the text-density VAE.",
    )
    add(
        parser,
        "--density_epochs",
        exact=True,
        index=True,
        card=True,
        bounds=COUNT,
        type=int,
        default=200,
        help="Training epochs of the text-density VAE.",
    )
    add(
        parser,
        "--density_lr",
        exact=True,
        index=True,
        card=True,
        bounds=above(0),
        type=float,
        default=1e-3,
        help="Learning rate of the text-density VAE.",
    )
    add(
        parser,
        "--density_num_samples",
        exact=True,
        index=True,
        card=True,
        bounds=COUNT,
        type=int,
        default=16,
        help="Posterior draws per ELBO estimate (>= 16 advised).",
    )
    add(
        parser,
        "--density_temperature",
        exact=True,
        index=True,
        card=True,
        bounds=above(0),
        type=float,
        default=1.0,
        help="T in log w = -ELBO/T - logmeanexp(-ELBO/T).",
    )
    add(
        parser,
        "--density_w_min",
        exact=True,
        index=True,
        card=True,
        bounds=Bounds(0, 1, low_open=True, why="the weights have mean 1"),
        type=_float_or_none,
        default=0.1,
        help="Lower clip of the inverse-density weights ('none': no clipping).",
    )
    add(
        parser,
        "--density_w_max",
        exact=True,
        index=True,
        card=True,
        bounds=at_least(1, why="the weights have mean 1"),
        type=_float_or_none,
        default=10.0,
        help="Upper clip of the inverse-density weights ('none': no clipping).",
    )
    add(
        parser,
        "--few_shot_max",
        exact=True,
        bounds=at_least(0),
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


def index_build_kwargs(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The `build_or_load_index` keywords that come straight from the flags: those declared with `index=True`."""
    values = settings.values_of(args)
    return {dest: values[dest] for dest in settings.index_dests()}


def add_pogdiff_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag `train_pogdiff.py` has beyond upstream's, as one group (the last one of `--help`)."""
    pog = parser.add_argument_group("PoGDiff (flags that train_text_to_image.py does not have)")
    add_config_argument(pog)
    add(
        pog,
        "--objective",
        exact=True,
        card=True,
        type=str,
        default="pogdiff",
        choices=list(OBJECTIVES),
        help="pogdiff (paper Eq. 13); vanilla (plain fine-tuning); cbdm (Qin et al. 2023); t2h (Zhang et al. 2024).",
    )
    add(
        pog,
        "--neighbor_grad",
        exact=True,
        card=True,
        action="store_true",
        help=(
            "PoGDiff: let the gradient flow through the neighbour's prediction eps(x_t, y') as well (the paper's "
            "literal Algorithm 1; one forward with grad on the batch plus its neighbour rows). Default: that "
            "prediction is a fixed target (no_grad), about 1.25x a vanilla step instead of 1.55x."
        ),
    )
    add(
        pog,
        "--neighbor_forward",
        choices=NEIGHBOR_FORWARD_MODES,
        default="auto",
        help="PoGDiff's no-grad neighbour forward: 'cuda_graph' replays a CUDA graph of it (removes its kernel "
        "launch time, which dominates at SD1.5 size on fast GPUs), 'eager' runs it as plain PyTorch, 'auto' "
        "picks cuda_graph on CUDA unless DeepSpeed / FSDP shard the UNet or torch.compile is on.",
    )
    add(
        pog,
        "--identity_column",
        exact=True,
        type=str,
        default="identity",
        help="Column naming who/what each image shows; if absent, the caption is the identity.",
    )
    add_index_arguments(pog)
    add(
        pog,
        "--index_cache_dir",
        type=str,
        default=None,
        help="Where the neighbour/density index is cached (default: output_dir), keyed by data and parameters.",
    )
    add(
        pog,
        "--caption_dropout_prob",
        # The name diffusers' SDXL scripts give the same thing (each caption replaced by '' with this probability).
        "--proportion_empty_prompts",
        exact=True,
        card=True,
        bounds=PROBABILITY,
        type=float,
        default=0.0,
        help="Replace captions by '' with this probability (classifier-free guidance); such samples get psi = 0. "
        "--proportion_empty_prompts, the name in diffusers' SDXL scripts, is the same flag.",
    )
    add(
        pog,
        "--pretrained_vae_model_name_or_path",
        exact=True,
        card=True,
        type=str,
        default=None,
        help="A VAE (folder or Hub id) to train and save with instead of the base model's, as in diffusers' SDXL "
        "scripts, e.g. madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE runs in float32 under mixed precision, one "
        "given here runs in the mixed precision.",
    )
    add(
        pog,
        "--sampling",
        exact=True,
        card=True,
        type=str,
        default="uniform",
        choices=list(SAMPLING_SCHEMES),
        help=(
            "Sample order: uniform; balanced (every identity equally, kohya-style repeats); sqrt (identities by "
            "sqrt(count)); density (images by the index's inverse text density: balancing without identity labels)."
        ),
    )
    add(
        pog,
        "--sampling_power",
        exact=True,
        card=True,
        bounds=SAMPLING_POWER,
        type=float,
        default=None,
        help=(
            "Balancing as a dial: an image of an identity with n images is drawn with weight n^(p-1), so 1 = "
            "uniform, 0.5 = sqrt, 0 = balanced (those --sampling names are its aliases). Default: --sampling."
        ),
    )
    add(
        pog,
        "--sampling_weight_column",
        exact=True,
        card=True,
        type=str,
        default=None,
        help=(
            "A dataset column of per-image draw weights (kohya's repeats, SimpleTuner's probability, as data), "
            "multiplied into --sampling's weights. Default: none (a kohya folder's N_name repeats when read with "
            "--caption_extension)."
        ),
    )
    add(
        pog,
        "--cbdm_tau",
        exact=True,
        card=True,
        bounds=at_least(0),
        type=float,
        default=1.0,
        help="CBDM's tau (regulariser weight, times t/T).",
    )
    add(
        pog,
        "--cbdm_gamma",
        exact=True,
        card=True,
        bounds=at_least(0),
        type=float,
        default=0.25,
        help="CBDM's gamma (commitment term weight).",
    )
    add(
        pog,
        "--caption_extension",
        type=str,
        default=None,
        help="Read --train_data_dir as a kohya-style folder: captions in sidecar files with this extension "
        "(e.g. .txt) beside each image, identities from sub-folder names (N_name: N repeats). Default: the "
        "imagefolder layout with metadata.jsonl, as upstream.",
    )
    add(
        pog,
        "--cache_latents",
        exact=True,
        action="store_true",
        help="Encode every image (VAE latent distribution) and caption (text encoder) once before training; "
        "needs deterministic transforms (--center_crop, no --random_flip) and one caption per image.",
    )
    add(
        pog,
        "--validation_steps",
        bounds=COUNT,
        type=int,
        default=None,
        help="Also validate every X optimisation steps (with small data sets an epoch is a few steps). Without "
        "--validation_prompts, prompts of a few majority and few-shot identities are chosen from the data.",
    )
    add(
        pog,
        "--num_validation_images",
        bounds=COUNT,
        type=int,
        default=1,
        help="Images per validation prompt (each with its own fixed seed, the same at every validation).",
    )
    add(
        pog,
        "--num_validation_inference_steps",
        bounds=COUNT,
        type=int,
        default=50,
        help="DDIM steps of the validation images.",
    )
    add(
        pog,
        "--validation_guidance_scale",
        type=_non_negative_float,
        default=None,
        help="Classifier-free guidance of the validation images (evaluate_pogdiff.py has its own "
        "--guidance_scale). Default: the pipeline's (7.5 for Stable Diffusion), stated in each grid's title.",
    )
    add(
        pog,
        "--allow_changed_settings",
        action="store_true",
        help="Resume even when the checkpoint was written with settings that change the result (they are listed "
        "in a warning); the run then no longer equals an uninterrupted one.",
    )
    add(
        pog,
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run (without a resume) in an output folder (--output_dir) that holds another run's "
        "checkpoints: they are deleted first. Without it such a run is refused, so that two runs never mix.",
    )
    add(
        pog,
        "--use_lora",
        exact=True,
        card=True,
        action="store_true",
        help="Train LoRA adapters on the UNet (peft) instead of all weights.",
    )
    add(pog, "--rank", exact=True, card="use_lora", bounds=COUNT, type=int, default=4, help="LoRA rank.")
    add(
        pog,
        "--lora_alpha",
        exact=True,
        card="use_lora",
        bounds=above(0, why="LoRA's update is scaled by alpha / rank: 0 never trains"),
        type=int,
        default=None,
        help="LoRA alpha (default: the rank).",
    )
    add(
        pog,
        "--lora_target_modules",
        exact=True,
        type=str,
        default="to_k,to_q,to_v,to_out.0",
        help="Comma-separated UNet module names that get LoRA adapters.",
    )
    show_defaults(pog)


def check_pogdiff_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Validates the flags of `add_pogdiff_arguments` (fills `--sampling_power` and `--lora_alpha`); a bad value
    ends the program through `parser.error`, naming the flag. Numeric ranges are the flags' declared `bounds`."""
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


# ---- Valid ranges of every numeric flag ---------------------------------------------------------------------
#
# argparse checks a number's type only: `--max_grad_norm -1` (gradient ascent), `--snr_gamma 0` (loss 0) or
# `--gradient_accumulation_steps 0` (ZeroDivisionError much later) would parse. Every int / float flag of
# `train_pogdiff.py` and of `add_index_arguments` declares its range (`bounds`, a test checks that none is missing),
# and `check_flag_ranges` refuses a value outside it at parse time, naming the flag.


def range_errors(actions: list[argparse.Action], args: argparse.Namespace) -> list[str]:
    """One message per flag of `actions` whose value (not None) lies outside its declared bounds."""
    errors, ranges = [], settings.flag_ranges()
    for action in actions:
        bounds = ranges.get(action.dest)
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


# Every PoGDiff flag's roles are declared when its parser is built; build one now so that the derived lists below
# (and `settings`' views) hold them from import on.
add_pogdiff_arguments(argparse.ArgumentParser(add_help=False))

# Derived from the declarations, under the names other modules and tests use.
FLAG_RANGES: dict[str, Bounds] = settings.flag_ranges()
# The text-density VAE's flags, passed to `index.build_or_load_index` under the same names.
DENSITY_FLAGS: tuple[str, ...] = tuple(d for d in settings.index_dests() if d.startswith("density_"))
