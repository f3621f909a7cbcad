"""What a training run leaves for people and other tools: the model card, LoRA files (diffusers and kohya/webui
formats), the pipeline code that `custom_pipeline=` loads, using diffusers' and huggingface_hub's helpers, and the
run record (`pogdiff_run.json`) from which `evaluate_pogdiff.py` and `python -m pogdiff.index` take the settings
the run was trained with (resolution, index settings) instead of guessing them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya, make_image_grid
from PIL import Image
from safetensors.torch import save_file

from .checkpointing import RUN_RECORD, RUN_RECORD_FORMAT, base_model_reference, checkpoint_dirs
from .errors import UserError
from .index import format_summary
from .settings import card_rows

logger = get_logger(__name__, log_level="INFO")

# Files in output_dir that are training state, not the model: never uploaded (the run record and the config file
# hold local paths; the model card already states the settings).
HUB_IGNORE_PATTERNS = [
    "step_*", "epoch_*", "checkpoint-*", ".tmp-checkpoint-*", "pogdiff-index-*", ".pogdiff-*.lock", "logs/*",
    "pogdiff_run.json", "pogdiff_config.toml",
]  # fmt: skip


def save_lora(unet, output_dir: str, webui_name: str | None = None) -> None:
    """The UNet's LoRA adapters as `pytorch_lora_weights.safetensors` (diffusers keys, with the adapter config so
    that `lora_alpha` survives), and with `webui_name` also as one file in the kohya key format that
    AUTOMATIC1111, ComfyUI and kohya's scripts load (diffusers' own converter; its alpha is the rank, so the
    run's `lora_alpha` is written in its place)."""
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config["default"]
    peft_state = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(
        output_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(peft_state),
        safe_serialization=True,
        unet_lora_adapter_metadata=config.to_dict(),
    )
    if webui_name is not None:
        kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in peft_state.items()})
        for key in kohya:
            if key.endswith(".alpha"):
                kohya[key] = torch.tensor(float(config.lora_alpha))
        save_file({k: v.contiguous() for k, v in kohya.items()}, os.path.join(output_dir, webui_name))


def save_model_card(
    args,
    repo_id: str,
    examples: list[tuple[str, Image.Image]],
    repo_folder: str,
    index_summary: dict | None,
    seed: int,
) -> None:
    """README.md from diffusers' model-card helpers: `base_model` (which PoGDiffPipeline reads for a LoRA result),
    tags, license, a widget of the validation images, how to load the result, and every setting declared for the card. `seed` is
    the seed the run used (drawn, or the resumed checkpoint's, when --seed was not given)."""
    from diffusers.utils.hub_utils import (
        MODEL_CARD_TEMPLATE_PATH,
        load_or_create_model_card,
        populate_model_card,
    )
    from huggingface_hub import ModelCard, ModelCardData

    base = base_model_reference(args.pretrained_model_name_or_path)
    prompt = examples[0][0] if examples else "An image of <name>."
    widget, grid = [], ""
    for i, (text, image) in enumerate(examples):
        image.save(os.path.join(repo_folder, f"image_{i}.png"))
        widget.append({"text": text, "output": {"url": f"image_{i}.png"}})
    if examples:
        images = [image for _, image in examples]
        make_image_grid(images, 1, len(images)).save(os.path.join(repo_folder, "val_imgs_grid.png"))
        grid = "![val_imgs_grid](./val_imgs_grid.png)\n"
    dataset = args.dataset_name or args.train_data_dir
    # The flags declared with `card=True` (`pogdiff.settings`), as the run resolved them.
    rows = "\n".join(f"| {k} | {v} |" for k, v in card_rows(args, seed=seed))
    psi_lines = ""
    if index_summary:
        psi_lines = (
            "\n## Neighbours and psi at the start of training\n\n```\n"
            + format_summary(index_summary)
            + "\n```\n"
        )
    if args.use_lora:
        kind = "LoRA adapters for"
        usage = f"""from diffusers import DiffusionPipeline

# The base in PoGDiffPipeline (DDIM, 50 steps), which ships with this repo as pipeline.py, then the adapters.
pipe = DiffusionPipeline.from_pretrained("{base}", custom_pipeline="{repo_id}", trust_remote_code=True)
pipe.load_lora_weights("{repo_id}")
image = pipe("{prompt}").images[0]
```

AUTOMATIC1111 / ComfyUI: `{Path(repo_folder).name}.safetensors` holds the same adapters in the kohya key format."""
    else:
        kind = "A full fine-tune of"
        usage = f"""from diffusers import DiffusionPipeline

# PoGDiffPipeline (DDIM, 50 steps) ships with this repo as pipeline.py:
pipe = DiffusionPipeline.from_pretrained("{repo_id}", custom_pipeline="{repo_id}", trust_remote_code=True)
# or as a plain Stable Diffusion pipeline:
pipe = DiffusionPipeline.from_pretrained("{repo_id}")
image = pipe("{prompt}").images[0]
```"""
    description = f"""
# PoGDiff fine-tune - {repo_id}

{kind} **{args.pretrained_model_name_or_path}** on **{dataset}**, trained with `train_pogdiff.py`
(objective `{args.objective}`).

{grid}
## Usage

```python
{usage}

## Training hyperparameters

| parameter | value |
|---|---|
{rows}
{psi_lines}"""
    card_kwargs = {
        "license": "creativeml-openrail-m",
        "base_model": base,
        "model_description": description,
        "inference": True,
        "widget": widget or None,
    }
    if args.push_to_hub:
        # The diffusers way: a card already on the user's repo is kept and completed.
        card = load_or_create_model_card(repo_id_or_path=repo_id, from_training=True, **card_kwargs)
    else:
        # Nothing to look up for a local result (and a bare folder name could match someone else's Hub repo):
        # the same training template, directly.
        card = ModelCard.from_template(
            card_data=ModelCardData(
                **{k: card_kwargs[k] for k in ("license", "base_model", "inference", "widget")},
                library_name="diffusers",
            ),
            template_path=MODEL_CARD_TEMPLATE_PATH,
            model_description=description,
        )
    card.data.library_name = "diffusers"
    card.data.datasets = [str(dataset)]
    tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "pogdiff"]
    card = populate_model_card(card, tags=[*tags, "lora"] if args.use_lora else tags)
    card.save(os.path.join(repo_folder, "README.md"))


