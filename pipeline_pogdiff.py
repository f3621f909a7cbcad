"""PoGDiffPipeline and PoGDiffXLPipeline: Stable Diffusion (1.x/2.x, XL) for models fine-tuned with PoGDiff
(full weights or LoRA).

This file is self-contained (diffusers, transformers, huggingface_hub and torch only) so that diffusers can load
it as a custom pipeline::

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        "path/or/hub-id", custom_pipeline="pipeline_pogdiff.py", trust_remote_code=True
    )

Usage::

    import torch
    from pipeline_pogdiff import PoGDiffPipeline

    # A full fine-tune (a folder with model_index.json) or a LoRA result (pytorch_lora_weights.safetensors
    # plus a model card whose metadata names `base_model`): both load the same way, from a folder or the Hub.
    pipe = PoGDiffPipeline.from_pretrained("your-name/pogdiff-agedb", dtype=torch.float16).to("cuda")
    # The paper's prompt convention (App. C): "An image of {name}."
    image = pipe("An image of Lukas.", generator=torch.Generator("cuda").manual_seed(0)).images[0]

Sampling is DDIM with 50 steps by default, as in the paper's evaluation (App. C).
"""

from __future__ import annotations

import json
import os

from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# What train_pogdiff.py writes into every checkpoint-N (its settings name the base model).
RUN_RECORD = "pogdiff_run.json"


