"""Image feature extractors for evaluation (and for choosing neighbours during training).

Every extractor is a callable ``images (list[PIL.Image]) -> torch.Tensor`` of shape ``(n, d)``,
float32, rows L2-normalised, on the CPU. Besides being callable, an extractor has

- ``name``: a string recorded in results, so numbers from different extractors are never mixed;
- ``centre_on_real``: ``True`` when its raw vectors all point roughly the same way (dlib's face
  descriptor: every pair of faces has cosine > 0.8), so cosine thresholds only mean something after
  subtracting the mean of the real images. The evaluation does that and says so in its output;
- ``stats()``: a dict of counters worth reporting (e.g. how often no face was found).

:func:`get_feature_extractor` builds one from a string spec:

- ``"dinov2"`` or any Hugging Face model id / local folder (default ``facebook/dinov2-base``);
- ``"face"``: dlib's ResNet face descriptor (``pip install dlib-bin face_recognition_models``);
- ``"pixels"``: a tiny deterministic extractor that needs no weights (tests, offline demos);
- ``"module:function"``: any importable callable with the interface above.

Every neighbour encoder of the PoGDiff index lives here too: :func:`neighbor_encoder` maps ``--neighbor_encoder``
to ``vae`` (:func:`vae_image_encoder`, the base model's own VAE) or to one of the extractors above.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .errors import UserError

DEFAULT_FEATURE_EXTRACTOR = "facebook/dinov2-base"
_ALIASES = {"dinov2": DEFAULT_FEATURE_EXTRACTOR}

# What each tool's user can pass instead of a Hub id when the Hub is out of reach: the error of a tool names
# its own flag and its own choices (evaluate_pogdiff.py's --feature_extractor has `pixels`; the trainer's and
# the index's --neighbor_encoder have the base model's `vae`).
FACE_CHOICE = "face (dlib, `pip install dlib-bin face_recognition_models`)"
FEATURE_EXTRACTOR_OFFLINE_CHOICES = f"pixels (offline, tests only), {FACE_CHOICE} or module:function"
NEIGHBOR_ENCODER_OFFLINE_CHOICES = (
    f"vae (the base model's own VAE, no download), {FACE_CHOICE} or module:function"
)
# One HEAD request decides whether an uncached Hub model can be fetched at all; huggingface_hub's own lookup
# retries a dead network for about 100 s before transformers raises a chain of tracebacks.
HUB_PROBE_TIMEOUT_S = 10.0


def _normalize_rows(features: torch.Tensor) -> torch.Tensor:
    """float32 rows scaled to unit L2 norm; all-zero rows stay zero."""
    features = features.detach().to("cpu", torch.float32)
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


class FeatureExtractor:
    """Base class: subclasses implement :meth:`extract` on one batch; calling handles batching."""

    name: str = "base"
    centre_on_real: bool = False

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size

    def extract(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        return {}

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        images = list(images)
        if not images:
            raise UserError(f"Feature extractor {self.name!r} got no images.")
        return _normalize_rows(
            torch.cat([self.extract(batch) for batch in _batches(images, self.batch_size)])
        )


class PixelFeatureExtractor(FeatureExtractor):
    """Downsampled RGB pixels, mean-centred per image: cosine between two images is then the Pearson
    correlation of their thumbnails. Needs no weights and is exactly reproducible; it measures layout
    and colour, not identity, so use it for tests and offline demos only."""

    centre_on_real = False

    def __init__(self, size: int = 16, batch_size: int = 32):
        super().__init__(batch_size)
        self.size = size
        self.name = f"pixels{size}"

    def extract(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rows = []
        for image in images:
            # BOX resampling averages whole source pixels: deterministic and free of aliasing.
            thumb = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BOX)
            vector = np.asarray(thumb, dtype=np.float32).reshape(-1) / 255.0
            rows.append(vector - vector.mean())
        return torch.from_numpy(np.stack(rows))


class HubModelUnavailableError(UserError, OSError):
    """A Hub model that is neither a local folder nor cached, and cannot be downloaded now (offline mode or no
    network). An OSError too, as transformers' own loading errors are, so callers catching OSError keep working."""


