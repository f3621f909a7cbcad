"""What a training run leaves for people and other tools: the model card, LoRA files (diffusers and kohya/webui
formats), the pipeline code that `custom_pipeline=` loads, using diffusers' and huggingface_hub's helpers. The run record
(`pogdiff_run.json`) and what the tools read from it live in `pogdiff.checkpointing`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya, make_image_grid
from PIL import Image
from safetensors.torch import save_file

from .checkpointing import base_model_reference
from .families import SD, ModelFamily
from .index import format_summary
from .settings import card_rows

logger = get_logger(__name__, log_level="INFO")

# Files in output_dir that are training state, not the model: never uploaded (the run record and the config file
# hold local paths; the model card already states the settings).
HUB_IGNORE_PATTERNS = [
    "step_*", "epoch_*", "checkpoint-*", ".tmp-checkpoint-*", "pogdiff-index-*", ".pogdiff-*.lock", "logs/*",
    "pogdiff_run.json", "pogdiff_config.toml",
]  # fmt: skip


def save_lora(unet, output_dir: str, webui_name: str | None = None, family: ModelFamily = SD) -> None:
    """The UNet's LoRA adapters as `pytorch_lora_weights.safetensors` (diffusers keys, through the `family`'s
    pipeline class, with the adapter config so that `lora_alpha` survives), and with `webui_name` also as one file
    in the kohya key format that AUTOMATIC1111, ComfyUI and kohya's scripts load (diffusers' own converter; its
    alpha is the rank, so the run's `lora_alpha` is written in its place)."""
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config["default"]
    peft_state = get_peft_model_state_dict(unet)
    family.pipeline_class().save_lora_weights(
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
    family: ModelFamily = SD,
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
# or as diffusers' own {family.pipeline_class_name}:
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
        # The base models' licences: SD 1.x is CreativeML OpenRAIL-M, SDXL CreativeML OpenRAIL++-M.
        "license": "openrail++" if family.micro_conditioning else "creativeml-openrail-m",
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
    if family.micro_conditioning:
        tags.insert(1, "stable-diffusion-xl")
    card = populate_model_card(card, tags=[*tags, "lora"] if args.use_lora else tags)
    card.save(os.path.join(repo_folder, "README.md"))


def save_pipeline_code(output_dir: str, source: str | os.PathLike, family: ModelFamily = SD) -> None:
    """The family's PoGDiff pipeline as `pipeline.py`, the file name diffusers loads a Hub repo's `custom_pipeline`
    from, so that `DiffusionPipeline.from_pretrained(repo, custom_pipeline=repo, trust_remote_code=True)` needs
    nothing else.

    diffusers takes the one pipeline class it finds in `pipeline.py`. `pipeline_pogdiff.py` shows only
    `PoGDiffPipeline` (SD) at module level, so for SD it is copied as is; for another family it is copied beside
    a `pipeline.py` that imports just that family's class (diffusers fetches relatively imported files too)."""
    source = Path(source)
    if not source.is_file():
        logger.warning(f"{source} not found: the output has no pipeline.py for `custom_pipeline=`.")
        return
    if family.pogdiff_pipeline_name == "PoGDiffPipeline":
        shutil.copyfile(source, os.path.join(output_dir, "pipeline.py"))
        return
    shutil.copyfile(source, os.path.join(output_dir, source.name))
    with open(os.path.join(output_dir, "pipeline.py"), "w", encoding="utf-8") as f:
        f.write(
            f'"""The pipeline diffusers\' `custom_pipeline=` loads for this {family.pipeline_class_name} result."""\n\n'
            f"from .{source.stem} import {family.pogdiff_pipeline_name}  # noqa: F401\n"
        )
