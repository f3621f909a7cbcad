"""Evaluate fine-tuned Stable Diffusion models per identity: DINO score, gRecall, per-identity FID.

For every identity of the training data and every ``--model NAME=PATH``, the script generates
``--images_per_identity`` images from the prompt "An image of {name}." (paper App. C; DDIM, 50 steps),
embeds them and the real images with one feature extractor, and reports (paper Sec. 4.1):

- DINO score: mean cosine between generated and real images of the identity;
- gRecall: the share of the identity's training images that some generated image reproduces
  (cosine >= ``--grecall_threshold``);
- FID: Fréchet distance between generated and real images of the identity;

each averaged over all identities ("All") and over identities with at most ``--few_shot_max``
training images ("Few"). Real images for DINO/FID are held-out images (``--reference_data_dir``, or
the dataset's ``reference`` split) when there are any, else the training images.

Outputs in ``--output_dir``: generated PNGs (``<model>/<identity>/NNN.png``; existing ones are reused,
so a rerun with other metric settings costs no generation), ``metrics.json`` (every number, per
identity too), ``metrics.md`` (the table), a grid per identity under ``grids/`` and
``grid_few_shot.png``. Example::

    python evaluate_pogdiff.py --model vanilla=out/vanilla --model pogdiff=out/pogdiff \\
        --train_data_dir agedb-it2i-s --images_per_identity 20 --output_dir eval/agedb-s
"""

from __future__ import annotations

# First: importing pogdiff quiets transformers' torchvision-fallback notice before diffusers triggers it.
import pogdiff  # noqa: F401

# isort: split
import argparse
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipeline_pogdiff import PoGDiffPipeline
from pogdiff.arguments import show_defaults
from pogdiff.checkpointing import recorded_run_settings, training_resolution
from pogdiff.data import (
    data_flags,
    identity_labels,
    load_image_text_dataset,
    load_rgb,
    load_training_data,
    resolve_columns,
    row_image_loader,
    sidecar_caption_extension,
)
from pogdiff.errors import UserError, model_load_message, report_user_errors
from pogdiff.features import DEFAULT_FEATURE_EXTRACTOR, centre_on, get_feature_extractor
from pogdiff.identities import shot_split
from pogdiff.metrics import aggregate_metrics, identity_metrics, markdown_table
from pogdiff.seeds import image_seed

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger("evaluate_pogdiff")

# Settings that change what a generated image looks like: reused images must have been made with them.
# Few-shot = at most this many training images, when neither the flag nor the models' run records say.
DEFAULT_FEW_SHOT_MAX = 2
GENERATION_KEYS = ("model", "num_inference_steps", "guidance_scale", "resolution", "seed", "mixed_precision")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="A model to evaluate: NAME (a folder name in the results) = a train_pogdiff.py output_dir, a LoRA "
        "folder or a Hub id. Repeat for several models.",
    )
    data = parser.add_argument_group("data (as in train_pogdiff.py)")
    data.add_argument("--dataset_name", default=None)
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None)
    data.add_argument("--cache_dir", default=None)
    data.add_argument("--image_column", default=None)
    data.add_argument("--caption_column", default=None)
    data.add_argument("--identity_column", default="identity")
    data.add_argument(
        "--caption_extension",
        default=None,
        help="Read --train_data_dir as a kohya-style folder (captions in sidecar files with this extension, "
        "identities from sub-folder names without kohya's N_ repeats prefix), as train_pogdiff.py does.",
    )
    data.add_argument(
        "--reference_data_dir",
        default=None,
        help="Held-out real images (imagefolder with an identity column) for DINO and FID. Default: the "
        "dataset's 'reference' split when it has one, else the training images.",
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument("--images_per_identity", type=int, default=20)
    gen.add_argument("--num_inference_steps", type=int, default=50)
    gen.add_argument("--guidance_scale", type=float, default=7.5)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--batch_size", type=int, default=8, help="Images per pipeline call and per feature batch."
    )
    gen.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Size of the generated images. Default: the --resolution each model was trained at (the "
        "pogdiff_run.json train_pogdiff.py writes), else the model's own size (UNet sample_size x VAE scale factor).",
    )
    gen.add_argument(
        "--prompt_template",
        default="An image of {name}.",
        help="Prompt per identity; {name} is the identity.",
    )
    gen.add_argument(
        "--prompt_from",
        choices=("template", "caption"),
        default="template",
        help="caption: use the identity's first training caption instead of --prompt_template.",
    )
    met = parser.add_argument_group("metrics")
    met.add_argument(
        "--feature_extractor",
        default=DEFAULT_FEATURE_EXTRACTOR,
        help="dinov2 (= facebook/dinov2-base) or another Hugging Face id/folder, face (dlib), pixels (offline, "
        "tests only) or module:function.",
    )
    met.add_argument("--grecall_threshold", type=float, default=0.7)
    met.add_argument("--grecall_rule", choices=("nearest", "any"), default="nearest")
    met.add_argument(
        "--few_shot_max",
        type=int,
        default=None,
        help=f"Identities with at most this many training images are few-shot. Default: the models' training "
        f"--few_shot_max (their pogdiff_run.json), else {DEFAULT_FEW_SHOT_MAX}.",
    )
    met.add_argument("--grid_columns", type=int, default=8, help="Images per row in the grids.")
    parser.add_argument("--output_dir", default="pogdiff-eval")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    show_defaults(parser)
    args = parser.parse_args(argv)
    if args.images_per_identity < 1 or args.batch_size < 1:
        parser.error("--images_per_identity and --batch_size must be >= 1.")
    if args.prompt_from == "template" and "{name}" not in args.prompt_template:
        parser.error(f"--prompt_template {args.prompt_template!r} has no {{name}} for the identity.")
    return args