def hub_offline() -> bool:
    """True when offline mode is set (`HF_HUB_OFFLINE`, or transformers' `TRANSFORMERS_OFFLINE`).

    huggingface_hub reads the variable once at import; the environment is read too so that a value set later in
    the process (a test, a notebook cell) counts as well.
    """
    from huggingface_hub import constants

    truthy = {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(name, "").upper() in truthy for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_reachable(model_id: str) -> Exception | None:
    """None when one HEAD request for the model's config.json reaches the Hub (whatever the status: a 401 or
    404 is reported by the load itself, with its own message); else the network error. No retries."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session

    session = get_session()
    # huggingface_hub's HTTP client library (httpx or its fork) raises its own TransportError for a network
    # failure; it is looked up on the session's module so that no particular client library is imported here.
    client_module = importlib.import_module(type(session).__module__.split(".")[0])
    network_errors = (OSError, getattr(client_module, "TransportError", OSError))
    try:
        session.head(
            hf_hub_url(model_id, "config.json"),
            headers=build_hf_headers(),
            timeout=HUB_PROBE_TIMEOUT_S,
            follow_redirects=True,
        )
    except network_errors as error:
        return error
    return None


def check_hub_model_available(model_id: str, flag: str, offline_choices: str) -> None:
    """Decides, before anything is loaded, whether the Hugging Face model `model_id` (given with `flag`) can load.

    A local folder or a model whose `config.json` is in the local Hugging Face cache passes. Otherwise, in offline
    mode (`HF_HUB_OFFLINE=1`) or when one request cannot reach the Hub, a `HubModelUnavailableError` says so in
    one line, naming `flag` and the choices that work offline (`offline_choices`), without network retries.

    Raises:
        HubModelUnavailableError: as above, or `model_id` looks like a path to a folder that does not exist, or it
            is not a valid Hub id.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    if os.path.isdir(model_id):
        return
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise HubModelUnavailableError(f"{flag} {model_id!r}: no such folder.")
    instead = f"or pass {flag} {offline_choices}"
    try:
        cached = try_to_load_from_cache(model_id, "config.json")
    except HFValidationError as error:
        raise HubModelUnavailableError(
            f"{flag} {model_id!r} is neither a folder nor a Hugging Face model id ({error}); give a Hub id such as "
            f"{DEFAULT_FEATURE_EXTRACTOR}, a folder, {instead}."
        ) from error
    if isinstance(cached, str):
        return
    if hub_offline():
        raise HubModelUnavailableError(
            f"{flag} {model_id!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is "
            f"set, so it cannot be downloaded: download it once online (`hf download {model_id}`), {instead}."
        )
    error = _hub_reachable(model_id)
    if error is not None:
        raise HubModelUnavailableError(
            f"{flag} {model_id!r} is not in the Hugging Face cache and the Hub cannot be reached ({error}): "
            f"connect to the internet, download it once elsewhere (`hf download {model_id}`), {instead}."
        )


class HFFeatureExtractor(FeatureExtractor):
    """A Hugging Face vision backbone (default DINOv2-base): the CLS token of ``last_hidden_state``.

    For ``Dinov2Model`` ``last_hidden_state`` is taken after the final layer norm (it equals
    ``pooler_output``), which is the embedding DINOv2 reports as its image feature. Images are
    preprocessed by the model's own image processor (resize 256, centre-crop 224, ImageNet norm).
    """

    centre_on_real = False

    def __init__(
        self,
        model_id: str,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        flag: str = "--feature_extractor",
        offline_choices: str = FEATURE_EXTRACTOR_OFFLINE_CHOICES,
    ):
        super().__init__(batch_size)
        check_hub_model_available(model_id, flag, offline_choices)
        from transformers import AutoImageProcessor, AutoModel

        self.name = model_id
        self.device = torch.device(device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(model_id)
            self.model = AutoModel.from_pretrained(model_id)
        except OSError as error:
            # Reached only online (the check above handles offline and an unreachable Hub): a wrong id, a gated
            # model without a token, a folder without the model's files.
            raise HubModelUnavailableError(
                f"{flag} {model_id!r} could not be loaded as a Hugging Face image model ({error}). Check the id, "
                f"your token (`hf auth login`) and the network, or pass {flag} {offline_choices}."
            ) from error
        self.model.to(self.device).eval()

    @torch.no_grad()
    def extract(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


def face_model_files() -> dict[str, str]:
    """Paths of the dlib model files shipped in the ``face_recognition_models`` package.

    The package's ``__init__`` imports ``pkg_resources``, which recent setuptools no longer has, so the
    files are located through the import system without importing the package.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The `face` feature extractor needs the dlib face models: `pip install dlib-bin "
            "face_recognition_models` (or `pip install .[face]`)."
        )
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    files = {
        "shape_predictor": os.path.join(folder, "shape_predictor_5_face_landmarks.dat"),
        "recognizer": os.path.join(folder, "dlib_face_recognition_resnet_model_v1.dat"),
    }
    for path in files.values():
        if not os.path.isfile(path):
            raise ImportError(f"Missing dlib model file {path}; reinstall `face_recognition_models`.")
    return files


class FaceFeatureExtractor(FeatureExtractor):
    """dlib's ResNet face descriptor (128-d; the model behind ``face_recognition``).

    Each image: frontal face detector -> largest face -> 5-point landmarks -> aligned 150x150 chip ->
    descriptor. When no face is detected the whole image is used as the face box, and counted in
    :meth:`stats`, so a report can say how many images had no detectable face.
    """

    name = "dlib-face-resnet-v1"
    # Raw descriptors of any two faces have cosine > ~0.8; centring on the real images' mean spreads
    # them so that a cosine threshold like gRecall's 0.7 separates identities.
    centre_on_real = True

    def __init__(self, batch_size: int = 32, upsample: int = 1):
        super().__init__(batch_size)
        try:
            import dlib
        except ImportError as error:
            raise ImportError(
                "The `face` feature extractor needs dlib: `pip install dlib-bin face_recognition_models`."
            ) from error
        files = face_model_files()
        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape_predictor = dlib.shape_predictor(files["shape_predictor"])
        self.recognizer = dlib.face_recognition_model_v1(files["recognizer"])
        self.upsample = upsample
        self.num_images = 0
        self.num_without_face = 0

    def extract(self, images: Sequence[Image.Image]) -> torch.Tensor:
        rows = []
        for image in images:
            pixels = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
            faces = list(self.detector(pixels, self.upsample))
            if faces:
                box = max(faces, key=lambda rect: rect.area())
            else:
                box = self._dlib.rectangle(0, 0, pixels.shape[1] - 1, pixels.shape[0] - 1)
                self.num_without_face += 1
            self.num_images += 1
            landmarks = self.shape_predictor(pixels, box)
            rows.append(
                np.asarray(self.recognizer.compute_face_descriptor(pixels, landmarks), dtype=np.float32)
            )
        return torch.from_numpy(np.stack(rows))

    def stats(self) -> dict[str, Any]:
        return {"images": self.num_images, "images_without_detected_face": self.num_without_face}


class CallableFeatureExtractor(FeatureExtractor):
    """Wraps a user callable (``module:function``) so its output is checked, float32 and L2-normalised.

    The callable may carry ``centre_on_real`` and ``stats`` attributes like the built-in extractors.
    """

    def __init__(self, function: Callable[[list[Image.Image]], Any], name: str, batch_size: int = 32):
        super().__init__(batch_size)
        self.function = function
        self.name = name
        self.centre_on_real = bool(getattr(function, "centre_on_real", False))

    def extract(self, images: Sequence[Image.Image]) -> torch.Tensor:
        output = self.function(list(images))
        features = output if torch.is_tensor(output) else torch.as_tensor(np.asarray(output))
        if features.ndim != 2 or features.shape[0] != len(images):
            raise UserError(
                f"Feature extractor {self.name!r} must return one row per image, shape ({len(images)}, d); "
                f"got shape {tuple(features.shape)}."
            )
        return features

    def stats(self) -> dict[str, Any]:
        stats = getattr(self.function, "stats", None)
        return dict(stats()) if callable(stats) else {}


def _load_callable(spec: str, flag: str = "--feature_extractor") -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UserError(
            f"{flag} {spec!r}: could not import the feature extractor ({error}). Pass `module:function` where "
            "`module` is importable (on PYTHONPATH) and `function(images: list[PIL.Image]) -> (n, d)` exists."
        ) from error
    if not callable(function):
        raise UserError(
            f"{flag} {spec!r} is not callable; it must map a list of PIL images to an (n, d) tensor."
        )
    return function


def get_feature_extractor(
    spec: str = DEFAULT_FEATURE_EXTRACTOR,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    flag: str = "--feature_extractor",
    offline_choices: str = FEATURE_EXTRACTOR_OFFLINE_CHOICES,
) -> FeatureExtractor:
    """Builds the feature extractor named by ``spec`` (see the module docstring for the choices).

    ``flag`` and ``offline_choices`` are what an error about an unavailable Hub model tells the user to change:
    the calling tool's own flag and the choices it offers offline.
    """
    spec = _ALIASES.get(spec, spec)
    if spec == "pixels":
        return PixelFeatureExtractor(batch_size=batch_size)
    if spec == "face":
        return FaceFeatureExtractor(batch_size=batch_size)
    # A local folder may contain ':' only on Windows drive letters; a Hub id never does.
    if ":" in spec and not os.path.isdir(spec):
        return CallableFeatureExtractor(_load_callable(spec, flag), name=spec, batch_size=batch_size)
    return HFFeatureExtractor(
        spec, device=device, batch_size=batch_size, flag=flag, offline_choices=offline_choices
    )


def vae_image_encoder(
    pretrained_model_name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    resolution: int = 512,
    device: str | torch.device = "cpu",
) -> Callable[[list[Image.Image]], torch.Tensor]:
    """The base model's own VAE as an image encoder: flattened latent means, (n, C*h*w) float32 on the CPU.

    Images are centre-cropped and resized to `resolution` the way training sees them. Needs no download
    beyond the base model, which is why it is the offline choice of `--neighbor_encoder`.
    """
    from diffusers import AutoencoderKL

    from .data import preprocess_image

    vae = AutoencoderKL.from_pretrained(
        pretrained_model_name_or_path, subfolder="vae", revision=revision, variant=variant
    )
    vae.to(device).eval()

    @torch.no_grad()
    def encode(images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([preprocess_image(image, resolution, center_crop=True) for image in images])
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean
        return latents.flatten(1).float().cpu()

    encode.name = "vae"
    return encode


def neighbor_encoder(
    spec: str,
    pretrained_model_name_or_path: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    resolution: int = 512,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> Callable[[list[Image.Image]], Any]:
    """The image encoder `--neighbor_encoder spec` names, for the neighbour index: `vae` (the base model's own VAE,
    `vae_image_encoder`) or any `get_feature_extractor` spec (a Hub model, `pixels`, `face`, `module:function`).

    Errors name the trainer's and the index CLI's flag and their offline choices (`vae`, not `pixels`).
    """
    if spec == "vae":
        return vae_image_encoder(
            pretrained_model_name_or_path,
            revision=revision,
            variant=variant,
            resolution=resolution,
            device=device,
        )
    return get_feature_extractor(
        spec,
        device=device,
        batch_size=batch_size,
        flag="--neighbor_encoder",
        offline_choices=NEIGHBOR_ENCODER_OFFLINE_CHOICES,
    )


def centre_on(features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Subtracts ``mean`` (e.g. the real images' mean feature) and re-normalises rows."""
    return _normalize_rows(features - mean.to(features))
