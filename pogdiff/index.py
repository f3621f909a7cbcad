"""The per-sample table PoGDiff's trainer reads: neighbours, identities, text groups, inverse text densities.

Everything psi needs (paper Sec. 3.2.3, Eq. 7-12) that does not change during training is computed once,
before the first step, and cached:

- image embeddings (`--neighbor_encoder`) -> top-k neighbours by cosine (`neighbors.knn_cosine`);
- pooled CLIP text embeddings of every caption -> a VAE density -> per-sample ELBO and inverse-density
  log-weights (`density`);
- identity ids (for the a2 term of Eq. 9) and text ids (a neighbour with the sample's own caption needs no
  extra UNet forward).

The cache folder `<cache_dir>/pogdiff-index-<key>/` is named by a hash of the dataset fingerprint, the base
model's fingerprint (by content: a base rewritten in place is another base) and every parameter that changes
the result, so a resumed run reloads it without touching an encoder and any changed
parameter rebuilds it.

Command line (build or load the index, print its summary, plot identity counts and expected psi)::

    python -m pogdiff.index --pretrained_model_name_or_path PATH --train_data_dir DIR --output_dir OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from PIL import Image
from safetensors import SafetensorError
from tqdm.auto import tqdm

from .errors import UserError, disk_full_is_a_user_error, report_user_errors
from .features import neighbor_encoder
from .identities import is_few_shot, shot_split
from .psi import PsiParams, expected_psi

logger = logging.getLogger(__name__)

# Bump when the meaning or layout of the saved tensors changes: old cache folders then stop matching.
INDEX_FORMAT_VERSION = 1
INDEX_FOLDER_PREFIX = "pogdiff-index-"
_TENSORS_FILE = "index.safetensors"
_JSON_FILE = "index.json"


@dataclass
class PoGDiffIndex:
    """Per-sample neighbour table and text densities, row i = dataset row i."""

    neighbor_ids: torch.Tensor  # (N, k) int64, dataset row indices, self excluded
    neighbor_sims: torch.Tensor  # (N, k) float32 cosine similarities, descending
    identity_ids: torch.Tensor  # (N,) int64 index into identity_names
    identity_names: list[str]
    text_ids: torch.Tensor  # (N,) int64, equal for rows with the same caption
    txt_log_weights: torch.Tensor  # (N,) float32 inverse-text-density log-weights, mean(exp) == 1
    elbo: torch.Tensor  # (N,) float32 ELBO of the text density VAE (higher = denser)
    config: dict  # the parameters behind the cache key, plus summary numbers

    def __post_init__(self) -> None:
        n = self.neighbor_ids.shape[0]
        shapes_ok = (
            self.neighbor_ids.ndim == 2
            and self.neighbor_sims.shape == self.neighbor_ids.shape
            and all(
                t.shape == (n,) for t in (self.identity_ids, self.text_ids, self.txt_log_weights, self.elbo)
            )
        )
        if not shapes_ok:
            shapes = ", ".join(f"{name} {tuple(getattr(self, name).shape)}" for name in _TENSOR_DTYPES)
            raise UserError(
                "Inconsistent PoGDiff index: neighbor_ids and neighbor_sims must be (N, k) and identity_ids, "
                f"text_ids, txt_log_weights and elbo (N,); got {shapes}. Delete the index folder so that it "
                "is rebuilt."
            )
        for name, dtype in _TENSOR_DTYPES.items():
            setattr(self, name, getattr(self, name).to(dtype))

    def __len__(self) -> int:
        return self.neighbor_ids.shape[0]

    def save(self, folder: str | os.PathLike) -> None:
        """Writes `index.safetensors` (the tensors) and `index.json` (identity names, config) into `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSOR_DTYPES}
        save_file(tensors, str(folder / _TENSORS_FILE), metadata={"format": "pt"})
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            _TENSORS_HASH_KEY: _sha256(folder / _TENSORS_FILE),
            "identity_names": self.identity_names,
            "config": self.config,
        }
        (folder / _JSON_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> PoGDiffIndex:
        """Reads an index written by `save`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / _JSON_FILE).read_text(encoding="utf-8"))
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise UserError(
                f"The PoGDiff index in {folder} has format version {meta.get('format_version')}, this code "
                f"reads version {INDEX_FORMAT_VERSION}. Delete the folder so that it is rebuilt."
            )
        # Same-size damage (zeroed or stray bytes) can still parse as safetensors: the recorded hash catches it.
        recorded = meta.get(_TENSORS_HASH_KEY)
        if recorded is not None and _sha256(folder / _TENSORS_FILE) != recorded:
            raise ValueError(
                f"{folder / _TENSORS_FILE} does not match the SHA-256 recorded when it was saved"
            )
        tensors = load_file(str(folder / _TENSORS_FILE))
        return cls(identity_names=list(meta["identity_names"]), config=meta["config"], **tensors)


_TENSORS_HASH_KEY = "tensors_sha256"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


_TENSOR_DTYPES: dict[str, torch.dtype] = {
    "neighbor_ids": torch.int64,
    "neighbor_sims": torch.float32,
    "identity_ids": torch.int64,
    "text_ids": torch.int64,
    "txt_log_weights": torch.float32,
    "elbo": torch.float32,
}


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def first_occurrence_ids(values: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """(N,) int64 ids, equal for equal values, numbered in order of first appearance; and the distinct values."""
    distinct = list(dict.fromkeys(values))
    position = {value: i for i, value in enumerate(distinct)}
    return torch.tensor([position[v] for v in values], dtype=torch.int64), distinct


def index_cache_key(params: dict[str, Any], texts: Sequence[str], identities: Sequence[str]) -> str:
    """sha256 (hex) of the build parameters and the per-row captions and identities."""
    payload = {"params": params, "texts": list(texts), "identities": list(identities)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def encoder_name(fn: Callable) -> str:
    """A stable name for an injected image encoder: its `name` attribute, else module + qualified name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{getattr(fn, '__module__', None) or type(fn).__module__}.{qualname}"


@torch.no_grad()
def encode_images(
    get_image: Callable[[int], Image.Image],
    num_images: int,
    encoder: Callable[[list[Image.Image]], Any],
    batch_size: int = 32,
    desc: str = "Image embeddings",
) -> torch.Tensor:
    """Embeds rows 0..num_images-1 in batches (images are loaded per batch, never all at once); (N, d) float32."""
    chunks = []
    for start in tqdm(range(0, num_images, batch_size), desc=desc):
        images = [get_image(i) for i in range(start, min(start + batch_size, num_images))]
        features = torch.as_tensor(encoder(images)).detach().float().cpu()
        if features.ndim != 2 or features.shape[0] != len(images):
            raise UserError(
                f"The image encoder must return one row per image, shape ({len(images)}, d), for rows "
                f"{start}..{start + len(images) - 1}; got shape {tuple(features.shape)}."
            )
        chunks.append(features)
    return torch.cat(chunks)


@torch.no_grad()
def encode_texts(
    texts: Sequence[str],
    pretrained_model_name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> torch.Tensor:
    """The base model's pooled text embedding of every row, (N, d) float32 on the CPU: its family's
    (`families.TextEncoders.pooled`: CLIP's pooled output for SD 1.x/2.x, the second text encoder's projected
    pooled output, the UNet's `text_embeds`, for SDXL).

    Each distinct caption is encoded once and copied to its rows: duplicates stay in the output because
    caption frequency is exactly what the text density has to see.
    """
    from .families import detect_family

    family = detect_family(pretrained_model_name_or_path, revision)
    text_encoders = family.load_text_encoders(
        pretrained_model_name_or_path, revision=revision, variant=variant
    )
    text_encoders.to(device)
    row_ids, distinct = first_occurrence_ids(texts)
    chunks = []
    for start in tqdm(range(0, len(distinct), batch_size), desc="Text embeddings"):
        ids = text_encoders.tokenize(distinct[start : start + batch_size])
        chunks.append(text_encoders.pooled(ids.to(device)).float().cpu())
    return torch.cat(chunks)[row_ids]


def _check_inputs(texts: Sequence[str], identities: Sequence[str], num_neighbors: int) -> None:
    n = len(texts)
    if n == 0:
        raise UserError(
            "The training dataset is empty, so there is nothing to index. Check --train_data_dir / "
            "--dataset_name and the split."
        )
    if len(identities) != n:
        raise UserError(
            f"Got {n} captions but {len(identities)} identities; pass one identity per dataset row."
        )
    if not 1 <= num_neighbors < n:
        raise UserError(
            f"--num_neighbors must be at least 1 and smaller than the number of training samples N={n} "
            f"(a sample is never its own neighbour), got {num_neighbors}. Lower --num_neighbors or add samples."
        )


def one_caption_per_identity_warning(texts: Sequence[str], identities: Sequence[str]) -> str | None:
    """The warning for data whose every identity has a single caption (template captions), else None.

    PoGDiff skips a neighbour with the sample's own caption (the two predictions are equal, the term is 0), so
    with one caption per identity every same-identity neighbour is skipped and the term only ever pulls toward
    *other* identities' predictions. The paper's captions differ per image.
    """
    captions_of: dict[str, set[str]] = {}
    for text, identity in zip(texts, identities):
        captions_of.setdefault(identity, set()).add(text)
    if any(len(captions) > 1 for captions in captions_of.values()):
        return None
    return (
        f"Every identity here has a single caption ({len(captions_of)} identities, {len(set(texts))} distinct "
        "captions): PoGDiff's consistency term is then skipped for every same-identity neighbour (same caption, "
        "same prediction) and only pulls toward other identities. Per-image captions (what each image shows, "
        "as the paper's LLaVA captions) let it tie an identity's images together."
    )


def _is_index_folder(folder: Path, key: str) -> bool:
    meta_file = folder / _JSON_FILE
    if not (meta_file.is_file() and (folder / _TENSORS_FILE).is_file()):
        return False
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("format_version") == INDEX_FORMAT_VERSION and meta.get("config", {}).get("key") == key


def build_or_load_index(
    get_image: Callable[[int], Image.Image],
    texts: list[str],
    identities: list[str],
    *,
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    neighbor_encoder: str = "facebook/dinov2-base",
    num_neighbors: int = 5,
    resolution: int = 512,
    density_latent_dim: int = 16,
    density_hidden_dim: int = 256,
    density_epochs: int = 200,
    density_lr: float = 1e-3,
    density_num_samples: int = 16,
    density_temperature: float = 1.0,
    density_w_min: float | None = 0.1,
    density_w_max: float | None = 10.0,
    seed: int = 0,
    cache_dir: str,
    fingerprint: str,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    image_encoder_fn: Callable | None = None,
) -> PoGDiffIndex:
    """Loads the cached index for these inputs, or builds it (and caches it atomically).

    Args:
        get_image: row index -> PIL image (called only when building).
        texts, identities: caption and identity of every dataset row.
        pretrained_model_name_or_path, revision, variant: the base model (its text encoder always, its VAE
            for `neighbor_encoder="vae"`).
        neighbor_encoder: `"vae"` (the base model's latent means) or any spec of
            `features.get_feature_extractor` (Hugging Face id, `face`, `pixels`, `module:function`).
        num_neighbors: k of the k-NN graph. resolution: image size for the `vae` encoder.
        density_*: `density.fit_text_density`, `density.elbo` and `density.inverse_density_log_weights`.
        seed: seeds the density VAE (training and ELBO draws).
        cache_dir: parent of the `pogdiff-index-<key>` folder. fingerprint: identifies the dataset content.
        device, batch_size: where and in what batches the encoders run.
        image_encoder_fn: `list[PIL.Image] -> (n, d)`; replaces `neighbor_encoder` (tests, custom encoders).
            Its `name` attribute (else its qualified name) enters the cache key.

    An encoder whose `centre_on_real` attribute is true (dlib faces: every pair of raw descriptors has
    cosine > 0.8) has the dataset mean subtracted before the k-NN, otherwise every similarity would be
    close to 1 and psi_img would not tell neighbours apart.
    """
    # The run record's notion of model identity (imported here: the index library stays below checkpointing).
    from .checkpointing import base_model_fingerprint, base_model_reference

    _check_inputs(texts, identities, num_neighbors)
    warning = one_caption_per_identity_warning(texts, identities)
    if warning:
        logger.warning(warning)
    if image_encoder_fn is not None:
        neighbor_encoder = f"callable:{encoder_name(image_encoder_fn)}"
    params = {
        "format_version": INDEX_FORMAT_VERSION,
        "fingerprint": fingerprint,
        "pretrained_model_name_or_path": base_model_reference(str(pretrained_model_name_or_path)),
        # By content: a base folder rewritten in place (new VAE or text encoder) must not reuse the old index.
        "base_model": base_model_fingerprint(str(pretrained_model_name_or_path), revision),
        "revision": revision,
        "variant": variant,
        "neighbor_encoder": neighbor_encoder,
        "num_neighbors": num_neighbors,
        "resolution": resolution,
        "density_latent_dim": density_latent_dim,
        "density_hidden_dim": density_hidden_dim,
        "density_epochs": density_epochs,
        "density_lr": density_lr,
        "density_num_samples": density_num_samples,
        "density_temperature": density_temperature,
        "density_w_min": density_w_min,
        "density_w_max": density_w_max,
        "seed": seed,
    }
    key = index_cache_key(params, texts, identities)
    cache_dir = Path(cache_dir)
    folder = cache_dir / f"{INDEX_FOLDER_PREFIX}{key[:16]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One builder per index: a second run on the same cache waits, then finds the first one's index.
    lock_path = cache_dir / f".{folder.name}.lock"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning(
            "PoGDiff index: another run is building %s (it holds %s); waiting for it.", folder, lock_path
        )
        lock.acquire()
    try:
        return _load_or_build(
            folder, key, get_image, texts, identities, params, image_encoder_fn, device, batch_size
        )
    finally:
        lock.release()


def _load_or_build(
    folder: Path,
    key: str,
    get_image: Callable[[int], Image.Image],
    texts: list[str],
    identities: list[str],
    params: dict[str, Any],
    image_encoder_fn: Callable | None,
    device: str | torch.device,
    batch_size: int,
) -> PoGDiffIndex:
    if _is_index_folder(folder, key):
        try:
            index = PoGDiffIndex.load(folder)
        except (OSError, ValueError, KeyError, json.JSONDecodeError, SafetensorError) as error:
            # A cache is only a cache: a damaged one (disk full, a copy cut short) is rebuilt, not fatal.
            logger.warning(
                "PoGDiff index: the cached index in %s is unreadable (%s); rebuilding it.", folder, error
            )
            shutil.rmtree(folder)
        else:
            logger.info("PoGDiff index: cache hit, loaded %d samples from %s", len(index), folder)
            return index

    logger.info("PoGDiff index: cache miss, building it for %d samples into %s", len(texts), folder)
    index = _build_index(
        get_image,
        texts,
        identities,
        params=params,
        key=key,
        image_encoder_fn=image_encoder_fn,
        device=device,
        batch_size=batch_size,
    )
    _save_atomically(index, folder, key)
    return index


def _build_index(
    get_image: Callable[[int], Image.Image],
    texts: list[str],
    identities: list[str],
    *,
    params: dict[str, Any],
    key: str,
    image_encoder_fn: Callable | None,
    device: str | torch.device,
    batch_size: int,
) -> PoGDiffIndex:
    from .density import elbo, fit_text_density, inverse_density_log_weights, log_weight_summary
    from .neighbors import knn_cosine

    model = params["pretrained_model_name_or_path"]
    if image_encoder_fn is not None:
        encoder = image_encoder_fn
    else:
        encoder = neighbor_encoder(
            params["neighbor_encoder"],
            model,
            revision=params["revision"],
            variant=params["variant"],
            resolution=params["resolution"],
            device=device,
            batch_size=batch_size,
        )
    image_embeddings = encode_images(
        get_image, len(texts), encoder, batch_size, desc=f"Image embeddings ({params['neighbor_encoder']})"
    )
    centred = bool(getattr(encoder, "centre_on_real", False))
    if centred:
        image_embeddings = image_embeddings - image_embeddings.mean(dim=0, keepdim=True)
    # The k-NN is the O(N^2) part: run it on the accelerator when there is one.
    neighbor_sims, neighbor_ids = knn_cosine(image_embeddings.to(device), params["num_neighbors"])

    text_embeddings = encode_texts(
        texts,
        model,
        revision=params["revision"],
        variant=params["variant"],
        device=device,
        batch_size=batch_size,
    )
    density = fit_text_density(
        text_embeddings,
        latent_dim=params["density_latent_dim"],
        hidden_dim=params["density_hidden_dim"],
        epochs=params["density_epochs"],
        lr=params["density_lr"],
        seed=params["seed"],
    )
    sample_elbo = elbo(
        density, text_embeddings, num_samples=params["density_num_samples"], seed=params["seed"]
    )
    log_weights = inverse_density_log_weights(
        sample_elbo,
        temperature=params["density_temperature"],
        w_min=params["density_w_min"],
        w_max=params["density_w_max"],
    )
    weight_summary = log_weight_summary(log_weights)
    # The unclipped spread is what --density_temperature controls; the clipped one is what training uses.
    unclipped_summary = log_weight_summary(
        inverse_density_log_weights(
            sample_elbo, temperature=params["density_temperature"], w_min=None, w_max=None
        )
    )
    logger.info(
        "PoGDiff index: text inverse-density weights %s (before clipping to [%s, %s]: %s)",
        weight_summary,
        params["density_w_min"],
        params["density_w_max"],
        unclipped_summary,
    )

    identity_names = sorted(set(identities))
    position = {name: i for i, name in enumerate(identity_names)}
    text_ids, distinct_texts = first_occurrence_ids(texts)
    config = {
        **params,
        "key": key,
        "num_samples": len(texts),
        "num_distinct_texts": len(distinct_texts),
        "image_embedding_dim": image_embeddings.shape[1],
        "text_embedding_dim": text_embeddings.shape[1],
        "image_embeddings_centred": centred,
        "txt_weight_summary": weight_summary,
        "txt_weight_summary_unclipped": unclipped_summary,
    }
    return PoGDiffIndex(
        neighbor_ids=neighbor_ids.cpu(),
        neighbor_sims=neighbor_sims.cpu(),
        identity_ids=torch.tensor([position[name] for name in identities], dtype=torch.int64),
        identity_names=identity_names,
        text_ids=text_ids,
        txt_log_weights=torch.as_tensor(log_weights).float().cpu(),
        elbo=torch.as_tensor(sample_elbo).float().cpu(),
        config=config,
    )


def _save_atomically(index: PoGDiffIndex, folder: Path, key: str) -> None:
    """Writes into a temporary sibling folder and renames it, so a reader never sees a half-written index."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        with disk_full_is_a_user_error("the PoGDiff index", folder.parent):
            index.save(tmp)
        if folder.exists() and not _is_index_folder(folder, key):
            shutil.rmtree(folder)  # a stale or broken folder under this name: replace it
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process (e.g. a second rank) renamed an identical index into place first.
            if not _is_index_folder(folder, key):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Summary and plots


def _identity_counts(index: PoGDiffIndex) -> dict[str, int]:
    """Images per identity, largest first (ties by name)."""
    counts = torch.bincount(index.identity_ids, minlength=len(index.identity_names)).tolist()
    return dict(sorted(zip(index.identity_names, counts), key=lambda pair: (-pair[1], pair[0])))


def _minority_mask(index: PoGDiffIndex, few_shot_max: int) -> torch.Tensor:
    """(N,) bool: the sample's identity has at most `few_shot_max` images."""
    counts = torch.bincount(index.identity_ids, minlength=len(index.identity_names))
    return is_few_shot(counts[index.identity_ids], few_shot_max)


def expected_psi_per_sample(index: PoGDiffIndex, psi: PsiParams = PsiParams()) -> torch.Tensor:
    """(N,) psi of every sample in expectation over its Cat(w) neighbour draw (`psi.expected_psi`)."""
    same_identity = index.identity_ids[index.neighbor_ids] == index.identity_ids[:, None]
    return expected_psi(index.neighbor_sims, same_identity, index.txt_log_weights, psi)


def _stats(values: torch.Tensor) -> dict[str, float] | None:
    if values.numel() == 0:
        return None
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def summarize_index(
    index: PoGDiffIndex, psi: PsiParams = PsiParams(), few_shot_max: int = 2
) -> dict[str, Any]:
    """Numbers worth logging before training, as a JSON-serialisable dict.

    Identities and their image counts; the majority/minority split (minority = at most `few_shot_max`
    images, the paper's few-shot split); per group: expected psi (mean/min/max over samples), mean text
    weight exp(log w), mean neighbour similarity and the fraction of neighbours of another identity.
    """
    from .density import log_weight_summary

    counts = _identity_counts(index)
    split = shot_split(counts, few_shot_max)
    minority, majority = split["few"], split["many"]
    is_minority = _minority_mask(index, few_shot_max)
    expected = expected_psi_per_sample(index, psi)
    other_identity = index.identity_ids[index.neighbor_ids] != index.identity_ids[:, None]
    weights = index.txt_log_weights.exp()

    groups = {}
    for group, mask in (
        ("all", torch.ones_like(is_minority)),
        ("majority", ~is_minority),
        ("minority", is_minority),
    ):
        size = int(mask.sum())
        groups[group] = {
            "num_samples": size,
            "expected_psi": _stats(expected[mask]),
            "mean_txt_weight": float(weights[mask].mean()) if size else None,
            "mean_neighbor_sim": float(index.neighbor_sims[mask].mean()) if size else None,
            "other_identity_neighbor_fraction": float(other_identity[mask].float().mean()) if size else None,
        }
    return {
        "num_samples": len(index),
        "num_neighbors": index.neighbor_ids.shape[1],
        "neighbor_encoder": index.config.get("neighbor_encoder"),
        "num_identities": len(counts),
        "identity_counts": counts,
        "few_shot_max": few_shot_max,
        "majority_identities": majority,
        "minority_identities": minority,
        "psi_params": dataclasses.asdict(psi),
        # Expected psi (mean/min/max) per group, the headline numbers to log before training.
        "psi": {group: row["expected_psi"] for group, row in groups.items()},
        "groups": groups,
        "other_identity_neighbor_fraction": groups["all"]["other_identity_neighbor_fraction"],
        "txt_weights": log_weight_summary(index.txt_log_weights),
        "txt_weights_unclipped": index.config.get("txt_weight_summary_unclipped"),
    }


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def format_summary(summary: dict[str, Any], max_identities: int = 30) -> str:
    """The summary as a plain-text table (identity counts, then psi statistics per group)."""
    psi = summary["psi_params"]
    lines = [
        f"PoGDiff index: {summary['num_samples']} samples, k={summary['num_neighbors']} neighbours "
        f"({summary['neighbor_encoder']}), {summary['num_identities']} identities; psi a1={psi['a1']} "
        f"a2={psi['a2']} a3={psi['a3']} terms={psi['terms']}",
        "",
    ]
    counts = summary["identity_counts"]
    minority = set(summary["minority_identities"])
    width = max([len("identity")] + [len(name) for name in counts])
    lines.append(f"{'identity':<{width}}  images  group")
    for name, count in list(counts.items())[:max_identities]:
        lines.append(f"{name:<{width}}  {count:>6}  {'minority' if name in minority else 'majority'}")
    if len(counts) > max_identities:
        lines.append(f"... {len(counts) - max_identities} more identities")
    lines += [
        "",
        f"{'group':<9} {'samples':>7} {'E[psi] mean':>11} {'min':>9} {'max':>9} {'mean w_txt':>10} "
        f"{'mean sim':>9} {'other-id nbrs':>13}",
    ]
    for group, row in summary["groups"].items():
        stats = row["expected_psi"] or {}
        lines.append(
            f"{group:<9} {row['num_samples']:>7} {_fmt(stats.get('mean')):>11} {_fmt(stats.get('min')):>9} "
            f"{_fmt(stats.get('max')):>9} {_fmt(row['mean_txt_weight']):>10} {_fmt(row['mean_neighbor_sim']):>9} "
            f"{_fmt(row['other_identity_neighbor_fraction']):>13}"
        )
    lines.append("")
    for label, key in (("", "txt_weights"), (" before clipping", "txt_weights_unclipped")):
        if summary.get(key):
            spread = ", ".join(f"{name}={_fmt(value)}" for name, value in summary[key].items())
            lines.append(f"text inverse-density weights{label}: {spread}")
    return "\n".join(lines)


def plot_index(index: PoGDiffIndex, summary: dict[str, Any], output_dir: str | os.PathLike) -> list[str]:
    """Writes `identity_counts.png` (images per identity, sorted, as the paper's Fig. 4) and
    `expected_psi.png` (histogram of expected psi, majority vs minority); returns their paths."""
    from matplotlib.figure import Figure

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = summary["identity_counts"]
    minority = set(summary["minority_identities"])

    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax = fig.add_subplot()
    colours = ["tab:orange" if name in minority else "tab:blue" for name in counts]
    ax.bar(range(len(counts)), list(counts.values()), color=colours, width=0.9)
    if len(counts) <= 40:
        ax.set_xticks(range(len(counts)), list(counts), rotation=90, fontsize=8)
    else:
        ax.set_xticks([])  # too many names to read; the shape of the tail is the point
    ax.set_xlabel(f"identity (orange: minority, <= {summary['few_shot_max']} images)")
    ax.set_ylabel("images")
    ax.set_title(
        f"Images per identity ({summary['num_samples']} images, {summary['num_identities']} identities)"
    )
    counts_path = output_dir / "identity_counts.png"
    fig.savefig(counts_path, dpi=120)

    psi = summary["psi_params"]
    values = expected_psi_per_sample(index, PsiParams(**psi))
    is_minority = _minority_mask(index, summary["few_shot_max"])
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    upper = float(values.max()) if values.numel() and float(values.max()) > 0 else 1.0
    bins = torch.linspace(0.0, upper, 31).tolist()
    for label, mask, colour in (
        ("majority", ~is_minority, "tab:blue"),
        ("minority", is_minority, "tab:orange"),
    ):
        if bool(mask.any()):
            ax.hist(
                values[mask].tolist(),
                bins=bins,
                alpha=0.6,
                color=colour,
                label=f"{label} ({int(mask.sum())})",
            )
    ax.set_xlabel("expected psi over the neighbour draw")
    ax.set_ylabel("samples")
    ax.set_title(f"psi (a1={psi['a1']}, a2={psi['a2']}, a3={psi['a3']}, terms={psi['terms']})")
    ax.legend()
    psi_path = output_dir / "expected_psi.png"
    fig.savefig(psi_path, dpi=120)
    return [str(counts_path), str(psi_path)]


# ----------------------------------------------------------------------------------------------------------
# Command line


# Settings `--from_run` takes from a training run's record: every one that enters the index's cache key or psi.
RUN_SETTINGS_FOR_INDEX = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "resolution",
    "seed",
    "image_column",
    "caption_column",
    "identity_column",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The command line's modules load here, not with the library: the cached table does not depend on them.
    from .arguments import add_index_arguments, show_defaults
    from .checkpointing import index_flag_dests, recorded_run_settings, training_resolution
    from .config import add_config_argument, apply_config_file

    parser = argparse.ArgumentParser(
        prog="python -m pogdiff.index",
        description="Build (or load) PoGDiff's neighbour / text-density index, print its summary, plot it.",
    )
    parser.add_argument(
        "--from_run",
        default=None,
        help="A train_pogdiff.py --output_dir (or one of its checkpoints): every index setting its pogdiff_run.json "
        "recorded (base model, revision, variant, --resolution, --seed, columns, neighbour, psi and density flags) "
        "becomes this command's default, so that it builds the index the trainer built. Flags given here still win.",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Base model (Hub id or folder); required without --from_run.",
    )
    parser.add_argument("--revision", default=None, help="Revision of the base model.")
    parser.add_argument("--variant", default=None, help="Variant of the base model's files (e.g. fp16).")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset_name", default=None, help="A Hugging Face dataset (Hub name).")
    data.add_argument("--train_data_dir", default=None, help="A local imagefolder with metadata.jsonl.")
    parser.add_argument("--dataset_config_name", default=None, help="The dataset's config.")
    parser.add_argument(
        "--caption_extension",
        default=None,
        help="Read --train_data_dir as a kohya-style folder (captions in sidecar files), as train_pogdiff.py does.",
    )
    parser.add_argument("--cache_dir", default=None, help="Where datasets and models are cached.")
    parser.add_argument("--image_column", default="image", help="Image column.")
    parser.add_argument("--caption_column", default="text", help="Caption column.")
    parser.add_argument(
        "--identity_column",
        default="identity",
        help="Identity column; when absent the caption is the identity.",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Image size for the `vae` encoder (it enters the cache key). Default: the run's --resolution with "
        "--from_run, else the base model's own size (UNet sample_size x VAE scale factor).",
    )
    add_index_arguments(parser)
    parser.add_argument(
        "--seed", type=int, default=0, help="Seeds the text-density VAE (the run's with --from_run)."
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of the encoders.")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Where the encoders run."
    )
    parser.add_argument("--output_dir", required=True, help="Index cache, summary JSON and plots go here.")
    add_config_argument(parser)
    show_defaults(parser)
    # --config FILE: its values become the defaults (the command line still wins, and they win over --from_run's).
    from_file = apply_config_file(parser, argv)

    # --from_run first: the run's settings become the defaults, so flags given explicitly still override them.
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--from_run", default=None)
    from_run = early.parse_known_args(argv)[0].from_run or from_file.get("from_run")
    recorded = None
    if from_run is not None:
        recorded = recorded_run_settings(from_run)
        if recorded is None:
            raise UserError(
                f"--from_run {from_run!r} holds no pogdiff_run.json (neither its own nor a checkpoint's): give the "
                "--output_dir of a finished train_pogdiff.py run or one of its checkpoint folders."
            )
        settings = recorded[0]
        dests = (*RUN_SETTINGS_FOR_INDEX, *index_flag_dests())
        parser.set_defaults(
            **{
                dest: settings[f"--{dest}"]
                for dest in dests
                if f"--{dest}" in settings and dest not in from_file
            }
        )
    args = parser.parse_args(argv)
    args.run_record = recorded
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1 (images per encoder batch); got {args.batch_size}.")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device; give cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: this machine has no CUDA GPU that torch can use; pass --device cpu."
        )
    if args.pretrained_model_name_or_path is None:
        parser.error(
            "give --pretrained_model_name_or_path (the base model) or --from_run (a training output)."
        )
    if args.resolution is None:
        # Only the `vae` encoder uses it, but it is part of the cache key: the model's own size, not a fixed 512.
        args.resolution, source = training_resolution(args.pretrained_model_name_or_path)
        if args.resolution is None:
            raise UserError(
                f"--resolution: could not read the size of {args.pretrained_model_name_or_path!r} ({source}); "
                "pass --resolution (the trainer's --resolution) or --from_run."
            )
        logger.info("--resolution %d (%s).", args.resolution, source)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from .arguments import index_build_kwargs
    from .data import data_flags, load_training_data

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    psi = PsiParams.from_args(args)
    # The data as the trainer reads it (columns, first captions, identities): the same rows, the same cache key.
    data = load_training_data(**data_flags(args))
    texts, identities = data.texts, data.identities
    fingerprint = data.fingerprint()
    if args.run_record is not None and args.run_record[0].get("data_fingerprint") not in (None, fingerprint):
        logger.warning(
            "The data differs from the data the run in %s trained on (fingerprint %s, now %s): this index is not "
            "the one the trainer built. Pass the same --train_data_dir / --dataset_name (the run may have used "
            "--max_train_samples).",
            args.from_run,
            args.run_record[0]["data_fingerprint"],
            fingerprint,
        )

    index = build_or_load_index(
        data.image,
        texts,
        identities,
        **index_build_kwargs(args),
        seed=args.seed,
        cache_dir=args.output_dir,
        fingerprint=fingerprint,
        device=args.device,
        batch_size=args.batch_size,
    )
    summary = summarize_index(index, psi, args.few_shot_max)
    summary_path = Path(args.output_dir) / "index_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    paths = plot_index(index, summary, args.output_dir)
    print(format_summary(summary))
    print(f"\nSummary: {summary_path}\nPlots: {', '.join(paths)}")
    return summary


if __name__ == "__main__":
    report_user_errors("python -m pogdiff.index", main)