def save_pipeline_code(output_dir: str, source: str | os.PathLike) -> None:
    """PoGDiffPipeline's code as `pipeline.py`, the file name diffusers loads a Hub repo's `custom_pipeline` from,
    so that `DiffusionPipeline.from_pretrained(repo, custom_pipeline=repo, trust_remote_code=True)` needs nothing
    else."""
    source = Path(source)
    if not source.is_file():
        logger.warning(f"{source} not found: the output has no pipeline.py for `custom_pipeline=`.")
        return
    shutil.copyfile(source, os.path.join(output_dir, "pipeline.py"))


# ----------------------------------------------------------------------------------------------------------------
# The run record of a training output, and the size a model generates at
# ----------------------------------------------------------------------------------------------------------------


def save_run_settings(output_dir: str, global_step: int, settings: dict[str, Any]) -> str:
    """`output_dir/pogdiff_run.json`: the finished run's settings (`checkpointing.run_settings`), in the format of
    a checkpoint's record, so that the tools reading a training output find them whether or not it checkpointed."""
    path = os.path.join(output_dir, RUN_RECORD)
    record = {"format": RUN_RECORD_FORMAT, "global_step": global_step, "settings": settings}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return path


def recorded_run_settings(path: str) -> tuple[dict[str, Any], str] | None:
    """The settings a `train_pogdiff.py` output (or one of its checkpoints) was trained with, and the record they
    come from: the folder's own `pogdiff_run.json` (the final one, or a checkpoint's), else its newest checkpoint's.
    None for anything else (a Hub id, a model saved by other tools).

    Raises:
        UserError: a record exists but is not readable JSON with settings.
    """
    if not os.path.isdir(path):
        return None
    for folder in [path, *(os.path.join(path, name) for name in reversed(checkpoint_dirs(path)))]:
        record_path = os.path.join(folder, RUN_RECORD)
        if not os.path.isfile(record_path):
            continue
        try:
            with open(record_path, encoding="utf-8") as f:
                settings = json.load(f)["settings"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"{record_path} (the run record train_pogdiff.py wrote) is not readable ({error!r}); restore it or "
                "delete it and give the settings (e.g. --resolution) explicitly."
            ) from error
        return settings, record_path
    return None


def _model_file(model: str, name: str) -> str | None:
    """Path of `name` in a local model folder, or in the Hub model's cached (or, online, downloaded) files."""
    if os.path.isdir(model):
        path = os.path.join(model, name)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from .features import hub_offline

    try:
        cached = try_to_load_from_cache(model, name)
        if isinstance(cached, str) or hub_offline():
            return cached if isinstance(cached, str) else None
        return hf_hub_download(model, name)
    except (OSError, ValueError):  # not a Hub id, not found, no network: the caller says what to pass instead
        return None


def native_resolution(model: str) -> int | None:
    """The image size `model` generates at by default, as diffusers' pipelines compute it: the UNet's
    `sample_size` times the VAE's scale factor (2 ** (len(block_out_channels) - 1)). For a LoRA result folder,
    the size of the base model its model card names. None when the configs cannot be read."""
    unet_config = _model_file(model, "unet/config.json")
    vae_config = _model_file(model, "vae/config.json")
    if unet_config is None or vae_config is None:
        card = os.path.join(model, "README.md")
        if os.path.isdir(model) and os.path.isfile(card):
            from huggingface_hub import ModelCard

            base = ModelCard.load(card).data.base_model
            if isinstance(base, str) and base != model:
                return native_resolution(base)
        return None
    with open(unet_config, encoding="utf-8") as f:
        sample_size = json.load(f).get("sample_size")
    with open(vae_config, encoding="utf-8") as f:
        blocks = json.load(f).get("block_out_channels") or [0]
    if isinstance(
        sample_size, (list, tuple)
    ):  # (height, width) in some configs; these tools use square images
        sample_size = sample_size[0]
    return int(sample_size) * 2 ** (len(blocks) - 1) if isinstance(sample_size, int) else None


def training_resolution(model: str) -> tuple[int | None, str]:
    """The resolution to generate `model`'s images at and where it comes from: the `--resolution` of the run that
    trained it (its run record), else the model's own size (`native_resolution`); (None, reason) if neither."""
    recorded = recorded_run_settings(model)
    if recorded is not None and isinstance(recorded[0].get("--resolution"), int):
        return recorded[0]["--resolution"], f"--resolution of the run, from {recorded[1]}"
    size = native_resolution(model)
    if size is not None:
        return size, "the model's UNet sample_size x VAE scale factor"
    return None, "no run record (pogdiff_run.json) and no readable unet/vae config"