def parse_models(specs: Sequence[str]) -> dict[str, str]:
    """``["a=path", ...]`` -> ``{"a": "path"}``; names become folder names, so they must be plain."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in {".", ".."}:
            raise UserError(
                f"--model {spec!r} must look like NAME=PATH_OR_HUB_ID, with NAME made of letters, digits, '.', "
                "'_' or '-' (it names the results folder), e.g. --model pogdiff=outputs/pogdiff."
            )
        if name in models:
            raise UserError(f"--model name {name!r} is given twice; give each model its own name.")
        models[name] = path
    return models


def settings_from_models(args: argparse.Namespace, models: dict[str, str]) -> None:
    """Fills `--resolution` and `--few_shot_max` when not given, from what the models were trained with.

    The resolution is each model's training --resolution (its run record), else its own size; models that
    disagree are an error (their images would not be comparable). A fixed 512 would make a small model generate
    for hours at a size it never saw.

    Raises:
        UserError: a model's size cannot be read, or the models disagree and no --resolution was given.
    """
    if args.resolution is None:
        sizes = {}
        for name, path in models.items():
            size, source = training_resolution(path)
            if size is None:
                is_model = any(
                    os.path.isfile(os.path.join(path, f))
                    for f in ("model_index.json", "pytorch_lora_weights.safetensors")
                )
                if not is_model:
                    # Not a model at all (a missing folder, a wrong Hub id): what loading it would have said.
                    raise UserError(model_load_message(f"--model {name}:", path, OSError(source)))
                raise UserError(
                    f"--model {name}={path}: could not tell the size to generate at ({source}); pass --resolution."
                )
            logger.info("%s: %d px (%s).", name, size, source)
            sizes[name] = size
        if len(set(sizes.values())) > 1:
            found = ", ".join(f"{name} {size} px" for name, size in sizes.items())
            raise UserError(
                f"The models have different resolutions ({found}); pass --resolution to generate all at one size."
            )
        args.resolution = next(iter(sizes.values()))
    if args.few_shot_max is None:
        recorded = {
            settings.get("--few_shot_max")
            for settings, _ in filter(None, (recorded_run_settings(path) for path in models.values()))
        }
        args.few_shot_max = (
            recorded.pop() if len(recorded) == 1 and None not in recorded else DEFAULT_FEW_SHOT_MAX
        )


def folder_name(identity: str) -> str:
    """A file-system-safe, collision-free folder name for an identity."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", identity) and identity not in {".", ".."}:
        return identity
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", identity).strip("._")[:60]
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


class RealImages:
    """The images of a dataset grouped by identity, loaded lazily (one batch at a time)."""

    def __init__(self, dataset, image_column: str, labels: list[str], captions: list[str]):
        self.image = row_image_loader(dataset, image_column, where="the real images")
        self.captions = captions
        self.by_identity: dict[str, list[int]] = {}
        for row, identity in enumerate(labels):
            self.by_identity.setdefault(identity, []).append(row)

    def load(self, rows: Sequence[int]) -> list[Image.Image]:
        return [self.image(row) for row in rows]


