"""Model families: everything that differs between Stable Diffusion 1.x/2.x and Stable Diffusion XL, in one place.

The trainer, the objectives, the index, validation and evaluation never ask "is this SDXL?": they ask the model's
family (`detect_family`, read from the model's `model_index.json`, no flag) for

- its text encoders (`TextEncoders`): how captions are tokenised and turned into the UNet's conditioning, and
  which text embedding the index's text density sees;
- its conditioning (`Conditioning`): the per-caption part (hidden states, and SDXL's pooled `text_embeds`) and
  the per-image part (SDXL's `time_ids`: original size, crop and target size);
- its pipeline classes (diffusers' for saving a full result and LoRA files, PoGDiff's for loading);
- its model folder layout (which subfolders a complete model has).

A new family is one more `ModelFamily` here (and, if its pipeline differs, one class in `pipeline_pogdiff.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from .errors import UserError

# ----------------------------------------------------------------------------------------------------------------
# Conditioning
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditioning:
    """What conditions the UNet besides x_t and t, one row per sample.

    `hidden_states` (B, L, D) is the text encoders' output the UNet cross-attends to. SDXL adds `text_embeds`
    (B, P), the pooled embedding of its second text encoder, and `time_ids` (B, 6), the image's original size,
    crop top-left and target size (micro-conditioning). The text part belongs to a caption; `time_ids` belong
    to the image: PoGDiff's neighbour forward swaps the text part and keeps the sample's own `time_ids`
    (`with_text_of`).

    It behaves like a batch tensor where the objectives need it to (`index_select`, slicing, `cat_conditioning`),
    so the same objective code serves every family.
    """

    hidden_states: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning(*(None if t is None else fn(t) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def __len__(self) -> int:
        return self.hidden_states.shape[0]

    def __getitem__(self, key) -> Conditioning:
        return self.map(lambda t: t[key])

    def index_select(self, dim: int, index: torch.Tensor) -> Conditioning:
        return self.map(lambda t: t.index_select(dim, index.to(t.device)))

    def to(self, *args, **kwargs) -> Conditioning:
        return self.map(lambda t: t.to(*args, **kwargs))

    def with_text_of(self, text: Conditioning) -> Conditioning:
        """`text`'s caption part (hidden states, pooled embedding) with this conditioning's `time_ids`."""
        return replace(text, time_ids=self.time_ids)

    def unet_kwargs(self) -> dict:
        """The keyword arguments of `UNet2DConditionModel.forward` besides sample and timestep."""
        kwargs: dict = {"encoder_hidden_states": self.hidden_states}
        if self.text_embeds is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds, "time_ids": self.time_ids}
        return kwargs


def as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    """A plain (B, L, D) tensor of hidden states (SD's whole conditioning) as a `Conditioning`."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


def cat_conditioning(parts: Sequence[Conditioning | torch.Tensor]) -> Conditioning | torch.Tensor:
    """`torch.cat` along the batch of conditionings (tensors stay tensors)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts))
    parts = [as_conditioning(p) for p in parts]
    columns = zip(*(p.tensors() for p in parts))
    return Conditioning(*(None if col[0] is None else torch.cat(col) for col in columns))


def neighbor_conditioning(
    batch: Conditioning | torch.Tensor,
    neighbor_text: Conditioning | torch.Tensor,
    rows: torch.Tensor | None = None,
) -> Conditioning | torch.Tensor:
    """The conditioning of a neighbour (or partner) forward: the neighbour's caption on the sample's own image.

    `neighbor_text` holds one row per row of `rows` (all rows when None); the sample's per-image conditioning
    (SDXL's `time_ids`) is taken from `batch` at those rows. For a family without per-image conditioning this
    is `neighbor_text` itself.
    """
    if not isinstance(batch, Conditioning) or batch.time_ids is None:
        return neighbor_text
    own = batch if rows is None else batch.index_select(0, rows)
    return own.with_text_of(as_conditioning(neighbor_text))


def unet_prediction(
    unet: Callable, noisy_latents, timesteps, cond: Conditioning | torch.Tensor
) -> torch.Tensor:
    """The UNet's prediction for x_t, t and a conditioning (any family)."""
    cond = as_conditioning(cond)
    if cond.text_embeds is None:  # SD: called exactly as diffusers' train_text_to_image.py calls it
        return unet(noisy_latents, timesteps, cond.hidden_states, return_dict=False)[0]
    return unet(noisy_latents, timesteps, **cond.unet_kwargs(), return_dict=False)[0]


# ----------------------------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------------------------


def _tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """(N, L) token ids, padded and truncated to the tokenizer's length, as diffusers' training scripts do."""
    return tokenizer(
        list(captions),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


class TextEncoders:
    """A family's tokenizer(s) and frozen text encoder(s): captions -> token ids -> conditioning.

    Token ids are one tensor per batch so that datasets, collation and caches need not know the family: (N, L)
    for one encoder, (N, E, L) for E encoders.
    """

    def __init__(self, tokenizers: Sequence, encoders: Sequence[torch.nn.Module]) -> None:
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        ids = [_tokenize(tokenizer, captions) for tokenizer in self.tokenizers]
        return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)

    def _ids_per_encoder(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [ids] if len(self.encoders) == 1 else list(ids.unbind(1))

    @property
    def device(self) -> torch.device:
        return self.encoders[0].device

    def encode(self, ids: torch.Tensor) -> Conditioning:
        """The caption part of the UNet's conditioning for token ids (no gradient flows into the encoders)."""
        raise NotImplementedError

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """One embedding per caption, (N, d): what the index's text density is fitted on."""
        raise NotImplementedError

    def requires_grad_(self, flag: bool) -> TextEncoders:
        for encoder in self.encoders:
            encoder.requires_grad_(flag)
        return self

    def to(self, *args, **kwargs) -> TextEncoders:
        for encoder in self.encoders:
            encoder.to(*args, **kwargs)
        return self

    def eval(self) -> TextEncoders:
        for encoder in self.encoders:
            encoder.eval()
        return self


class SDTextEncoders(TextEncoders):
    """Stable Diffusion 1.x/2.x: one CLIP text encoder; the UNet attends to its last hidden state."""

    def encode(self, ids: torch.Tensor) -> Conditioning:
        (encoder,) = self.encoders
        return Conditioning(encoder(ids.to(encoder.device), return_dict=False)[0])

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        (encoder,) = self.encoders
        return encoder(ids.to(encoder.device)).pooler_output


class SDXLTextEncoders(TextEncoders):
    """SDXL: CLIP ViT-L and OpenCLIP bigG. The UNet attends to the penultimate hidden states of both,
    concatenated, and takes the second one's projected pooled output as `text_embeds` (as
    `StableDiffusionXLPipeline.encode_prompt` and diffusers' SDXL training script compute them)."""

    def encode(self, ids: torch.Tensor) -> Conditioning:
        hidden = []
        pooled = None
        for encoder, part in zip(self.encoders, self._ids_per_encoder(ids)):
            out = encoder(part.to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        return Conditioning(torch.cat(hidden, dim=-1), text_embeds=pooled)

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encode(ids).text_embeds


# ----------------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFamily:
    """One family of base models and how PoGDiff trains, saves and loads it.

    Attributes:
        name: short name (`sd`, `sdxl`), shown in logs and the model card.
        pipeline_class_name: diffusers' pipeline class of the family (saves full results and LoRA files, and is
            what `model_index.json` names, so plain diffusers loads a full result).
        pogdiff_pipeline_name: the class in `pipeline_pogdiff.py` that loads results of this family.
        text_parts: (tokenizer subfolder, text encoder subfolder, text encoder class name) per text encoder.
        text_encoders_cls: the `TextEncoders` subclass that encodes captions.
        micro_conditioning: whether the UNet takes per-image `time_ids` (original size, crop, target size).
        vae_half_precision: whether the VAE may run in fp16/bf16 under mixed precision (SDXL's overflows in
            fp16 and runs in float32, as in diffusers' SDXL script).
        pipeline_kwargs: extra keyword arguments of the diffusers pipeline when a full result is saved.
    """

    name: str
    pipeline_class_name: str
    pogdiff_pipeline_name: str
    text_parts: tuple[tuple[str, str, str], ...]
    text_encoders_cls: type[TextEncoders]
    micro_conditioning: bool = False
    vae_half_precision: bool = True
    pipeline_kwargs: tuple[tuple[str, object], ...] = ()

    @property
    def model_parts(self) -> tuple[str, ...]:
        """The subfolders a complete model folder of this family has beside model_index.json."""
        texts = [part for tokenizer, encoder, _ in self.text_parts for part in (tokenizer, encoder)]
        return ("scheduler", *texts, "vae", "unet")

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_text_encoders(
        self, pretrained_model_name_or_path: str, *, revision: str | None = None, variant: str | None = None
    ) -> TextEncoders:
        """The family's tokenizers and text encoders from a model folder or Hub id (frozen, in eval mode)."""
        import transformers

        tokenizers, encoders = [], []
        for tokenizer_folder, encoder_folder, encoder_cls in self.text_parts:
            tokenizers.append(
                transformers.CLIPTokenizer.from_pretrained(
                    pretrained_model_name_or_path, subfolder=tokenizer_folder, revision=revision
                )
            )
            encoders.append(
                getattr(transformers, encoder_cls).from_pretrained(
                    pretrained_model_name_or_path,
                    subfolder=encoder_folder,
                    revision=revision,
                    variant=variant,
                )
            )
        return self.text_encoders_cls(tokenizers, encoders).requires_grad_(False).eval()

    def text_encoders_of(self, pipeline) -> TextEncoders:
        """The `TextEncoders` over a loaded pipeline's own tokenizers and text encoders."""
        return self.text_encoders_cls(
            [getattr(pipeline, t) for t, _, _ in self.text_parts],
            [getattr(pipeline, e) for _, e, _ in self.text_parts],
        )

    def pipeline_components(self, text_encoders: TextEncoders) -> dict:
        """The pipeline's tokenizer / text encoder keyword arguments for `text_encoders`."""
        components = {}
        for (tokenizer_folder, encoder_folder, _), tokenizer, encoder in zip(
            self.text_parts, text_encoders.tokenizers, text_encoders.encoders
        ):
            components[tokenizer_folder] = tokenizer
            components[encoder_folder] = encoder
        return components


SD = ModelFamily(
    name="sd",
    pipeline_class_name="StableDiffusionPipeline",
    pogdiff_pipeline_name="PoGDiffPipeline",
    text_parts=(("tokenizer", "text_encoder", "CLIPTextModel"),),
    text_encoders_cls=SDTextEncoders,
    # PoGDiff results are saved without a safety checker, as diffusers' training scripts save them.
    pipeline_kwargs=(("safety_checker", None), ("requires_safety_checker", False)),
)
SDXL = ModelFamily(
    name="sdxl",
    pipeline_class_name="StableDiffusionXLPipeline",
    pogdiff_pipeline_name="PoGDiffXLPipeline",
    text_parts=(
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
    ),
    text_encoders_cls=SDXLTextEncoders,
    micro_conditioning=True,
    vae_half_precision=False,
)
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD, SDXL)}


def family_of_index(model_index: dict) -> ModelFamily:
    """The family a `model_index.json` describes: by its pipeline class, else by its components."""
    class_name = model_index.get("_class_name")
    if isinstance(class_name, (list, tuple)):
        class_name = class_name[-1]
    for family in FAMILIES.values():
        if class_name in (family.pipeline_class_name, family.pogdiff_pipeline_name):
            return family
    # An unknown class (a community pipeline): the components decide.
    if "text_encoder_2" in model_index and "unet" in model_index:
        return SDXL
    if "text_encoder" in model_index and "unet" in model_index:
        return SD
    raise UserError(
        f"The model's model_index.json names {class_name!r}, which is not a family PoGDiff trains "
        f"({', '.join(f.pipeline_class_name for f in FAMILIES.values())})."
    )


def read_model_index(
    pretrained_model_name_or_path: str, revision: str | None = None, **hub_kwargs
) -> dict | None:
    """The model's `model_index.json` (a folder or a Hub id), or None where there is none."""
    path = str(pretrained_model_name_or_path)
    if os.path.isdir(path):
        candidate = os.path.join(path, "model_index.json")
        if not os.path.isfile(candidate):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        try:
            candidate = hf_hub_download(path, "model_index.json", revision=revision, **hub_kwargs)
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError):
            return None
    with open(candidate, encoding="utf-8") as f:
        return json.load(f)


def detect_family(
    pretrained_model_name_or_path: str, revision: str | None = None, **hub_kwargs
) -> ModelFamily:
    """The family of a base model, read from its `model_index.json`; SD when it cannot be read (the loaders
    that follow then report what is missing)."""
    model_index = read_model_index(pretrained_model_name_or_path, revision, **hub_kwargs)
    return SD if model_index is None else family_of_index(model_index)


def add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning of one image, (6,): original (height, width), crop (top, left), target
    (height, width), in the order diffusers' SDXL training script and pipeline use."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


__all__ = [
    "Conditioning",
    "as_conditioning",
    "cat_conditioning",
    "neighbor_conditioning",
    "unet_prediction",
    "TextEncoders",
    "SDTextEncoders",
    "SDXLTextEncoders",
    "ModelFamily",
    "SD",
    "SDXL",
    "FAMILIES",
    "family_of_index",
    "read_model_index",
    "detect_family",
    "add_time_ids",
]
