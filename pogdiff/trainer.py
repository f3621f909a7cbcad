"""The PoGDiff block of `train_pogdiff.py`: what diffusers' train_text_to_image.py does not have, set up in one
call and reported in one more, so that the script's `main()` keeps upstream's phases where upstream has them.

- `setup_pogdiff` (before the dataloader is built): the objective from the registry and its settings, the neighbour
  and text-density index when the objective or the sampling scheme needs it, the sample order (`EpochSampler`),
  the caption each row trains on per epoch (`RowCaptions`), the minority mask and the sample counter.
- `PoGDiffRun.prepare` (after `accelerator.prepare`): the neighbour forward, the latent and caption caches
  (`--cache_latents`) and the caption states every step reads.
- `report_pogdiff_run` (after training): what the sampler fed the model, per identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.logging import get_logger

from .data import REPEATS_COLUMN, TrainDataset, TrainingData, preprocess_image_and_crop
from .errors import UserError
from .families import Conditioning, ModelFamily, TextEncoders, add_time_ids, cat_conditioning
from .identities import few_shot_rows, shot_split
from .index import build_or_load_index, format_summary, summarize_index
from .objectives import Objective, get_objective
from .sampling import (
    EpochSampler,
    RowCaptions,
    SampleCounter,
    get_sampling_scheme,
    sampling_label,
    with_row_weights,
)
from .training import CaptionStates, ObjectiveSettings, encode_latent_parameters, make_neighbor_forward

logger = get_logger(__name__, log_level="INFO")


@dataclass
class PoGDiffRun:
    """Everything the training loop needs beyond upstream's: built by `setup_pogdiff`, completed by `prepare`."""

    objective: Objective  # the registered objective (`objectives.OBJECTIVES`)
    settings: ObjectiveSettings
    data: TrainingData
    seed: int
    sampling_weight_column: str | None
    index: Any = None  # `index.PoGDiffIndex` when the objective or the sampling scheme needs it
    index_summary: dict | None = None
    row_captions: RowCaptions | None = None
    sampler: EpochSampler | None = None
    minority: torch.Tensor | None = None  # (N,) bool: rows of few-shot identities (PoGDiff's psi logs)
    sample_counter: SampleCounter | None = None
    # Set by `prepare`:
    neighbor_forward: Any = None
    captions: CaptionStates | None = None
    latent_cache: torch.Tensor | None = None
    logs: dict[str, Any] = field(default_factory=dict)

    def prepare(
        self,
        args,
        accelerator,
        unwrapped_unet,
        vae,
        text_encoders: TextEncoders,
        family: ModelFamily,
        train_dataset: TrainDataset,
        *,
        sharded: bool,
        compiled: bool,
    ) -> None:
        """The parts that need the prepared model and the models on their device: the neighbour forward
        (`make_neighbor_forward`), the caches of `--cache_latents` and the caption states."""
        if self.objective.uses_neighbors:
            try:
                self.neighbor_forward = make_neighbor_forward(
                    # The module with accelerate's mixed-precision forward; DDP adds nothing to a no-grad forward.
                    unwrapped_unet,
                    accelerator.device,
                    "eager" if compiled and args.neighbor_forward == "auto" else args.neighbor_forward,
                    sharded=sharded,
                )
            except ValueError as error:
                raise UserError(str(error)) from error

        # Neighbours and CBDM partners are looked up by dataset row: tokens of each distinct caption, once.
        empty_ids = text_encoders.tokenize([""])[0]
        distinct_input_ids = text_encoders.tokenize(self.row_captions.distinct)
        text_cache = None
        if args.cache_latents:
            self.latent_cache, text_cache, train_dataset.cached_time_ids = cache_latents_and_captions(
                args, accelerator, vae, text_encoders, self.data, distinct_input_ids, empty_ids
            )
        self.captions = CaptionStates(
            text_encoders,
            distinct_input_ids,
            self.row_captions.ids(0),  # replaced at every epoch's start
            empty_ids,
            accelerator.device,
            text_cache=text_cache,
        )


