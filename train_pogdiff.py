#!/usr/bin/env python
"""Fine-tune Stable Diffusion on imbalanced image-text data with PoGDiff (or a baseline objective).

Flags, defaults and loop order follow diffusers' `examples/text_to_image/train_text_to_image.py`, so a user can
diff the two. What PoGDiff adds (paper Eq. 6-13, SPEC section 3):

    loss_i = ||a - target||^2 + psi_i * ||a - stopgrad(eps_theta(x_t, t, y_j))||^2

where j is a neighbour of sample i drawn from the k nearest images, and psi_i weighs rare prompts more. The
neighbour table is built once before training (`pogdiff/index.py`) and cached in output_dir.

    accelerate launch train_pogdiff.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --train_data_dir my_data --objective pogdiff --output_dir out
"""

from __future__ import annotations

# First: importing pogdiff quiets transformers' torchvision-fallback notice before diffusers triggers it.
import pogdiff  # noqa: F401

# isort: split
import argparse
import contextlib
import functools
import gc
import logging
import math
import os
import sys
from pathlib import Path

import accelerate
import datasets
import diffusers
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import (
    DistributedType,
    DynamoBackend,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import (
    EMAModel,
    cast_training_params,
    compute_dream_and_update_latents,
)
from diffusers.utils import (
    convert_unet_state_dict_to_peft,
)
from diffusers.utils.import_utils import is_xformers_available
from huggingface_hub import create_repo, upload_folder
from PIL import Image
from tqdm.auto import tqdm
from transformers.utils import ContextManagers

import pipeline_pogdiff
from pogdiff.arguments import add_pogdiff_arguments, check_pogdiff_args
from pogdiff.checkpointing import (
    base_model_fingerprint,
    check_resume_settings,
    checkpoint_step,
    claim_output_dir_for_new_run,
    lock_output_dir,
    read_run_record,
    run_settings,
    save_checkpoint,
    save_result_atomically,
    save_run_settings,
    select_resume_checkpoint,
    set_aside_newer_checkpoints,
)
from pogdiff.config import CONFIG_FILE, apply_config_file, config_values, write_config
from pogdiff.data import (
    INTERPOLATION_MODES,
    TrainDataset,
    collate_fn,
    data_flags,
    load_training_data,
)
from pogdiff.errors import (
    UserError,
    missing_model_parts,
    model_load_message,
    user_error_message,
)
from pogdiff.families import ModelFamily, detect_family
from pogdiff.hub import HUB_IGNORE_PATTERNS, save_lora, save_model_card, save_pipeline_code
from pogdiff.objectives import StepMeans
from pogdiff.seeds import derive_seed, validation_seed
from pogdiff.trainer import report_pogdiff_run, setup_pogdiff
from pogdiff.training import (
    any_process,
    full_model,
    fused_adamw_kwargs,
    noised_batch,
    objective_step,
    sharded_engine,
)
from pogdiff.validation import (
    auto_validation_prompts,
    pipeline_guidance_scale,
    prompts_from_user,
    save_validation_grid,
    validation_grid,
    validation_sampling,
)

logger = get_logger(__name__, log_level="INFO")

# Training images shown beside the samples of an identity's validation row, and the smallest cell of the grid in
# pixels (small samples are enlarged so that the label beside them has room for identity and image count).
MAX_VALIDATION_TRAIN_IMAGES = 3
MIN_VALIDATION_CELL = 128


class TrainingError(UserError):
    """A problem the user must fix (reported as one message, without a traceback)."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Fine-tune Stable Diffusion on imbalanced image-text data with PoGDiff. The flags are those of "
            "diffusers' train_text_to_image.py, in its order and with its defaults; PoGDiff's own come last."
        )
    )
    parser.add_argument(
        "--input_perturbation", type=float, default=0, help="Input perturbation scale (0.1 works)."
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        required=True,
        help="Path to pretrained model or model identifier from huggingface.co/models.",
    )
    parser.add_argument(
        "--revision",
        type=str,
        default=None,
        required=False,
        help="Revision of the pretrained model on the Hub.",
    )
    parser.add_argument(
        "--variant",
        type=str,
        default=None,
        help="Variant of the model files, e.g. fp16.",
    )
    parser.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="A Hub dataset name or a local dataset path (columns image, text and optionally identity).",
    )
    parser.add_argument(
        "--dataset_config_name",
        type=str,
        default=None,
        help="The config of the Dataset.",
    )
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A local imagefolder with metadata.jsonl (file_name, text, identity), or a kohya-style folder "
        "with --caption_extension. Ignored with --dataset_name.",
    )
    parser.add_argument("--image_column", type=str, default="image", help="The column holding the image.")
    parser.add_argument(
        "--caption_column",
        type=str,
        default="text",
        help="The column holding the caption(s).",
    )
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Truncate the training set to this many samples.",
    )
    parser.add_argument(
        "--validation_prompts",
        type=str,
        default=None,
        nargs="+",
        help="Prompts sampled every --validation_epochs (and --validation_steps).",
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default="sd-model-finetuned",
        help="Where the model, checkpoints, logs and validation grids are written.",
    )
    parser.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="Where downloaded models and datasets go.",
    )
    parser.add_argument("--seed", type=int, default=None, help="A seed for reproducible training.")
    parser.add_argument(
        "--resolution",
        type=int,
        default=512,
        help="Training image resolution.",
    )
    parser.add_argument(
        "--center_crop",
        default=False,
        action="store_true",
        help="Center crop instead of a random crop.",
    )
    parser.add_argument(
        "--random_flip",
        action="store_true",
        help="Randomly flip images horizontally.",
    )
    parser.add_argument("--train_batch_size", type=int, default=16, help="Batch size per device.")
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Total optimisation steps; overrides --num_train_epochs.",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help="Micro-batches per update.",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Trade compute for memory in the UNet backward.",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=1e-4,
        help="Initial learning rate (after warmup).",
    )
    parser.add_argument(
        "--scale_lr",
        action="store_true",
        default=False,
        help="Scale lr by GPUs x accumulation x batch size.",
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant" or "constant_with_warmup".',
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=500, help="Warmup steps of the lr scheduler.")
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=None,
        help="Min-SNR weighting gamma (5.0 recommended). With PoGDiff it multiplies both loss terms.",
    )
    parser.add_argument(
        "--dream_training",
        action="store_true",
        help="Use DREAM (arXiv 2312.00210).",
    )
    parser.add_argument(
        "--dream_detail_preservation",
        type=float,
        default=1.0,
        help="DREAM's p (> 0).",
    )
    parser.add_argument("--use_8bit_adam", action="store_true", help="Use 8-bit AdamW from bitsandbytes.")
    parser.add_argument(
        "--allow_tf32",
        action="store_true",
        help="Allow TF32 matmuls on Ampere+ GPUs.",
    )
    parser.add_argument(
        "--use_ema", action="store_true", help="Keep an EMA copy of the UNet (saved as the model)."
    )
    parser.add_argument("--offload_ema", action="store_true", help="Keep the EMA copy on CPU between steps.")
    parser.add_argument("--foreach_ema", action="store_true", help="Faster foreach EMA update (more memory).")
    parser.add_argument(
        "--non_ema_revision",
        type=str,
        default=None,
        required=False,
        help="Revision of the non-EMA UNet (deprecated in diffusers; prefer --variant=non_ema).",
    )
    parser.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Subprocesses for data loading (0 = main process).",
    )
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="The beta1 parameter for Adam.")
    parser.add_argument("--adam_beta2", type=float, default=0.999, help="The beta2 parameter for Adam.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Weight decay to use.")
    parser.add_argument("--adam_epsilon", type=float, default=1e-08, help="Epsilon value for Adam.")
    parser.add_argument("--max_grad_norm", default=1.0, type=float, help="Max gradient norm.")
    parser.add_argument(
        "--push_to_hub", action="store_true", help="Push the model (not checkpoints) to the Hub."
    )
    parser.add_argument("--hub_token", type=str, default=None, help="The token to use to push to the Hub.")
    parser.add_argument(
        "--prediction_type",
        type=str,
        default=None,
        help="'epsilon' or 'v_prediction'; None keeps the scheduler's prediction_type.",
    )
    parser.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help="The Hub repository to push to.",
    )
    parser.add_argument(
        "--logging_dir",
        type=str,
        default="logs",
        help="TensorBoard log directory (in output_dir).",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Overrides the accelerate config's mixed precision.",
    )
    parser.add_argument(
        "--report_to",
        type=str,
        default="tensorboard",
        help='"tensorboard", "wandb", "comet_ml" or "all".',
    )
    parser.add_argument("--local_rank", type=int, default=-1, help="For distributed training: local_rank")
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=500,
        help="Save the training state every X updates.",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Max number of checkpoints kept.",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint-N folder (a path, or a name inside --output_dir), or "latest": the newest readable '
        "checkpoint in --output_dir (a fresh start when there is none).",
    )
    parser.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true", help="Use xformers attention."
    )
    parser.add_argument("--noise_offset", type=float, default=0, help="The scale of noise offset.")
    parser.add_argument(
        "--validation_epochs",
        type=int,
        default=5,
        help="Run validation every X epochs.",
    )
    parser.add_argument(
        "--tracker_project_name",
        type=str,
        default="text2image-fine-tune",
        help="Project name passed to accelerate's init_trackers.",
    )
    parser.add_argument(
        "--image_interpolation_mode",
        type=str,
        default="lanczos",
        choices=list(INTERPOLATION_MODES),
        help="Resampling filter used to resize images to --resolution.",
    )
    add_pogdiff_arguments(parser)

    # --config FILE: its values become the defaults, so the command line overrides them.
    apply_config_file(parser, input_args)
    args = parser.parse_args(input_args)
    # What output_dir/pogdiff_config.toml records: the flags as given, before any is filled in from another.
    args.config_values = config_values(parser, args)
    env_local_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_local_rank != -1 and env_local_rank != args.local_rank:
        args.local_rank = env_local_rank

    # Sanity checks
    if args.dataset_name is None and args.train_data_dir is None:
        parser.error("Need either --dataset_name or --train_data_dir.")

    # default to using the same revision for the non-ema model if not specified
    if args.non_ema_revision is None:
        args.non_ema_revision = args.revision

    # argparse's float() accepts "nan" and "inf", which would flow silently into psi, the learning rate or the
    # loss; one check covers every float flag, present and future.
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if any(
            isinstance(v, float) and not math.isfinite(v)
            for v in (value if isinstance(value, list) else [value])
        ):
            parser.error(
                f"{'/'.join(action.option_strings) or action.dest} must be a finite number, got {value}."
            )
    check_pogdiff_args(parser, args)
    return args


def load_vae(args: argparse.Namespace) -> AutoencoderKL:
    """The VAE the run trains with: `--pretrained_vae_model_name_or_path` (a whole VAE folder or Hub id, as in
    diffusers' SDXL scripts) or the base model's `vae/`."""
    if args.pretrained_vae_model_name_or_path is None:
        return AutoencoderKL.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="vae", revision=args.revision, variant=args.variant
        )
    try:
        return AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    except OSError as error:
        raise TrainingError(
            model_load_message(
                "--pretrained_vae_model_name_or_path", args.pretrained_vae_model_name_or_path, error
            )
        ) from error


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


class Validation:
    """The run's validations: its prompts (the user's, or with --validation_steps alone the first captions of a few
    majority and few-shot identities, so that the grids show whether the minority is being learned), their
    training images (decoded once), and at most one labelled grid per step.

    Calling it validates the current weights (the EMA ones with --use_ema): every rank calls it (a sharded model is
    gathered first, `full_model`), the main process samples every prompt `--num_validation_images` times through
    the family's PoGDiff pipeline with the same seeds at every validation, and saves and logs one grid
    (`output_dir/validation/step-N.png`): a row per prompt with its identity, its number of training images and
    those images beside the samples. It returns the samples, per prompt.
    """

    def __init__(
        self,
        args,
        accelerator,
        family: ModelFamily,
        models: dict,  # vae, text_encoders, noise_scheduler, ema_unet
        weight_dtype: torch.dtype,
        seed: int,
        data,
    ) -> None:
        self.args, self.accelerator, self.family, self.models = args, accelerator, family, models
        self.weight_dtype, self.seed = weight_dtype, seed
        if args.validation_prompts:
            self.prompts = prompts_from_user(args.validation_prompts)
        elif args.validation_steps is not None:
            self.prompts = auto_validation_prompts(data.identities, data.texts, args.few_shot_max)
        else:
            self.prompts = []
        image = data.image
        self.train_images = [
            [image(row) for row in prompt.train_rows[:MAX_VALIDATION_TRAIN_IMAGES]] for prompt in self.prompts
        ]
        self.last: tuple[int, list] | None = None

    def __call__(self, unet, global_step: int, swap_ema: bool = True, model=None) -> list[list[Image.Image]]:
        if self.last is not None and self.last[0] == global_step:
            return self.last[1]
        accelerator, ema_unet = self.accelerator, self.models["ema_unet"]
        model = model if model is not None else full_model(accelerator, unet, UNet2DConditionModel)
        samples = []
        if accelerator.is_main_process:
            swap = self.args.use_ema and swap_ema
            if swap:
                # Store the UNet parameters temporarily and load the EMA parameters to perform inference.
                ema_unet.store(unet.parameters())
                ema_unet.copy_to(unet.parameters())
            samples = self.log(model, global_step)
            if swap:
                ema_unet.restore(unet.parameters())
        # On every rank: a second validation of this step is skipped everywhere, gather included.
        self.last = (global_step, samples)
        return samples

    def log(self, unet, global_step: int) -> list[list[Image.Image]]:
        args, accelerator, prompts = self.args, self.accelerator, self.prompts
        logger.info(f"Running validation on {len(prompts)} prompts...")
        pipeline = getattr(pipeline_pogdiff, self.family.pogdiff_pipeline_name)(
            vae=accelerator.unwrap_model(self.models["vae"]),
            **self.family.pipeline_components(self.models["text_encoders"]),
            unet=accelerator.unwrap_model(unet, keep_torch_compile=False),
            scheduler=self.models["noise_scheduler"],
        )
        pipeline.set_progress_bar_config(disable=True)
        autocast = (
            torch.autocast(accelerator.device.type, dtype=self.weight_dtype)
            if self.weight_dtype != torch.float32
            else contextlib.nullcontext()
        )
        # The guidance is stated in the grid's title: the pipeline's default (7.5) unless
        # --validation_guidance_scale.
        sampling_kwargs, guidance_text = validation_sampling(
            args.validation_guidance_scale, pipeline_guidance_scale(pipeline)
        )
        samples = []
        for i, prompt in enumerate(prompts):
            generators = [
                torch.Generator(device=accelerator.device).manual_seed(validation_seed(self.seed, i, j))
                for j in range(args.num_validation_images)
            ]
            with autocast:
                images = pipeline(
                    [prompt.prompt] * len(generators),
                    num_inference_steps=args.num_validation_inference_steps,
                    generator=generators,
                    **sampling_kwargs,
                ).images
            samples.append(images)
        del pipeline

        grid = validation_grid(
            list(zip(prompts, self.train_images, samples)),
            cell=max(args.resolution, MIN_VALIDATION_CELL),
            max_train_images=MAX_VALIDATION_TRAIN_IMAGES,
            title=f"step {global_step}, {guidance_text}, {args.num_validation_inference_steps} DDIM steps",
        )
        path = save_validation_grid(grid, args.output_dir, global_step)
        logger.info(f"Validation grid: {path}")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), global_step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                caption = "; ".join(prompt.label for prompt in prompts)
                tracker.log({"validation": wandb.Image(grid, caption=caption)}, step=global_step)
            else:
                logger.warning(f"image logging not implemented for {tracker.name}")
        return samples


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Accelerator:
    # As upstream, main resolves a few flags in place (mixed precision, --scale_lr, the step and epoch counts):
    # on its own copy, so that the caller's parsed flags stay as given.
    args = argparse.Namespace(**vars(args))
    if args.report_to == "wandb" and args.hub_token is not None:
        raise TrainingError(
            "You cannot use both --report_to=wandb and --hub_token: the token would be exposed. "
            "Authenticate with `hf auth login` instead."
        )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise TrainingError(f"--output_dir {args.output_dir!r} is a file, not a folder: give a folder path.")
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator_project_config = ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir)
    # Under torchrun on a machine without an accelerator, accelerate only enters its multi-process CPU (gloo)
    # mode when told to use the CPU; otherwise every rank would silently train alone.
    cpu_only_multiprocess = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (
        torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    )
    accelerator = Accelerator(
        cpu=cpu_only_multiprocess,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=accelerator_project_config,
    )
    if args.use_ema and accelerator.distributed_type == DistributedType.FSDP:
        # diffusers' EMAModel keeps whole tensors and steps them against the model's parameters, which FSDP
        # has turned into shards (DTensors): the update cannot be computed, and gathering the whole UNet every
        # step would undo what FSDP saves.
        raise TrainingError(
            "--use_ema does not work under FSDP (the EMA copy is whole, FSDP's parameters are sharded). Drop "
            "--use_ema, or train with DDP (multi-GPU config) or DeepSpeed instead; see examples/accelerate/."
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise TrainingError(
            "--mixed_precision fp16 is for GPUs: on the CPU, use --mixed_precision bf16 (or no). (It may also come "
            "from your accelerate config.)"
        )

    # Make one log on every process with the configuration for debugging.
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        level=logging.INFO,
    )
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_info()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    # One run per output_dir: two writers would prune, resume from and overwrite each other's checkpoints.
    output_lock = lock_output_dir(args.output_dir) if accelerator.is_main_process else None

    # The checkpoint to resume from is settled first: its recorded seed drives every draw below, and a wrong
    # path fails before any model is loaded.
    if args.resume_from_checkpoint:
        resume_dir = select_resume_checkpoint(
            args.resume_from_checkpoint, args.output_dir, accelerator.is_main_process
        )
    else:
        resume_dir = None
        # A new run never writes over another run's checkpoints (its own checkpoint-N would replace theirs).
        claim_output_dir_for_new_run(args.output_dir, args.overwrite_output_dir, accelerator.is_main_process)
    resume_record = read_run_record(resume_dir) if resume_dir is not None else None

    # Every random draw of the run (sample order, crops, noise, timesteps, neighbours) derives from this seed,
    # so all ranks must share it; without --seed a resumed run takes its checkpoint's, a new one draws one.
    if args.seed is not None:
        seed = args.seed
    elif resume_record is not None:
        seed = resume_record["settings"]["--seed"]
        logger.info(
            f"No --seed given; resuming with the seed of checkpoint {os.path.basename(resume_dir)}: seed {seed}."
        )
    else:
        seed = broadcast_object_list([int(np.random.SeedSequence().generate_state(1)[0])])[0]
        logger.info(f"No --seed given; this run uses seed {seed}.")
    set_seed(seed)

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        # The run's settings as a --config file, from the start: a crashed run can be re-run from it.
        write_config(os.path.join(args.output_dir, CONFIG_FILE), args.config_values)
        if args.push_to_hub:
            from huggingface_hub.errors import OfflineModeIsEnabled

            try:
                repo_id = create_repo(
                    repo_id=args.hub_model_id or Path(args.output_dir).name,
                    exist_ok=True,
                    token=args.hub_token,
                ).repo_id
            except OfflineModeIsEnabled:  # before training, in one line, rather than a traceback
                raise TrainingError(
                    "--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set: unset it, or drop "
                    "--push_to_hub and upload --output_dir later (`hf upload`)."
                ) from None

    # Load scheduler, tokenizer and models.
    try:
        noise_scheduler = DDPMScheduler.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="scheduler", revision=args.revision
        )
    except OSError as error:
        raise TrainingError(
            model_load_message("--pretrained_model_name_or_path", args.pretrained_model_name_or_path, error)
        ) from error
    # The model family (SD 1.x/2.x, SDXL) decides the text encoders, the conditioning and the pipeline classes.
    family = detect_family(args.pretrained_model_name_or_path, args.revision, cache_dir=args.cache_dir)
    logger.info(f"Model family: {family.name} ({family.pipeline_class_name}).")
    if os.path.isdir(args.pretrained_model_name_or_path):
        missing = missing_model_parts(args.pretrained_model_name_or_path, family.model_parts)
        if missing:
            raise TrainingError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} lacks "
                f"{', '.join(part + '/' for part in missing)}: a diffusers {family.pipeline_class_name} folder has "
                f"{', '.join(part + '/' for part in family.model_parts)} beside model_index.json. Save or download "
                "the whole model again."
            )
    if args.dream_training and family.micro_conditioning:
        raise TrainingError(
            f"--dream_training is not available for {family.pipeline_class_name} models (diffusers' DREAM helper "
            "calls the UNet without SDXL's added conditioning); drop the flag."
        )

    def deepspeed_zero_init_disabled_context_manager():
        """Keep the frozen text encoder and VAE whole under ZeRO-3: only the UNet is sharded."""
        deepspeed_plugin = AcceleratorState().deepspeed_plugin if accelerate.state.is_initialized() else None
        if deepspeed_plugin is None:
            return []
        return [deepspeed_plugin.zero3_init_context_manager(enable=False)]

    with ContextManagers(deepspeed_zero_init_disabled_context_manager()):
        text_encoders = family.load_text_encoders(
            args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant
        )
        vae = load_vae(args)
    try:
        unet = UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.non_ema_revision
        )
    except OSError as error:  # e.g. a truncated weights file: diffusers names the file, not the remedy
        raise TrainingError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: its UNet did not load "
            f"({' '.join(str(error).split())}). The file may be truncated or corrupt: save or download it again."
        ) from error

    # Freeze vae and text encoders and set unet to trainable
    vae.requires_grad_(False)
    text_encoders.requires_grad_(False)
    unet.train()

    # For mixed precision, frozen weights (VAE, text encoder, and the frozen UNet base under LoRA) are cast to
    # half precision: they only run inference. Keyed off the accelerator, which knows the config file's choice.
    weight_dtype = torch.float32
    if accelerator.mixed_precision == "fp16":
        weight_dtype = torch.float16
    elif accelerator.mixed_precision == "bf16":
        weight_dtype = torch.bfloat16
    args.mixed_precision = accelerator.mixed_precision

    if args.use_lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(accelerator.device, dtype=weight_dtype)
        try:
            unet.add_adapter(
                LoraConfig(
                    r=args.rank,
                    lora_alpha=args.lora_alpha,
                    init_lora_weights="gaussian",
                    target_modules=[m.strip() for m in args.lora_target_modules.split(",") if m.strip()],
                )
            )
        except ValueError as error:  # peft's NoMatchingPeftModuleError: it names the modules, not the flag
            raise TrainingError(
                f"--lora_target_modules {args.lora_target_modules!r}: {' '.join(str(error).split())} Give "
                "comma-separated names of UNet modules (the default: to_k,to_q,to_v,to_out.0)."
            ) from error
        if accelerator.mixed_precision == "fp16":
            # Trainable LoRA parameters stay fp32: the fp16 grad scaler cannot unscale fp16 gradients.
            cast_training_params(unet, dtype=torch.float32)

    # Create EMA for the unet.
    ema_unet = None
    if args.use_ema:
        ema_unet = UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision, variant=args.variant
        )
        ema_unet = EMAModel(
            ema_unet.parameters(),
            model_cls=UNet2DConditionModel,
            model_config=ema_unet.config,
            foreach=args.foreach_ema,
        )

    if args.enable_xformers_memory_efficient_attention:
        if not is_xformers_available():
            raise TrainingError(
                "xformers is not available. Install it, or drop the flag (PyTorch SDPA is used)."
            )
        unet.enable_xformers_memory_efficient_attention()

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if args.use_ema:
                ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
            # FSDP and DeepSpeed save the sharded model themselves, every rank its part (and load it back
            # before the load hook runs, which then sees no model).
            if sharded_engine(accelerator):
                return
            for model in models:
                if args.use_lora:
                    save_lora(
                        accelerator.unwrap_model(model, keep_torch_compile=False), output_dir, family=family
                    )
                else:
                    accelerator.unwrap_model(model, keep_torch_compile=False).save_pretrained(
                        os.path.join(output_dir, "unet")
                    )
                # make sure to pop weight so that corresponding model is not saved again
                if weights:
                    weights.pop()

    def load_model_hook(models, input_dir):
        if args.use_ema:
            load_model = EMAModel.from_pretrained(
                os.path.join(input_dir, "unet_ema"), UNet2DConditionModel, foreach=args.foreach_ema
            )
            ema_unet.load_state_dict(load_model.state_dict())
            if args.offload_ema:
                ema_unet.pin_memory()
            else:
                ema_unet.to(accelerator.device)
            del load_model

        for _ in range(len(models)):
            model = accelerator.unwrap_model(models.pop(), keep_torch_compile=False)
            if args.use_lora:
                from peft.utils import set_peft_model_state_dict

                lora_state_dict, _ = family.pipeline_class().lora_state_dict(input_dir)
                unet_state_dict = {
                    k.replace("unet.", "", 1): v for k, v in lora_state_dict.items() if k.startswith("unet.")
                }
                incompatible = set_peft_model_state_dict(
                    model, convert_unet_state_dict_to_peft(unet_state_dict), adapter_name="default"
                )
                if incompatible is not None and getattr(incompatible, "unexpected_keys", None):
                    raise TrainingError(
                        f"Checkpoint {input_dir} has unexpected LoRA keys: {incompatible.unexpected_keys}"
                    )
                if accelerator.mixed_precision == "fp16":
                    cast_training_params(model, dtype=torch.float32)
            else:
                load_model = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.register_to_config(**load_model.config)
                model.load_state_dict(load_model.state_dict())
                del load_model

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    # Enable TF32 for faster training on Ampere GPUs,
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    if args.scale_lr:
        args.learning_rate = (
            args.learning_rate
            * args.gradient_accumulation_steps
            * args.train_batch_size
            * accelerator.num_processes
        )

    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainingError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from e
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW

    # A list, not a generator: the same parameters are clipped every step (a generator would be exhausted by
    # the optimizer's constructor and clipping would silently do nothing).
    params_to_optimize = [p for p in unet.parameters() if p.requires_grad]
    optimizer = optimizer_cls(
        params_to_optimize,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        **({} if args.use_8bit_adam else fused_adamw_kwargs(accelerator.device)),
    )

    # Get the dataset: its columns, captions and identities, read as the index and evaluation tools read them.
    with accelerator.main_process_first():
        data = load_training_data(**data_flags(args), max_train_samples=args.max_train_samples, seed=seed)
    data_fingerprint = data.fingerprint()
    run_record = run_settings(
        args,
        seed=seed,
        data_fingerprint=data_fingerprint,
        num_processes=accelerator.num_processes,
        base_model=base_model_fingerprint(args.pretrained_model_name_or_path, args.revision),
    )
    if resume_dir is not None:
        check_resume_settings(resume_dir, resume_record, run_record, args.allow_changed_settings)
        if args.resume_from_checkpoint != "latest" and accelerator.is_main_process:
            # An explicitly resumed older checkpoint starts another course of the run: the newer checkpoints
            # of the first course are kept, renamed out of rotation and out of `latest`'s reach.
            for old, new in set_aside_newer_checkpoints(args.output_dir, resume_dir):
                logger.warning(
                    f"Resuming {os.path.basename(os.path.normpath(resume_dir))} while {old} is newer: {old} is "
                    f"kept as {os.path.join(args.output_dir, new)} (never pruned; --resume_from_checkpoint latest "
                    "ignores it). Delete it once you no longer need it."
                )

    # PoGDiff: the objective, the neighbour / density index, the sample order, the captions per epoch and the
    # minority mask, in one object (`pogdiff.trainer`); the rest of main is upstream's.
    pogdiff_run = setup_pogdiff(args, data, data_fingerprint, seed, accelerator)
    train_dataset = TrainDataset(
        data.dataset,
        data.image_column,
        pogdiff_run.row_captions,
        text_encoders.tokenize,
        seed=seed,
        resolution=args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        interpolation=args.image_interpolation_mode,
        cached=args.cache_latents,
        micro_conditioning=family.micro_conditioning,
    )
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        sampler=pogdiff_run.sampler,
        collate_fn=collate_fn,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )

    # Scheduler and math around the number of training steps. The dataloader is sharded across processes, so
    # each process sees ceil(len / num_processes) batches per epoch.
    num_warmup_steps_for_scheduler = args.lr_warmup_steps * accelerator.num_processes
    len_train_dataloader_after_sharding = math.ceil(len(train_dataloader) / accelerator.num_processes)
    num_update_steps_per_epoch = math.ceil(
        len_train_dataloader_after_sharding / args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        num_training_steps_for_scheduler = (
            args.num_train_epochs * num_update_steps_per_epoch * accelerator.num_processes
        )
    else:
        num_training_steps_for_scheduler = args.max_train_steps * accelerator.num_processes

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps_for_scheduler,
        num_training_steps=num_training_steps_for_scheduler,
    )

    # Prepare everything with our `accelerator`.
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )
    # FSDP2 replaces the module's parameters by sharded DTensors (and points the optimizer at them): clipping and
    # the end-of-run checks must read the prepared module's parameters, not the ones collected before.
    sharded = sharded_engine(accelerator)
    params_to_optimize = [p for p in unet.parameters() if p.requires_grad]
    if args.use_ema:
        if args.offload_ema:
            ema_unet.pin_memory()
        else:
            ema_unet.to(accelerator.device)

    text_encoders.to(accelerator.device, dtype=weight_dtype)
    # SDXL's VAE overflows in float16: it stays in float32 (as in diffusers' SDXL script) unless the family
    # says its VAE is safe in half precision.
    half_precision_vae = family.vae_half_precision or args.pretrained_vae_model_name_or_path is not None
    vae.to(accelerator.device, dtype=weight_dtype if half_precision_vae else torch.float32)

    # We need to recalculate our total training steps as the size of the training dataloader may have changed.
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if not isinstance(v, (list, dict))}
        accelerator.init_trackers(args.tracker_project_name, tracker_config)

    # PoGDiff's step inputs: the neighbour forward, the --cache_latents caches and the caption states.
    pogdiff_run.prepare(
        args,
        accelerator,
        accelerator.unwrap_model(unet, keep_torch_compile=False),
        vae,
        text_encoders,
        family,
        train_dataset,
        sharded=sharded,
        compiled=accelerator.state.dynamo_plugin.backend != DynamoBackend.NO,
    )
    accelerator.register_for_checkpointing(pogdiff_run.sample_counter)

    # Train!
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Objective = {args.objective}  (psi terms: {args.psi_terms})")
    logger.info(f"  Num examples = {len(train_dataset)}")
    logger.info(f"  Num Epochs = {args.num_train_epochs}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch_size}")
    logger.info(f"  Gradient Accumulation steps = {args.gradient_accumulation_steps}")
    logger.info(f"  Total optimization steps = {args.max_train_steps}")
    global_step = 0
    first_epoch = 0

    # Potentially load in the weights and states from a previous save (chosen and checked at the start)
    resume_batches = 0
    if args.resume_from_checkpoint:
        if resume_dir is None:
            logger.info(f"No checkpoint found in {args.output_dir}; starting a new training run.")
            args.resume_from_checkpoint = None
        else:
            logger.info(f"Resuming from checkpoint {resume_dir}")
            accelerator.load_state(resume_dir)
            global_step = checkpoint_step(os.path.basename(os.path.normpath(resume_dir)))
            first_epoch = global_step // num_update_steps_per_epoch
            resume_batches = (global_step % num_update_steps_per_epoch) * args.gradient_accumulation_steps
            if global_step >= args.max_train_steps:
                # The loop checks the step budget only after a step: entering it would train one step too many.
                logger.info(
                    f"Checkpoint {os.path.basename(os.path.normpath(resume_dir))} is at step {global_step}, "
                    f"--max_train_steps is {args.max_train_steps}: nothing left to train."
                )
                first_epoch = args.num_train_epochs
    initial_global_step = global_step

    progress_bar = tqdm(
        range(0, args.max_train_steps),
        initial=initial_global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    if args.prediction_type is not None:
        # set prediction_type of scheduler if defined
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)

    validation = Validation(
        args,
        accelerator,
        family,
        {
            "vae": vae,
            "text_encoders": text_encoders,
            "noise_scheduler": noise_scheduler,
            "ema_unet": ema_unet,
        },
        weight_dtype,
        seed,
        data,
    )

    for epoch in range(first_epoch, args.num_train_epochs):
        train_dataset.set_epoch(epoch)
        pogdiff_run.captions.row_text_ids = pogdiff_run.row_captions.ids(epoch)
        train_dataloader.set_epoch(epoch)
        active_dataloader = train_dataloader
        if epoch == first_epoch and resume_batches > 0:
            # Skip (without loading) the batches the checkpointed run had already consumed in this epoch.
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            active_dataloader.set_epoch(epoch)
        step_offset = resume_batches if epoch == first_epoch else 0
        train_loss = 0.0
        step_means = StepMeans()
        for step, batch in enumerate(active_dataloader, start=step_offset):
            # All randomness of this micro-batch comes from generators keyed by (seed, epoch, step, rank).
            step_seed = derive_seed(seed, epoch, step, accelerator.process_index)
            # Two streams keyed apart: on the CPU two generators with the same seed would hand the neighbour /
            # caption-dropout draws the very uniforms the noise and the VAE posterior sample are made from.
            cpu_generator = torch.Generator().manual_seed(derive_seed(step_seed, 1))
            generator = torch.Generator(device=accelerator.device).manual_seed(step_seed)
            with accelerator.accumulate(unet):
                # Latents, noise, timesteps, x_t, text states and target, as upstream does them, from this
                # step's generators (and from the latent cache / with caption dropout when asked).
                inputs = noised_batch(
                    batch,
                    vae=vae,
                    noise_scheduler=noise_scheduler,
                    captions=pogdiff_run.captions,
                    generator=generator,
                    cpu_generator=cpu_generator,
                    weight_dtype=weight_dtype,
                    latent_cache=pogdiff_run.latent_cache,
                    noise_offset=args.noise_offset,
                    input_perturbation=args.input_perturbation,
                    caption_dropout_prob=args.caption_dropout_prob,
                )
                pogdiff_run.sample_counter.update(inputs.rows)

                if args.dream_training:
                    inputs.noisy_latents, inputs.target = compute_dream_and_update_latents(
                        unet,
                        noise_scheduler,
                        inputs.timesteps,
                        inputs.noise,
                        inputs.noisy_latents,
                        inputs.target,
                        inputs.encoder_hidden_states.hidden_states,  # SD only (refused for SDXL at start)
                        args.dream_detail_preservation,
                    )

                # PoGDiff: the objective's forward(s) and loss, where upstream has `unet(...)` and the MSE.
                loss, logs = objective_step(
                    pogdiff_run.settings,
                    unet,
                    inputs,
                    noise_scheduler=noise_scheduler,
                    captions=pogdiff_run.captions,
                    generator=cpu_generator,
                    index=pogdiff_run.index,
                    num_rows=len(train_dataset),
                    minority=pogdiff_run.minority,
                    neighbor_forward=pogdiff_run.neighbor_forward,
                    # A sharded model needs the same forwards on every rank (DDP does not: it skips per rank).
                    any_rank=functools.partial(any_process, accelerator=accelerator) if sharded else None,
                )
                step_means.update(logs)

                # Gather the losses across all processes for logging (if we use distributed training).
                avg_loss = accelerator.gather(loss.detach().repeat(args.train_batch_size)).mean()
                train_loss = train_loss + avg_loss / args.gradient_accumulation_steps

                # Backpropagate
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            # Checks if the accelerator has performed an optimization step behind the scenes
            if accelerator.sync_gradients:
                # The step's one host sync: the loss is read here, checked before EMA, logs or checkpoints use
                # the weights it produced.
                step_loss = float(train_loss)
                if not math.isfinite(step_loss):
                    raise TrainingError(
                        f"Non-finite loss ({step_loss}) at step {global_step + 1} (epoch {epoch}, batch {step}). "
                        "Nothing was saved for this step; the last checkpoint in output_dir is intact. Lower "
                        "--learning_rate, try --mixed_precision bf16 instead of fp16, or check the data."
                    )
                if args.use_ema:
                    if args.offload_ema:
                        ema_unet.to(device=accelerator.device, non_blocking=True)
                    ema_unet.step(unet.parameters())
                    if args.offload_ema:
                        ema_unet.to(device="cpu", non_blocking=True)
                progress_bar.update(1)
                global_step += 1
                accelerator.log(
                    {"train_loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], **step_means.pop()},
                    step=global_step,
                )
                train_loss = 0.0
                progress_bar.set_postfix(step_loss=step_loss, lr=lr_scheduler.get_last_lr()[0])

                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(
                        accelerator,
                        args.output_dir,
                        global_step,
                        run_record,
                        args.checkpoints_total_limit,
                    )

                if args.validation_steps is not None and global_step % args.validation_steps == 0:
                    validation(unet, global_step)

            if global_step >= args.max_train_steps:
                break

        if args.validation_prompts and (epoch + 1) % args.validation_epochs == 0:
            validation(unet, global_step)

    # Data parallelism must leave every rank with the same weights; a cheap check catches silent divergence.
    # (A sharded engine keeps one copy of each parameter, spread over the ranks: there is nothing to compare.)
    accelerator.wait_for_everyone()
    if not sharded:
        checksum = torch.stack([p.detach().double().sum() for p in params_to_optimize]).sum().reshape(1)
        checksums = accelerator.gather(checksum.to(accelerator.device)).tolist()
        logger.info(f"Trainable-parameter checksum per rank: {checksums}")
        if len(set(checksums)) > 1:
            raise TrainingError(
                f"Ranks ended with different weights (checksums {checksums}); please report this."
            )

    report_pogdiff_run(args, pogdiff_run, accelerator)

    # Create the pipeline using the trained modules and save it (a sharded model is gathered by every rank).
    unet = full_model(accelerator, unet, UNet2DConditionModel)
    if accelerator.is_main_process:
        if args.use_ema:
            ema_unet.copy_to(unet.parameters())
        # Saved whole or not at all, replacing any previous result (`save_result_atomically`).
        if args.use_lora:
            webui_name = f"{Path(args.output_dir).name}.safetensors"
            save_result_atomically(
                lambda folder: save_lora(unet, folder, webui_name=webui_name, family=family), args.output_dir
            )
        else:
            # Reload the frozen parts from the base in full precision; saved as the family's diffusers pipeline
            # (StableDiffusionPipeline, StableDiffusionXLPipeline) so plain diffusers loads it.
            pipeline = family.pipeline_class().from_pretrained(
                args.pretrained_model_name_or_path,
                unet=unet,
                revision=args.revision,
                variant=args.variant,
                # --pretrained_vae_model_name_or_path: the VAE the run trained with is the result's VAE.
                **({"vae": load_vae(args)} if args.pretrained_vae_model_name_or_path else {}),
                **dict(family.pipeline_kwargs),
            )
            save_result_atomically(pipeline.save_pretrained, args.output_dir)

        # The model as saved (EMA weights already copied in); a validation of this very step is reused.
        samples = validation(unet, global_step, swap_ema=False, model=unet) if validation.prompts else []
        save_pipeline_code(args.output_dir, Path(__file__).with_name("pipeline_pogdiff.py"), family)
        # evaluate_pogdiff.py and `python -m pogdiff_run.index --from_run` read the resolution and index settings here.
        save_run_settings(args.output_dir, global_step, run_record)
        repo_name = args.hub_model_id or Path(args.output_dir).name
        save_model_card(
            args,
            repo_id if args.push_to_hub else repo_name,
            [(prompt.prompt, images[0]) for prompt, images in zip(validation.prompts, samples)],
            args.output_dir,
            pogdiff_run.index_summary,
            seed,
            family=family,
        )
        if args.push_to_hub:
            upload_folder(
                repo_id=repo_id,
                folder_path=args.output_dir,
                commit_message="End of training",
                ignore_patterns=HUB_IGNORE_PATTERNS,
                token=args.hub_token,
            )
    # Ranks reach the teardown together: a rank tearing down gloo while the main process is still saving can hang.
    accelerator.wait_for_everyone()
    # The process group is destroyed by `run`, once this frame (and with it every DDP wrapper) is gone.
    accelerator.free_memory()
    if output_lock is not None:
        output_lock.release()
    return accelerator


def run(input_args: list[str] | None = None) -> None:
    """Entry point: problems the user must fix are reported as one message and a non-zero exit.

    Teardown order matters with several processes. A DDP model's C++ reducer holds a reference to the process
    group and is freed with the GIL held; if it drops the group's *last* reference, gloo's destructor joins its
    worker threads under the GIL while a worker may need the GIL to free a finished collective's tensors: a
    deadlock at exit (seen in CI). So `main` returns with its models released while the group is still
    registered, and only then is the group destroyed (`end_training`), through torch's binding that frees it
    with the GIL released.
    """
    args = parse_args(input_args)
    accelerator, message = None, None
    try:
        accelerator = main(args)
    # The project's own error type only (TrainingError is one): any other exception is a bug and stays loud.
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("POGDIFF_TRACEBACK"):
            raise
        message = user_error_message("train_pogdiff.py", e)
    # Leaving the except clause dropped the traceback and with it main's frame; collect any reference cycle
    # that still holds a model before the process group goes.
    gc.collect()
    if accelerator is not None:
        accelerator.end_training()
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        PartialState().destroy_process_group()
    if message is not None:
        print(message, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