def _find_file(pretrained_model_name_or_path: str | os.PathLike, filename: str, **hub_kwargs) -> str | None:
    """Local path of `filename` in a folder or Hub repo, or None when the repo does not have it."""
    path = str(pretrained_model_name_or_path)
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        return candidate if os.path.isfile(candidate) else None
    try:
        return hf_hub_download(path, filename, **hub_kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
        return None


def _family_class_name(model_index: dict | None) -> str:
    """The PoGDiff class for a model_index.json: the XL one for SDXL models, else the SD one."""
    names = (model_index or {}).get("_class_name")
    names = names if isinstance(names, (list, tuple)) else [names]
    is_xl = any(isinstance(n, str) and "XL" in n for n in names) or "text_encoder_2" in (model_index or {})
    return "PoGDiffXLPipeline" if is_xl else "PoGDiffPipeline"


def _model_index(pretrained_model_name_or_path, **hub_kwargs) -> dict | None:
    path = _find_file(pretrained_model_name_or_path, "model_index.json", **hub_kwargs)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _PoGDiffLoading:
    """What both PoGDiff pipelines add to their diffusers base class: DDIM by default, and loading of full results,
    LoRA results and `checkpoint-N` folders, each on the base model it names.

    A result of the other family is handed to that family's class (`PoGDiffPipeline.from_pretrained` on an SDXL
    result returns a `PoGDiffXLPipeline`), so a user never has to know which class to call.
    """

    @staticmethod
    def _ddim(scheduler):
        # DDIM is the paper's sampler; converting from the shipped config keeps the model's beta schedule,
        # prediction type and timestep spacing.
        return (
            scheduler if isinstance(scheduler, DDIMScheduler) else DDIMScheduler.from_config(scheduler.config)
        )

    @classmethod
    def _for_model(cls, model_index: dict | None):
        return _PIPELINE_CLASSES[_family_class_name(model_index)]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""Load a full pipeline or a LoRA result from a local folder or a Hub id.

        A folder/repo with `model_index.json` is loaded as a pipeline of its family. One with
        `pytorch_lora_weights.safetensors` (what `train_pogdiff.py --use_lora` writes) is loaded by reading
        `base_model` from its model card (README.md metadata), loading that base with the same `kwargs`, then
        `load_lora_weights`. A `checkpoint-N` folder is loaded on the base its run record names. All other keyword
        arguments are those of `DiffusionPipeline.from_pretrained`.
        """
        hub_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "token", "revision", "local_files_only") if k in kwargs
        }
        use_ema = kwargs.pop("use_ema", True)
        if os.path.isfile(os.path.join(str(pretrained_model_name_or_path), RUN_RECORD)):
            return cls._from_checkpoint(str(pretrained_model_name_or_path), use_ema, **kwargs)
        model_index = _model_index(pretrained_model_name_or_path, **hub_kwargs)
        if model_index is not None:
            family_cls = cls._for_model(model_index)
            return super(_PoGDiffLoading, family_cls).from_pretrained(pretrained_model_name_or_path, **kwargs)

        lora_file = _find_file(pretrained_model_name_or_path, LORA_WEIGHT_NAME, **hub_kwargs)
        if lora_file is None:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} holds neither a full pipeline (model_index.json) nor LoRA "
                f"weights ({LORA_WEIGHT_NAME}). Pass the output_dir of train_pogdiff.py (or its Hub id), or a Stable "
                "Diffusion model such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'."
            )
        card_file = _find_file(pretrained_model_name_or_path, "README.md", **hub_kwargs)
        base_model = ModelCard.load(card_file).data.base_model if card_file is not None else None
        if isinstance(base_model, list):
            base_model = base_model[0] if base_model else None
        if not base_model:
            raise ValueError(
                f"{pretrained_model_name_or_path!r} holds LoRA weights but no model card naming the base model "
                "(README.md with `base_model:` in its metadata). Load the base yourself and call "
                f"`pipe.load_lora_weights({str(pretrained_model_name_or_path)!r})`."
            )
        try:
            pipe = cls._base_pipeline(base_model, **kwargs)
        except (OSError, ValueError) as error:
            # The name came from a file the user may never have read: say where, and what to do instead.
            raise ValueError(
                f"The base model {base_model!r} named by `base_model:` in the model card {card_file} cannot be "
                f"loaded ({error}). Fix that line, make the base available (a local folder, or a Hub id that is "
                "cached when offline), or load the base yourself and call "
                f"`pipe.load_lora_weights({str(pretrained_model_name_or_path)!r})`."
            ) from error
        pipe.load_lora_weights(os.path.dirname(lora_file), weight_name=LORA_WEIGHT_NAME)
        return pipe

    @classmethod
    def _base_pipeline(cls, base: str, **kwargs):
        """The base model in the PoGDiff class of its family."""
        hub_kwargs = {
            k: kwargs[k] for k in ("cache_dir", "token", "revision", "local_files_only") if k in kwargs
        }
        family_cls = cls._for_model(_model_index(base, **hub_kwargs))
        return super(_PoGDiffLoading, family_cls).from_pretrained(base, **kwargs)

    @classmethod
    def _from_checkpoint(cls, checkpoint: str, use_ema: bool, **kwargs):
        """A `checkpoint-N` folder of train_pogdiff.py: its UNet (the EMA one when saved and `use_ema`) or its LoRA
        adapters, on the base model its run record names."""
        with open(os.path.join(checkpoint, RUN_RECORD), encoding="utf-8") as f:
            base = json.load(f)["settings"]["--pretrained_model_name_or_path"]
        try:
            if os.path.isfile(os.path.join(checkpoint, LORA_WEIGHT_NAME)):
                pipe = cls._base_pipeline(base, **kwargs)
                pipe.load_lora_weights(checkpoint, weight_name=LORA_WEIGHT_NAME)
                return pipe
            ema = os.path.join(checkpoint, "unet_ema")
            subfolder = "unet_ema" if use_ema and os.path.isdir(ema) else "unet"
            dtype_kwargs = {k: kwargs[k] for k in ("dtype", "torch_dtype") if k in kwargs}
            unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder=subfolder, **dtype_kwargs)
            return cls._base_pipeline(base, unet=unet, **kwargs)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"Cannot open checkpoint {checkpoint!r} on its base model {base!r} (named by its {RUN_RECORD}): "
                f"{error}. Make the base available at that path or Hub id, or load the base yourself and put the "
                "checkpoint's unet/ (or LoRA weights) into it."
            ) from error

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Save like the diffusers base class, recorded as that class (`StableDiffusionPipeline`,
        `StableDiffusionXLPipeline`).

        A model_index.json that names this subclass cannot be loaded by plain diffusers (which does not know the
        class); the components are the base class's, so its name is the portable choice.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = self._diffusers_class.__name__
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


class PoGDiffPipeline(_PoGDiffLoading, StableDiffusionPipeline):
    r"""Stable Diffusion text-to-image pipeline for PoGDiff fine-tuned models.

    Identical to [`StableDiffusionPipeline`] (same components, same `__call__`) except that:

    - the scheduler is converted to [`DDIMScheduler`] (from the shipped scheduler's config), and
      `num_inference_steps` defaults to 50, the paper's evaluation setting;
    - `from_pretrained` also accepts a LoRA result: a folder or Hub repo holding `pytorch_lora_weights.safetensors`
      and a model card whose metadata names the `base_model`; the base is loaded and the LoRA weights applied;
    - and any `checkpoint-N` folder of a run (full, EMA or LoRA), on the base its run record names
      (`use_ema=False` takes the checkpoint's raw UNet instead of its EMA one);
    - an SDXL model or result loads as [`PoGDiffXLPipeline`], whichever of the two classes is called;
    - `save_pretrained` records `StableDiffusionPipeline` as the class, so plain diffusers can load what it saves.

    To sample with another scheduler, swap it after loading, e.g.
    `pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`.

    Examples:
        ```py
        >>> import torch
        >>> from pipeline_pogdiff import PoGDiffPipeline

        >>> pipe = PoGDiffPipeline.from_pretrained("path/to/pogdiff-output")
        >>> image = pipe("An image of Lukas.", generator=torch.Generator().manual_seed(0)).images[0]
        ```
    """

    _diffusers_class = StableDiffusionPipeline

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=self._ddim(scheduler),
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )


class PoGDiffXLPipeline(_PoGDiffLoading, StableDiffusionXLPipeline):
    r"""Stable Diffusion XL text-to-image pipeline for PoGDiff fine-tuned SDXL models.

    [`StableDiffusionXLPipeline`] (same components, same `__call__`, `force_zeros_for_empty_prompt` included) with
    what [`PoGDiffPipeline`] adds: DDIM with 50 steps by default, and `from_pretrained` for full results, LoRA
    results and `checkpoint-N` folders. `save_pretrained` records `StableDiffusionXLPipeline` as the class.
    """

    _diffusers_class = StableDiffusionXLPipeline

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=self._ddim(scheduler),
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            # The invisible watermark needs an extra package that diffusers' SDXL training leaves optional too.
            add_watermarker=False if add_watermarker is None else add_watermarker,
        )


_PIPELINE_CLASSES = {"PoGDiffPipeline": PoGDiffPipeline, "PoGDiffXLPipeline": PoGDiffXLPipeline}
# diffusers' `custom_pipeline="pipeline_pogdiff.py"` takes the one DiffusionPipeline subclass it finds among this
# module's attributes, so only PoGDiffPipeline stays one; `from pipeline_pogdiff import PoGDiffXLPipeline` still
# works through the module's __getattr__, and an SDXL result's pipeline.py imports it by name (see pogdiff.hub).
del PoGDiffXLPipeline


def __getattr__(name: str):
    if name in _PIPELINE_CLASSES:
        return _PIPELINE_CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