def load_real_images(args: argparse.Namespace, split: str) -> RealImages:
    dataset = load_image_text_dataset(
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        cache_dir=args.cache_dir,
        split=split,
        caption_extension=args.caption_extension,
    )
    return _grouped(dataset, args)


def _grouped(dataset, args: argparse.Namespace) -> RealImages:
    image_col, caption_col, identity_col = resolve_columns(
        dataset.column_names, args.image_column, args.caption_column, args.identity_column
    )
    labels = identity_labels(dataset, identity_col, caption_col)
    captions = [str(c) for c in dataset.with_format(None)[caption_col][:]]
    return RealImages(dataset, image_col, labels, captions)


def load_reference_images(args: argparse.Namespace) -> tuple[RealImages | None, str]:
    """Held-out real images and a description of where they came from; ``None`` when there are none."""
    if args.reference_data_dir is not None:
        # A folder written by `python -m pogdiff.data build` marks held-out rows with split == reference;
        # any other imagefolder is held out as a whole.
        folder = args.reference_data_dir
        # A kohya-style reference folder is read like the training folder (--caption_extension); one with
        # imagefolder metadata as an imagefolder.
        caption_extension = args.caption_extension if sidecar_caption_extension(folder) else None
        try:
            dataset = load_image_text_dataset(
                train_data_dir=folder,
                cache_dir=args.cache_dir,
                split="reference",
                caption_extension=caption_extension,
            )
            return _grouped(dataset, args), f"{folder} (its reference rows)"
        except ValueError:
            dataset = load_image_text_dataset(
                train_data_dir=folder, cache_dir=args.cache_dir, caption_extension=caption_extension
            )
            return _grouped(dataset, args), folder
    try:
        return load_real_images(args, "reference"), "reference split"
    except ValueError:
        return None, "the training images (no held-out images)"


def extract_features(
    extractor: Callable[[list[Image.Image]], torch.Tensor],
    load: Callable[[Sequence[Any]], list[Image.Image]],
    items: Sequence[Any],
    batch_size: int,
    desc: str,
) -> torch.Tensor:
    """Features of ``items`` (rows or paths), loading only one batch of images at a time."""
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return torch.cat([extractor(load(chunk)) for chunk in tqdm(chunks, desc=desc, leave=False)])


def generation_settings(args: argparse.Namespace, model_path: str, prompts: dict[str, str]) -> dict[str, Any]:
    return {
        "model": model_path,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "seed": args.seed,
        "mixed_precision": args.mixed_precision,
        "prompts": prompts,
    }


def check_reusable(settings_path: Path, settings: dict[str, Any]) -> None:
    """Refuses to mix images made with other settings into one evaluation."""
    if not settings_path.is_file():
        return
    saved = json.loads(settings_path.read_text(encoding="utf-8"))
    changed = [key for key in GENERATION_KEYS if saved.get(key) != settings[key]]
    changed += [
        f"prompt of {name!r}"
        for name, prompt in settings["prompts"].items()
        if saved["prompts"].get(name, prompt) != prompt
    ]
    if changed:
        raise UserError(
            f"{settings_path.parent} holds images generated with other settings ({', '.join(changed)} differ from "
            f"{settings_path}). Use another --output_dir or --model name, or delete that folder to regenerate."
        )


