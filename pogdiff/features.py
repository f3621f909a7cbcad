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


class HFFeatureExtractor(FeatureExtractor):
    """A Hugging Face vision backbone (default DINOv2-base): the CLS token of ``last_hidden_state``.

    For ``Dinov2Model`` ``last_hidden_state`` is taken after the final layer norm (it equals
    ``pooler_output``), which is the embedding DINOv2 reports as its image feature. Images are
    preprocessed by the model's own image processor (resize 256, centre-crop 224, ImageNet norm).
    """

    centre_on_real = False

    def __init__(self, model_id: str, device: str | torch.device = "cpu", batch_size: int = 32):
        super().__init__(batch_size)
        from transformers import AutoImageProcessor, AutoModel

        self.name = model_id
        self.device = torch.device(device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(model_id)
            self.model = AutoModel.from_pretrained(model_id)
        except OSError as error:
            raise OSError(
                f"Could not load the feature extractor {model_id!r}: it is not a local folder and not in the "
                "local Hugging Face cache, and it could not be downloaded (offline?). Download it once on a "
                "machine with internet access (`hf download "
                f"{model_id}`), or pass --feature_extractor pixels (offline, tests only), face (dlib, "
                f"needs `pip install dlib-bin face_recognition_models`) or module:function. Cause: {error}"
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


def _load_callable(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise UserError(
            f"Could not import the feature extractor {spec!r} ({error}). Pass `module:function` where "
            "`module` is importable (on PYTHONPATH) and `function(images: list[PIL.Image]) -> (n, d)` exists."
        ) from error
    if not callable(function):
        raise UserError(f"{spec!r} is not callable; it must map a list of PIL images to an (n, d) tensor.")
    return function


def get_feature_extractor(
    spec: str = DEFAULT_FEATURE_EXTRACTOR, device: str | torch.device = "cpu", batch_size: int = 32
) -> FeatureExtractor:
    """Builds the feature extractor named by ``spec`` (see the module docstring for the choices)."""
    spec = _ALIASES.get(spec, spec)
    if spec == "pixels":
        return PixelFeatureExtractor(batch_size=batch_size)
    if spec == "face":
        return FaceFeatureExtractor(batch_size=batch_size)
    # A local folder may contain ':' only on Windows drive letters; a Hub id never does.
    if ":" in spec and not os.path.isdir(spec):
        return CallableFeatureExtractor(_load_callable(spec), name=spec, batch_size=batch_size)
    return HFFeatureExtractor(spec, device=device, batch_size=batch_size)


def centre_on(features: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Subtracts ``mean`` (e.g. the real images' mean feature) and re-normalises rows."""
    return _normalize_rows(features - mean.to(features))