def setup_pogdiff(args, data: TrainingData, data_fingerprint: str, seed: int, accelerator) -> PoGDiffRun:
    """The PoGDiff part of a run before its dataloader exists: objective, index, sample order, captions, minority.

    Builds (or loads from the cache in `--index_cache_dir` / `--output_dir`) the index only when the objective or
    the sampling scheme reads it; the main process builds it first, the others then find it cached.
    """
    objective = get_objective(args.objective)
    settings = ObjectiveSettings.from_args(args)
    sampling_weight_column = args.sampling_weight_column
    if args.caption_extension is not None and sampling_weight_column is None:
        # A kohya folder's N_name repeats are its draw weights (as in kohya's scripts); the flag overrides.
        sampling_weight_column = REPEATS_COLUMN
        logger.info(
            f"Kohya-style folder: images are drawn with their folder's repeats (column {REPEATS_COLUMN!r}); "
            "pass --sampling_weight_column to use another column."
        )
    counts = data.identity_counts
    if len(counts) == 1 and (objective.uses_neighbors or args.sampling_power not in (None, 1.0)):
        ((name, count),) = counts.items()
        logger.warning(
            f"The training set has a single identity ({name!r}, {count} images, from {data.source()}): balanced or "
            "sqrt sampling draw uniformly and PoGDiff has no other identity to tell neighbours apart by, so both "
            "act much like vanilla fine-tuning here. If the data shows several identities, check --identity_column."
        )
    logger.info(
        f"{len(data)} training images, {len(counts)} identities "
        f"({len(shot_split(counts, args.few_shot_max)['few'])} with <= {args.few_shot_max} images)."
    )
    run = PoGDiffRun(objective, settings, data, seed, sampling_weight_column)

    # The index holds PoGDiff's neighbours and psi, T2H's text density, and --sampling density's weights.
    scheme = get_sampling_scheme(args.sampling)
    if objective.needs_index or scheme.needs_index:
        if objective.uses_neighbors and args.num_neighbors >= len(data):
            raise UserError(
                f"--num_neighbors {args.num_neighbors} must be smaller than the dataset size ({len(data)} images): "
                "each image needs k other images as neighbours. Lower --num_neighbors."
            )
        from .arguments import index_build_kwargs

        with accelerator.main_process_first():
            run.index = build_or_load_index(
                data.image,
                data.texts,
                data.identities,
                **index_build_kwargs(args),
                seed=seed,
                cache_dir=args.index_cache_dir or args.output_dir,
                fingerprint=data_fingerprint,
                device=accelerator.device,
            )
        run.index_summary = summarize_index(run.index, settings.psi, few_shot_max=args.few_shot_max)
        logger.info("Expected psi per sample (majority vs minority):\n" + format_summary(run.index_summary))
        run.minority = torch.tensor(few_shot_rows(data.identities, counts, args.few_shot_max))

    run.row_captions = RowCaptions(data.captions, seed)
    weights = scheme.weights(data.identities, run.index, args.sampling_power)
    if sampling_weight_column is not None:
        if sampling_weight_column not in data.dataset.column_names:
            raise UserError(
                f"--sampling_weight_column {sampling_weight_column!r} is not a column of the dataset; its "
                f"columns are {data.dataset.column_names}."
            )
        weights = with_row_weights(weights, data.dataset[sampling_weight_column], sampling_weight_column)
    run.sampler = EpochSampler(len(data), seed, weights=weights)
    run.sample_counter = SampleCounter(len(data))
    return run


def cache_latents_and_captions(
    args, accelerator, vae, text_encoders: TextEncoders, data: TrainingData, distinct_input_ids, empty_ids
) -> tuple[torch.Tensor, Conditioning, torch.Tensor]:
    """--cache_latents: the VAE's latent distribution of every row's centre crop, the conditioning of every
    distinct caption plus (last row) the empty prompt, and every row's SDXL time ids of that crop."""
    if any(not isinstance(c, str) for c in data.captions):
        raise UserError(
            "--cache_latents needs one caption per image (some rows hold several); drop the flag."
        )
    time_ids = torch.zeros(len(data), 6)
    image = data.image
    target = (args.resolution, args.resolution)

    def pixels(row: int) -> torch.Tensor:
        values, original_size, crop_top_left = preprocess_image_and_crop(
            image(row), args.resolution, center_crop=True, interpolation=args.image_interpolation_mode
        )
        time_ids[row] = add_time_ids(original_size, crop_top_left, target)
        return values

    latents = encode_latent_parameters(
        vae, pixels, len(data), show_progress=accelerator.is_local_main_process
    )
    with torch.no_grad():
        texts = cat_conditioning(
            [
                text_encoders.encode(ids.to(accelerator.device))
                for ids in torch.cat([distinct_input_ids, empty_ids[None]]).split(64)
            ]
        )
    size = sum(t.numel() * t.element_size() for t in (latents, *texts.tensors()) if t is not None)
    logger.info(
        f"Cached {len(latents)} latent distributions and {len(texts)} caption embeddings ({size / 2**20:.1f} MiB)."
    )
    return latents, texts, time_ids


def report_pogdiff_run(args, run: PoGDiffRun, accelerator) -> dict[str, int]:
    """What the sampler actually fed the model, per identity and summed over ranks (see --sampling): logged, and
    written to `output_dir/sample_counts.json` by the main process. Every rank must call it (a reduction)."""
    drawn = accelerator.reduce(run.sample_counter.counts.to(accelerator.device), reduction="sum").cpu()
    per_identity = run.sample_counter.per_identity(run.data.identities, drawn)
    total = max(sum(per_identity.values()), 1)
    shares = ", ".join(f"{k}={v} ({v / total:.1%})" for k, v in per_identity.items())
    logger.info(f"Samples drawn per identity ({sampling_label(args)}): {shares}")
    if accelerator.is_main_process:
        with open(os.path.join(args.output_dir, "sample_counts.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "sampling": args.sampling,
                    "sampling_power": args.sampling_power,
                    "images_per_identity": run.data.identity_counts,
                    "samples_per_identity": per_identity,
                },
                f,
                indent=2,
            )
    return per_identity


__all__ = ["PoGDiffRun", "setup_pogdiff", "cache_latents_and_captions", "report_pogdiff_run"]