def generate_images(
    name: str,
    model_path: str,
    prompts: dict[str, str],
    args: argparse.Namespace,
    output_dir: Path,
) -> dict[str, list[Path]]:
    """Generates the images of one model that are not on disk yet; returns every image path per identity."""
    settings = generation_settings(args, model_path, prompts)
    model_dir = output_dir / name
    settings_path = model_dir / "generation.json"
    check_reusable(settings_path, settings)
    paths = {
        identity: [
            model_dir / folder_name(identity) / f"{i:03d}.png" for i in range(args.images_per_identity)
        ]
        for identity in prompts
    }
    todo = [
        (identity, i)
        for identity, files in paths.items()
        for i, path in enumerate(files)
        if not path.is_file()
    ]
    total = len(prompts) * args.images_per_identity
    if not todo:
        logger.info("%s: reusing the %d images in %s (nothing to generate).", name, total, model_dir)
        return paths
    logger.info(
        "%s: generating %d of %d images (%d already on disk).", name, len(todo), total, total - len(todo)
    )

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    # As in diffusers' training scripts: the safety checker is not part of the fine-tuned model, and a false
    # positive (a black image) would count as a failed generation.
    try:
        pipe = PoGDiffPipeline.from_pretrained(model_path, dtype=dtype, safety_checker=None).to(args.device)
    except (OSError, ValueError) as error:
        # PoGDiffPipeline stays standalone (custom_pipeline-loadable), so its errors are plain ValueErrors.
        raise UserError(model_load_message(f"--model {name}:", model_path, error)) from error
    pipe.set_progress_bar_config(disable=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    settings_path.write_text(json.dumps(settings, indent=1, ensure_ascii=False), encoding="utf-8")
    batches = [todo[i : i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    for batch in tqdm(batches, desc=f"Generating ({name})"):
        # One CPU generator per image: the noise of an image does not depend on the batch it lands in or
        # on the device.
        images = pipe(
            prompt=[prompts[identity] for identity, _ in batch],
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=[
                torch.Generator().manual_seed(image_seed(args.seed, identity, i)) for identity, i in batch
            ],
        ).images
        for (identity, i), image in zip(batch, images):
            path = paths[identity][i]
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: an interrupted run leaves no truncated PNG that a rerun would reuse.
            partial = path.with_suffix(".partial")
            image.save(partial, format="PNG")
            os.replace(partial, path)
    return paths


def open_images(paths: Sequence[Path]) -> list[Image.Image]:
    return [load_rgb(str(path)) for path in paths]


def _show_row(axes_row, images: Sequence[Image.Image | None], label: str) -> None:
    for column, axis in enumerate(axes_row):
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
        if column < len(images) and images[column] is not None:  # None: a gap between groups
            axis.imshow(np.asarray(images[column]))
    axes_row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)


def save_grid(
    path: Path,
    rows: list[tuple[str, list[Image.Image | None]]],
    title: str,
    columns: int,
    column_labels: Sequence[str] | None = None,
    group_sizes: Sequence[int] | None = None,
) -> None:
    """A figure with one labelled row of images per entry of ``rows`` (a None image leaves its cell empty); with
    ``column_labels`` a label above each column, with ``group_sizes`` (columns per group, e.g. training images then
    each model) a gap between consecutive groups so they read apart. The figure's size depends only on the counts."""
    columns = max(1, min(columns, max((len(images) for _, images in rows), default=1)))
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(1.3 * columns + 1.6, 1.3 * len(rows) + 0.5), squeeze=False
    )
    for axes_row, (label, images) in zip(axes, rows):
        _show_row(axes_row, images[:columns], label)
    for axis, column_label in zip(axes[0], column_labels or ()):
        axis.set_title(column_label, fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    if group_sizes and len(group_sizes) > 1 and sum(group_sizes) == columns:
        # Narrow every cell a little to open a gap of a third of a cell between groups, within the same figure.
        left, right = axes[0][0].get_position().x0, axes[0][-1].get_position().x1
        gap = (right - left) / columns / 3
        width = (right - left - gap * (len(group_sizes) - 1)) / columns
        group_of = [g for g, size in enumerate(group_sizes) for _ in range(size)]
        for axes_row in axes:
            for column, axis in enumerate(axes_row):
                box = axis.get_position()
                axis.set_position([left + column * width + group_of[column] * gap, box.y0, width, box.height])
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models = parse_models(args.model)
    settings_from_models(args, models)
    output_dir = Path(args.output_dir)

    # ---- Real images: training set (gRecall) and held-out reference (DINO, FID). The training set is read as the
    # trainer reads it (`load_training_data`): the same identities, and each row's first caption as its prompt.
    data = load_training_data(**data_flags(args))
    train = RealImages(data.dataset, data.image_column, data.identities, data.texts)
    reference, real_source = load_reference_images(args)
    identities = sorted(train.by_identity)
    train_counts = {identity: len(train.by_identity[identity]) for identity in identities}
    split = shot_split(train_counts, args.few_shot_max)
    if args.prompt_from == "caption":
        prompts = {identity: train.captions[train.by_identity[identity][0]] for identity in identities}
    else:
        prompts = {identity: args.prompt_template.format(name=identity) for identity in identities}
    seeds = {
        identity: [image_seed(args.seed, identity, i) for i in range(args.images_per_identity)]
        for identity in identities
    }

    extractor = get_feature_extractor(args.feature_extractor, device=args.device, batch_size=args.batch_size)
    train_rows = [row for identity in identities for row in train.by_identity[identity]]
    train_feats = extract_features(extractor, train.load, train_rows, args.batch_size, "Features (train)")
    train_by_id = dict(zip(identities, torch.split(train_feats, [train_counts[i] for i in identities])))
    real_by_id, real_feats = train_by_id, [train_feats]
    if reference is not None:
        ref_ids = [identity for identity in identities if identity in reference.by_identity]
        ref_rows = [row for identity in ref_ids for row in reference.by_identity[identity]]
        if ref_rows:
            ref_feats = extract_features(
                extractor, reference.load, ref_rows, args.batch_size, "Features (reference)"
            )
            sizes = [len(reference.by_identity[identity]) for identity in ref_ids]
            real_by_id = dict(zip(ref_ids, torch.split(ref_feats, sizes)))
            real_feats.append(ref_feats)
        else:
            real_by_id = {}
    real_mean = None
    if extractor.centre_on_real:
        # Raw vectors of such extractors share one dominant direction; remove it so cosine separates images.
        real_mean = torch.cat(real_feats).mean(0)
        real_by_id = {i: centre_on(f, real_mean) for i, f in real_by_id.items()}
        train_by_id = {i: centre_on(f, real_mean) for i, f in train_by_id.items()}

    # ---- Per model: generate (or reuse), embed, score.
    results: dict[str, Any] = {}
    generated_paths: dict[str, dict[str, list[Path]]] = {}
    for name, model_path in models.items():
        paths = generate_images(name, model_path, prompts, args, output_dir)
        generated_paths[name] = paths
        flat = [path for identity in identities for path in paths[identity]]
        gen_feats = extract_features(extractor, open_images, flat, args.batch_size, f"Features ({name})")
        gen_by_id = dict(zip(identities, torch.split(gen_feats, args.images_per_identity)))
        per_identity = {}
        for identity in identities:
            gen = gen_by_id[identity] if real_mean is None else centre_on(gen_by_id[identity], real_mean)
            per_identity[identity] = identity_metrics(
                gen,
                train_by_id[identity],
                real_by_id.get(identity),
                args.grecall_threshold,
                args.grecall_rule,
            )
        results[name] = {
            "path": model_path,
            "summary": aggregate_metrics(per_identity, split),
            "per_identity": per_identity,
        }

    report = {
        "feature_extractor": extractor.name,
        "feature_extractor_stats": extractor.stats(),
        "centred_on_real_mean": real_mean is not None,
        "real_images_for_dino_fid": real_source,
        "grecall_threshold": args.grecall_threshold,
        "grecall_rule": args.grecall_rule,
        "few_shot_max": args.few_shot_max,
        "generation": {
            "images_per_identity": args.images_per_identity,
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "resolution": args.resolution,
            "seed": args.seed,
            "scheduler": "DDIM",
            "mixed_precision": args.mixed_precision,
        },
        "split": split,
        "identities": {
            identity: {
                "n_train": train_counts[identity],
                "n_real": int(len(real_by_id.get(identity, ()))),
                "prompt": prompts[identity],
                "folder": folder_name(identity),
                "seeds": seeds[identity],
            }
            for identity in identities
        },
        "models": results,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(
        json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8"
    )
    markdown = format_report(report)
    (output_dir / "metrics.md").write_text(markdown, encoding="utf-8")
    save_grids(output_dir, identities, split["few"], train, generated_paths, args.grid_columns)
    print(markdown)
    return report


def format_report(report: dict[str, Any]) -> str:
    """metrics.md: the settings in one paragraph, the table, and what is missing and why."""
    split, gen = report["split"], report["generation"]
    centred = " (centred on the real images' mean)" if report["centred_on_real_mean"] else ""
    stats = ", ".join(f"{key} {value}" for key, value in report["feature_extractor_stats"].items())
    lines = [
        "# PoGDiff evaluation",
        "",
        f"{len(split['all'])} identities, {len(split['few'])} few-shot (<= {report['few_shot_max']} training images). "
        f"{gen['images_per_identity']} images per identity, DDIM {gen['num_inference_steps']} steps, guidance "
        f"{gen['guidance_scale']}, {gen['resolution']} px, seed {gen['seed']}. Features: "
        f"`{report['feature_extractor']}`{centred}. gRecall: threshold {report['grecall_threshold']}, rule "
        f"`{report['grecall_rule']}`. Real images for DINO and FID: {report['real_images_for_dino_fid']}. "
        "Each metric is averaged over identities."
        + (f" Feature extractor counts: {stats}." if stats else ""),
        "",
        markdown_table({name: result["summary"] for name, result in report["models"].items()}),
    ]
    missing_lines = []
    for name, result in report["models"].items():
        for metric, entry in result["summary"].items():
            if entry["missing"]:
                reasons = sorted(set(entry["missing"].values()))
                missing_lines.append(
                    f"- {name}: {metric} missing for {len(entry['missing'])} identities ({'; '.join(reasons)})"
                )
    if missing_lines:
        lines += ["", "Left out of the means:", *missing_lines]
    return "\n".join(lines) + "\n"


def save_grids(
    output_dir: Path,
    identities: list[str],
    few_shot: list[str],
    train: RealImages,
    generated_paths: dict[str, dict[str, list[Path]]],
    columns: int,
) -> None:
    """A grid per identity (training images, then each model's images) and an overview of few-shot identities."""
    for identity in tqdm(identities, desc="Grids", leave=False):
        rows = [("train", train.load(train.by_identity[identity][:columns]))]
        rows += [(name, open_images(paths[identity][:columns])) for name, paths in generated_paths.items()]
        save_grid(
            output_dir / "grids" / f"{folder_name(identity)}.png",
            rows,
            identity_grid_title(identity, len(train.by_identity[identity]), identity in few_shot),
            columns,
        )
    if not few_shot:
        logger.info("No few-shot identities: grid_few_shot.png not written.")
        return
    # Overview: a row per few-shot identity, its training images then a few images of every model.
    images_per_identity = len(next(iter(generated_paths.values()))[few_shot[0]])
    per_model = min(images_per_identity, max(1, math.ceil(columns / len(generated_paths))))
    num_train = max(len(train.by_identity[identity]) for identity in few_shot)
    groups = [("train", num_train)] + [(name, per_model) for name in generated_paths]
    rows = []
    for identity in few_shot:
        cells = {"train": train.load(train.by_identity[identity])}
        cells.update(
            {name: open_images(paths[identity][:per_model]) for name, paths in generated_paths.items()}
        )
        rows.append((f"{identity} ({len(cells['train'])})", few_shot_grid_row(groups, cells)))
    title = "few-shot identities (number of training images): training images, then " + ", ".join(
        f"{per_model} x {name}" for name in generated_paths
    )
    save_grid(
        output_dir / "grid_few_shot.png",
        rows,
        title,
        sum(width for _, width in groups),
        few_shot_grid_columns(groups),
        [width for _, width in groups],
    )


def identity_grid_title(identity: str, num_train: int, few_shot: bool) -> str:
    """The title of an identity's grid: who, and how many training images it had (the number that matters)."""
    kind = "few-shot" if few_shot else "majority"
    return f"{identity}: {num_train} training image{'s' if num_train != 1 else ''} ({kind})"


def few_shot_grid_columns(groups: Sequence[tuple[str, int]]) -> list[str]:
    """Column labels of the few-shot overview: each group's name (`train`, then each model) over its first column,
    its other columns unlabelled."""
    labels: list[str] = []
    for name, width in groups:
        labels += [name] + [""] * (width - 1)
    return labels


def few_shot_grid_row(
    groups: Sequence[tuple[str, int]], cells: dict[str, list[Image.Image]]
) -> list[Image.Image | None]:
    """One overview row laid out as `few_shot_grid_columns`: each group's images, padded with None (an empty
    cell) to the group's width, so that a column holds one group whatever an identity's image count."""
    row: list[Image.Image | None] = []
    for name, width in groups:
        images = cells[name][:width]
        row += images + [None] * (width - len(images))
    return row


if __name__ == "__main__":
    report_user_errors("evaluate_pogdiff.py", main)
