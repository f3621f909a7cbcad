#!/usr/bin/env python
"""Evidence study: which objective and which sampling to run on long-tailed data, in a regime that can tell
(v2: every method; v3: per-image captions on a base with a trained text encoder, and the cost of balancing).

The paper's Sec. 4 fine-tunes Stable Diffusion v1.5 on long-tailed faces whose identities SD never saw. SD
already draws faces; fine-tuning teaches it *who is who*. The majority is then learned and the minority is not,
and that gap is what PoGDiff addresses. A study can only compare methods in that regime, so this one first
reaches it and checks it, then compares, offline on a 2-core CPU, with the scripts a user runs:

- data: scikit-learn's bundled handwritten digits (1,797 real scans, 10 classes), 8x8 upscaled to 32 px RGB, as
  in `examples/demo_digits.py`. An "identity" is a digit class. Every class is split once (seed 0) into a
  *judge side* (the only images the judge classifier trains and is tested on), for the evaluated classes a
  *validation side* (the only images the pilot tunes on) and a *model side* (the evaluated datasets).
- base model (our stand-in for SD's pretraining): the tiny SD of `pogdiff/testing.py` pretrained by
  `pogdiff/pretrain.py` on the model side of classes 0-4 only. Classes 5-9 are the identities under test: the
  base model never saw them, their names are pseudonyms ("Lukas").
- pilot (`pilot.json`), on long-tailed sets built from the *validation side* (other images, other pseudonyms,
  other majority/minority roles): the fine-tuning budget (lr x steps) is the cheapest for which vanilla reaches
  the regime; then PoGDiff's a2/a3 grid and the best sampling scheme are chosen there. Nothing is tuned on the
  evaluated images or the judge's.
- shape M (paper Sec. 4.1): 2 identities x 30 images + 3 x 2 images; captions per image from attributes
  measured on its pixels (`attr`, "An image of Lukas, thick strokes, slanted right, narrow."), the paper's
  captions being per-image too; one template caption per identity (`template`) as a second group.
- methods (`train_pogdiff.py`, same budget and seeds): vanilla, PoGDiff (defaults), PoGDiff with the paper's
  literal gradient (`--neighbor_grad`), PoGDiff with a2/a3 chosen on the validation side, CBDM, T2H, vanilla
  with `--sampling balanced | sqrt | density`, PoGDiff with the sampling chosen on the validation side.
- evaluation (`evaluate_pogdiff.py`): images from "An image of {name}." (paper App. C) judged by a classifier
  trained on judge-side images (accuracy: our analogue of the paper's human score), and DINO score, gRecall and
  per-identity FID in that classifier's hidden layer (`run_study:judge_features`); all, majority ("many") and
  few-shot identities.
- regime check: vanilla's majority accuracy >= 0.7 and its few-shot accuracy at least 0.3 below. If it fails,
  the tables say "uninformative regime" and no conclusion is drawn.

v3 adds two parts (`--part`), each with its own results file, on the same data, judge and work dir:

- `per-image`: the paper's caption regime made informative. v2's `attr` table failed its regime check; a likely
  cause is the base's text encoder, frozen at random, which need not map a name inside a long caption and the
  same name in the short evaluation prompt alike. `base-model-te` is v2's pretraining (same digits 0-4, both
  caption styles, same steps) with the text encoder trained beside the UNet (`pretrain --train_text_encoder`),
  as SD's CLIP arrives trained; nothing about the evaluated identities enters it. Its own pilot (guidance and
  budget, validation side) runs first, then the objectives and balanced sampling x seed (`per_image.md`).
- `tradeoff`: what balancing costs the majority, in the `template` regime where v2's vanilla passed. Vanilla's
  objective with `--sampling_power` in {1, 0.5, 0.25, 0} and `--sampling density --density_w_max` in {2, 4}, at
  x1 and x2 v2's step budget: once on a template-captioned validation set, where a rule fixed in advance picks
  the setting (few-shot within 0.1 of the majority at a majority cost <= 0.05), then every setting x seed on
  the evaluated set for the front (`tradeoff.md`, `tradeoff_front_<group>.png`).

Outputs in --output_dir: results.md, results.json, pilot.json, tradeoff.png (few-shot vs majority accuracy per
method), grid_few_shot_<group>.png, psi.png; per_image.md/json and tradeoff.md/json with their figures. Models, data and images go to --work_dir (default
outputs/study-<size>); finished runs and generated images found there are reused, so an interrupted study loses
at most the runs in progress. `--jobs` runs that many fine-tunes / evaluations side by side (one CPU thread
each).

    python examples/study/run_study.py --output_dir examples/study/results --size full --jobs 2
    python examples/study/run_study.py --output_dir examples/study/results --size full --jobs 2 --part per-image
    python examples/study/run_study.py --output_dir examples/study/results --size full --jobs 2 --part tradeoff
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

STUDY_DIR = Path(__file__).resolve().parent
REPO_ROOT = STUDY_DIR.parents[1]
# train_pogdiff.py / evaluate_pogdiff.py live at the root, demo_digits.py in examples/; `run_study:judge_features`
# needs this folder.
for _path in (REPO_ROOT, REPO_ROOT / "examples", STUDY_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

logger = logging.getLogger("run_study")

# Which classes play which part. The base model sees only BASE_CLASSES.
BASE_CLASSES = (0, 1, 2, 3, 4)
EVAL_CLASSES = (5, 6, 7, 8, 9)
RESOLUTION = 32
EVAL_PROMPT = "An image of {name}."

# The paper's shapes, restricted to 5 identities: (majority ids, minority ids); 30 and 2 images each.
SHAPES: dict[str, tuple[int, int]] = {"S": (1, 1), "M": (2, 3)}
MAJORITY_IMAGES, MINORITY_IMAGES = 30, 2
FEW_SHOT_MAX = 2
# The regime the question needs (majority learned, minority not), on vanilla's judge accuracy.
REGIME_MIN_MAJORITY, REGIME_MIN_GAP = 0.7, 0.3

# Methods whose flags are fixed before any run; "pogdiff-tuned" and "pogdiff-sampling" get theirs from the
# pilot (`method_flags`).
FIXED_METHODS: dict[str, list[str]] = {
    "vanilla": ["--objective", "vanilla"],
    "pogdiff": ["--objective", "pogdiff"],
    "pogdiff-ngrad": ["--objective", "pogdiff", "--neighbor_grad"],
    "cbdm": ["--objective", "cbdm"],
    "t2h": ["--objective", "t2h"],
    "vanilla-balanced": ["--objective", "vanilla", "--sampling", "balanced"],
    "vanilla-sqrt": ["--objective", "vanilla", "--sampling", "sqrt"],
    "vanilla-density": ["--objective", "vanilla", "--sampling", "density"],
}
TUNED_METHODS = ("pogdiff-tuned", "pogdiff-sampling")
METHOD_LABELS = {
    "vanilla": "Vanilla",
    "pogdiff": "PoGDiff",
    "pogdiff-ngrad": "PoGDiff, literal gradient (--neighbor_grad)",
    "pogdiff-tuned": "PoGDiff, a2/a3 from validation",
    "cbdm": "CBDM",
    "t2h": "T2H",
    "vanilla-balanced": "Vanilla + balanced",
    "vanilla-sqrt": "Vanilla + sqrt",
    "vanilla-density": "Vanilla + density",
    "pogdiff-sampling": "PoGDiff + sampling from validation",
}
# Table columns: (key, label, higher is better, digits). "accuracy" is the judge's, our human-score analogue.
METRIC_COLUMNS = (
    ("accuracy", "Accuracy", True, 2),
    ("dino", "DINO", True, 3),
    ("grecall", "gRecall", True, 3),
    ("fid", "FID", False, 2),
)
SHOT_GROUPS = ("all", "many", "few")

STROKE_WORDS = ("thin", "medium", "thick")
SLANT_WORDS = ("slanted left", "upright", "slanted right")
WIDTH_WORDS = ("narrow", "wide")


@dataclass(frozen=True)
class StudySize:
    """Everything a `--size` fixes. All methods of the main table share these numbers (and the pilot's budget)."""

    judge_per_class: int  # images per class only the judge sees
    validation_per_class: int  # images per evaluated class only the pilot sees
    base_vae_steps: int
    base_unet_steps: int
    base_batch_size: int
    base_lr: float
    finetune_batch_size: int
    # the pilot's budget grid, tried in this order (cheapest first); the first that reaches the regime is used
    pilot_budgets: tuple[tuple[float, int], ...]
    # PoGDiff's (a2, a3) grid and the sampling schemes tried on the validation side at the chosen budget
    psi_grid: tuple[tuple[float, float], ...]
    pilot_samplings: tuple[str, ...]
    pilot_shape: str
    guidance_scales: tuple[float, ...]
    images_per_identity: int
    inference_steps: int
    judge_max_iter: int
    shapes: tuple[str, ...]
    # caption style -> methods run for it (the first style is the primary one)
    methods: dict[str, tuple[str, ...]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1, 2)
    # --part per-image: the methods run on the base whose pretraining also trained the text encoder
    per_image_methods: tuple[str, ...] = (
        "vanilla", "pogdiff", "pogdiff-ngrad", "cbdm", "t2h", "vanilla-balanced",
    )  # fmt: skip
    # --part tradeoff: the dial's points (--sampling_power; 1 = vanilla's uniform draw), the tempered density
    # clips (--sampling density --density_w_max), each at these multiples of the pilot's step budget
    tradeoff_powers: tuple[float, ...] = (1.0, 0.5, 0.25, 0.0)
    tradeoff_density_w_max: tuple[float, ...] = (2.0, 4.0)
    tradeoff_budget_factors: tuple[int, ...] = (1, 2)


ALL_METHODS = (*FIXED_METHODS, *TUNED_METHODS)
SIZES: dict[str, StudySize] = {
    # Sized for about 1.5 hours on 2 cores with --jobs 2 (see README.md).
    "full": StudySize(
        judge_per_class=60,
        validation_per_class=40,
        base_vae_steps=150,
        base_unet_steps=800,
        base_batch_size=32,
        base_lr=2e-3,
        finetune_batch_size=16,
        pilot_budgets=((5e-4, 200), (1e-3, 200), (5e-4, 400), (1e-3, 400)),
        psi_grid=(
            (1.0, 1.0),
            (1.0, 0.1),
            (1.0, 0.01),
            (20.0, 0.1),
            (20.0, 0.01),
            (20.0, 0.001),
            (20.0, 1e-4),
            (20.0, 1e-5),
        ),  # fmt: skip
        pilot_samplings=("balanced", "sqrt", "density"),
        pilot_shape="M",
        guidance_scales=(1.0, 2.0, 3.0, 5.0),
        images_per_identity=20,
        inference_steps=20,
        judge_max_iter=300,
        shapes=("M",),
        methods={"attr": ALL_METHODS, "template": ALL_METHODS},
    ),
    # Runs end to end in a few minutes on 2 cores (tests/test_study.py); numbers mean nothing.
    "ci": StudySize(
        judge_per_class=40,
        validation_per_class=34,
        base_vae_steps=8,
        base_unet_steps=8,
        base_batch_size=8,
        base_lr=2e-3,
        finetune_batch_size=4,
        pilot_budgets=((5e-4, 3),),
        psi_grid=((20.0, 0.1),),
        pilot_samplings=("density",),
        pilot_shape="S",
        guidance_scales=(2.0,),
        images_per_identity=2,
        inference_steps=3,
        judge_max_iter=30,
        shapes=("S",),
        methods={
            "attr": (
                "vanilla",
                "pogdiff",
                "pogdiff-ngrad",
                "pogdiff-tuned",
                "cbdm",
                "t2h",
                "pogdiff-sampling",
            ),
            "template": ("pogdiff",),
        },
        seeds=(0,),
        per_image_methods=("vanilla", "pogdiff", "vanilla-balanced"),
        # The map's machinery at both budgets; `--sampling density` already runs in the pilot above, and the
        # density dial's flags are checked in tests/test_study.py without a run.
        tradeoff_powers=(1.0, 0.0),
        tradeoff_density_w_max=(),
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Data: digits, splits, captions
# ----------------------------------------------------------------------------------------------------------------


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (N, 32, 32) uint8 grey images (ink bright) and (N,) labels; nothing downloaded.

    The same 8x8 -> 32 px conversion as the demo (`demo_digits.digit_image`), so both judge like with like.
    """
    from demo_digits import digit_image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([np.asarray(digit_image(pixels).convert("L")) for pixels in digits.images])
    return images.astype(np.uint8), digits.target.astype(np.int64)


def to_rgb32(image: np.ndarray) -> Image.Image:
    """A 32x32 grey digit as the RGB image every model and the judge read."""
    return Image.fromarray(image).convert("RGB")


def split_classes(
    labels: np.ndarray, judge_per_class: int, validation_per_class: int, seed: int = 0
) -> dict[int, dict[str, list[int]]]:
    """Per class, disjoint seeded parts: `judge` (the judge's only images), `validation` (evaluated classes only:
    the pilot's only images) and `model` (the rest: base pretraining, or the evaluated datasets)."""
    rng = np.random.default_rng(seed)
    split = {}
    for cls in sorted(set(labels.tolist())):
        rows = rng.permutation(np.flatnonzero(labels == cls)).tolist()
        n_validation = validation_per_class if cls in EVAL_CLASSES else 0
        if judge_per_class + n_validation + MAJORITY_IMAGES > len(rows):
            raise ValueError(
                f"Class {cls} has {len(rows)} images: too few for {judge_per_class} judge + {n_validation} "
                f"validation + {MAJORITY_IMAGES} training images; lower --size's per-class counts."
            )
        split[cls] = {
            "judge": sorted(rows[:judge_per_class]),
            "validation": sorted(rows[judge_per_class : judge_per_class + n_validation]),
            "model": sorted(rows[judge_per_class + n_validation :]),
        }
    return split


def stroke_attributes(image: np.ndarray) -> dict[str, float]:
    """Attributes of a grey digit image (ink bright, background 0) computed from its pixels.

    - ink: fraction of pixels above half intensity (stroke thickness times length);
    - slant: horizontal shear of the ink per row from second moments, -mu11/mu02. Rows grow downward, so a
      digit whose top leans right has x falling as y grows (mu11 < 0): positive slant means "leans right";
    - width: width / height of the bounding box of the ink.
    """
    x = image.astype(np.float64) / 255.0
    total = x.sum()
    if total <= 0:
        raise ValueError("stroke_attributes got an empty (all-zero) image.")
    ys, xs = np.mgrid[0 : x.shape[0], 0 : x.shape[1]]
    cy, cx = (x * ys).sum() / total, (x * xs).sum() / total
    mu11 = (x * (xs - cx) * (ys - cy)).sum() / total
    mu02 = (x * (ys - cy) ** 2).sum() / total
    ink = x > 0.5
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    height = rows[-1] - rows[0] + 1 if len(rows) else 1
    width = cols[-1] - cols[0] + 1 if len(cols) else 1
    return {
        "ink": float(ink.mean()),
        "slant": float(-mu11 / mu02) if mu02 > 0 else 0.0,
        "width": float(width / height),
    }


def attribute_thresholds(attributes: Sequence[dict[str, float]]) -> dict[str, list[float]]:
    """Cut points of the caption words: terciles of ink and slant, the median of width.

    Computed on the base classes' model-side images only, so no evaluated image shapes the vocabulary.
    """

    def values(key: str) -> np.ndarray:
        return np.array([a[key] for a in attributes])

    return {
        "ink": np.quantile(values("ink"), [1 / 3, 2 / 3]).tolist(),
        "slant": np.quantile(values("slant"), [1 / 3, 2 / 3]).tolist(),
        "width": np.quantile(values("width"), [0.5]).tolist(),
    }


def describe(attributes: dict[str, float], thresholds: dict[str, list[float]]) -> str:
    """'thick strokes, slanted right, narrow': the words of each attribute's bin."""

    def word(key: str, words: Sequence[str]) -> str:
        return words[int(np.searchsorted(thresholds[key], attributes[key], side="right"))]

    return f"{word('ink', STROKE_WORDS)} strokes, {word('slant', SLANT_WORDS)}, {word('width', WIDTH_WORDS)}"


def caption(name: str, description: str | None) -> str:
    """The training caption: the paper's template, plus the image's description in the `attr` style."""
    return f"An image of {name}." if description is None else f"An image of {name}, {description}."


def class_identity(cls: int) -> str:
    """The real name of a class before masking (the builder replaces it by a pseudonym everywhere)."""
    return f"digit_{cls}"


def write_class_folders(
    root: Path, images: np.ndarray, rows_by_class: dict[int, list[int]], descriptions: dict[int, str]
) -> Path:
    """An image folder per class (`digit_<c>/<row>.png`) and an `attr` captions file keyed by file name."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions_attr.jsonl", "w", encoding="utf-8") as f:
        for cls, rows in rows_by_class.items():
            folder = root / class_identity(cls)
            folder.mkdir(exist_ok=True)
            for row in rows:
                file_name = f"{class_identity(cls)}/{row:05d}.png"
                to_rgb32(images[row]).save(root / file_name)
                text = caption(class_identity(cls), descriptions[row])
                f.write(json.dumps({"file_name": file_name, "text": text}) + "\n")
    return root


def build_shape(output_dir: Path, class_dir: Path, shape: str, style: str, seed: int = 0) -> dict[str, Any]:
    """One long-tailed dataset (paper shape S or M) in caption `style`; cached by its summary.json.

    `seed` picks which classes are majority and minority and their pseudonyms (the pilot uses another one).
    """
    from pogdiff.longtail import build_longtail_dataset

    summary_path = output_dir / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    majority_ids, minority_ids = SHAPES[shape]
    return build_longtail_dataset(
        str(output_dir),
        image_dir=str(class_dir),
        majority_ids=majority_ids,
        majority_images=MAJORITY_IMAGES,
        minority_ids=minority_ids,
        minority_images=MINORITY_IMAGES,
        selection="random",
        captions_file=str(class_dir / "captions_attr.jsonl") if style == "attr" else None,
        caption_template=EVAL_PROMPT,
        pseudonym_seed=seed,
        seed=seed,
        overwrite=True,
        show_progress=False,
    )


def pseudonym_classes(dataset_dir: Path) -> dict[str, int]:
    """pseudonym -> digit class, from the builder's names.json."""
    names = json.loads((dataset_dir / "names.json").read_text(encoding="utf-8"))
    return {pseudonym: int(real.rsplit("_", 1)[1]) for pseudonym, real in names.items()}


# ----------------------------------------------------------------------------------------------------------------
# Judge: a classifier trained on judge-side images only; its hidden layer is the evaluation feature extractor
# ----------------------------------------------------------------------------------------------------------------

JUDGE_ENV = "POGDIFF_STUDY_JUDGE"
JUDGE_SIZE = 8  # the scans' own resolution: upscaling adds no information a judge should rely on


def grey_vectors(images: Sequence[Image.Image]) -> np.ndarray:
    """(n, 64) float32 in [0, 1]: each image as 8x8 grey, box-averaged (generated images are 32 px RGB)."""
    return np.stack(
        [
            np.asarray(
                image.convert("L").resize((JUDGE_SIZE, JUDGE_SIZE), Image.Resampling.BOX), np.float32
            ).reshape(-1)
            / 255.0
            for image in images
        ]
    )


def train_judge(
    images: np.ndarray, labels: np.ndarray, rows: Sequence[int], max_iter: int, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An MLP (64 -> 128 ReLU -> 10) on judge-side images: 80% train, 20% held out for its accuracy."""
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x = grey_vectors([to_rgb32(images[r]) for r in rows])
    y = labels[list(rows)]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=max_iter, random_state=seed, alpha=1e-3)
    with _quiet_sklearn():
        clf.fit(x_train, y_train)
    predicted = clf.predict(x_test)
    per_class = {int(c): float((predicted[y_test == c] == c).mean()) for c in sorted(set(y_test.tolist()))}
    weights = {
        "w1": clf.coefs_[0].astype(np.float32),
        "b1": clf.intercepts_[0].astype(np.float32),
        "w2": clf.coefs_[1].astype(np.float32),
        "b2": clf.intercepts_[1].astype(np.float32),
        "classes": clf.classes_.astype(np.int64),
    }
    report = {
        "model": "sklearn MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3) on 8x8 grey pixels",
        "n_train": len(y_train),
        "n_heldout": len(y_test),
        "heldout_accuracy": float((predicted == y_test).mean()),
        "heldout_accuracy_per_class": per_class,
        "iterations": int(clf.n_iter_),
    }
    return weights, report


@contextlib.contextmanager
def _quiet_sklearn():
    """sklearn warns when max_iter ends the fit before convergence; the held-out accuracy is the real check."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


def judge_hidden(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ weights["w1"] + weights["b1"], 0.0)


def judge_predict(weights: dict[str, np.ndarray], images: Sequence[Image.Image]) -> np.ndarray:
    """Predicted digit class of each image."""
    logits = judge_hidden(weights, grey_vectors(images)) @ weights["w2"] + weights["b2"]
    return weights["classes"][logits.argmax(axis=1)]


_JUDGE_CACHE: dict[str, dict[str, np.ndarray]] = {}


def load_judge(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = str(path)
    if path not in _JUDGE_CACHE:
        with np.load(path) as data:
            _JUDGE_CACHE[path] = {key: data[key] for key in data.files}
    return _JUDGE_CACHE[path]


def judge_features(images: list[Image.Image]) -> np.ndarray:
    """`module:function` feature extractor for evaluate_pogdiff.py: the judge's 128-d hidden layer.

    Reads the judge from the file named by $POGDIFF_STUDY_JUDGE (written by this script as `judge.npz`). The
    judge knows digits the way the paper's face-recognition model knows faces, which is what FID, DINO score and
    gRecall need to measure identity rather than layout.
    """
    path = os.environ.get(JUDGE_ENV)
    if not path:
        raise ValueError(
            f"judge_features reads the judge classifier from ${JUDGE_ENV}; set it to the judge.npz that "
            "examples/study/run_study.py wrote in its --work_dir."
        )
    return judge_hidden(load_judge(path), grey_vectors(images))


# ReLU activations all lie in the positive orthant, so raw cosines are high for any two digits; centring on the
# real images' mean (as evaluate_pogdiff.py does for such extractors) makes cosine separate classes.
judge_features.centre_on_real = True


# ----------------------------------------------------------------------------------------------------------------
# Models: base pretraining, fine-tuning, evaluation
# ----------------------------------------------------------------------------------------------------------------


def build_base(
    output_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    rows: Sequence[int],
    descriptions: dict[int, str],
    names: dict[int, str],
    size: StudySize,
    train_text_encoder: bool = False,
) -> dict[str, Any]:
    """The tiny SD pretrained on the base classes; each image appears with a template and an `attr` caption.

    Both caption styles are in pretraining so that the evaluation prompt "An image of {name}." is in the base
    model's distribution whichever style fine-tuning uses (as short prompts are for SD). With
    `train_text_encoder` the text encoder learns beside the UNet (`--part per-image`). Cached.
    """
    from pogdiff.pretrain import build_base_model

    summary_path = output_dir / "pretraining.json"
    if summary_path.is_file() and (output_dir / "model_index.json").is_file():
        return json.loads(summary_path.read_text(encoding="utf-8"))
    pictures, captions = [], []
    for row in rows:
        name = names[int(labels[row])]
        for description in (None, descriptions[row]):
            pictures.append(to_rgb32(images[row]))
            captions.append(caption(name, description))
    return build_base_model(
        str(output_dir),
        images=pictures,
        captions=captions,
        vae_steps=size.base_vae_steps,
        unet_steps=size.base_unet_steps,
        batch_size=size.base_batch_size,
        lr=size.base_lr,
        vae_lr=1e-3,
        source=f"sklearn digits classes {list(BASE_CLASSES)}, {len(rows)} images x 2 caption styles",
        train_text_encoder=train_text_encoder,
    )


@dataclass(frozen=True)
class Budget:
    """The fine-tuning budget every method of a table shares."""

    learning_rate: float
    steps: int


def method_flags(pilot: dict[str, Any]) -> dict[str, list[str]]:
    """Every method's own train_pogdiff.py flags; the tuned ones from the pilot's choices."""
    a2, a3 = pilot["psi_choice"]["a2"], pilot["psi_choice"]["a3"]
    return {
        **FIXED_METHODS,
        "pogdiff-tuned": ["--objective", "pogdiff", "--psi_a2", str(a2), "--psi_a3", str(a3)],
        "pogdiff-sampling": ["--objective", "pogdiff", "--sampling", pilot["sampling_choice"]["sampling"]],
    }


def finetune_args(
    base: Path, dataset: Path, output_dir: Path, index_dir: Path, flags: Sequence[str], seed: int,
    budget: Budget, size: StudySize,
) -> list[str]:  # fmt: skip
    """train_pogdiff.py's arguments: identical for every method except the method's own `flags`."""
    from pogdiff.pretrain import finetune_arguments

    return [
        *finetune_arguments(
            base, dataset, output_dir,
            batch_size=size.finetune_batch_size, steps=budget.steps,
            learning_rate=budget.learning_rate, seed=seed, resolution=RESOLUTION,
        ),
        "--index_cache_dir", str(index_dir),
        "--report_to", "tensorboard",
        *flags,
    ]  # fmt: skip


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors: logging, tqdm and C code alike) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def fine_tune(args: list[str], output_dir: Path) -> tuple[float, bool, float | None]:
    """Runs train_pogdiff.py in this process; returns (wall time in s, whether it trained now, CPU time in s of
    this process while it trained: the cost on a busy machine, where wall time also counts the waiting).

    Skipped when `output_dir` holds the model of a run with the very same arguments; a run there with other
    arguments (e.g. a pilot choice that changed) is removed and trained again. Its log goes to
    `output_dir/train.log`, so that runs side by side do not interleave on the console.
    """
    info_path = output_dir / "study_run.json"
    if (output_dir / "model_index.json").is_file() and info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info["args"] == args:
            return float(info["wall_time_s"]), False, info.get("cpu_time_s")
        logger.warning("%s was trained with other arguments; training it again.", output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    from accelerate.state import AcceleratorState, GradientState

    import train_pogdiff

    # A fresh accelerate state, as a new `python train_pogdiff.py` process would have.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    output_dir.mkdir(parents=True, exist_ok=True)
    log_path = output_dir / "train.log"
    started, cpu_started = time.perf_counter(), time.process_time()
    with output_to(log_path):
        try:
            train_pogdiff.run(args)
        except SystemExit as error:
            raise RuntimeError(
                f"train_pogdiff.py failed for {output_dir} (exit {error.code}); see {log_path}."
            ) from error
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    info_path.write_text(
        json.dumps({"args": args, "wall_time_s": round(wall, 1), "cpu_time_s": round(cpu, 1)}, indent=1),
        encoding="utf-8",
    )
    return wall, True, cpu


def training_log_series(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar train_pogdiff.py logged to TensorBoard, per optimizer step in step order (lr excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for path in sorted((run_dir / "logs").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            if tag != "lr":
                series.setdefault(tag, {}).update({e.step: float(e.value) for e in events.Scalars(tag)})
    return {tag: [values[s] for s in sorted(values)] for tag, values in series.items()}


def diagnostics(series: dict[str, list[float]]) -> dict[str, float]:
    """The mechanism's numbers of one run: each logged scalar's mean over training and over its last quarter,
    and the consistency term's share of the loss (per step, then averaged) the same two ways."""
    out: dict[str, float] = {}
    for tag, values in series.items():
        last = values[len(values) * 3 // 4 :] or values
        out[f"{tag}_mean"] = float(np.mean(values))
        out[f"{tag}_last_quarter"] = float(np.mean(last))
    if "loss_consistency" in series and "loss_main" in series:
        share = [
            c / (m + c) if m + c > 0 else 0.0 for m, c in zip(series["loss_main"], series["loss_consistency"])
        ]
        out["consistency_share_mean"] = float(np.mean(share))
        out["consistency_share_last_quarter"] = float(np.mean(share[len(share) * 3 // 4 :] or share))
    return out


def evaluate_one(
    name: str, model: Path, dataset: Path, output_dir: Path, seed: int, size: StudySize, judge_path: Path,
    guidance_scale: float,
) -> dict[str, Any]:  # fmt: skip
    """evaluate_pogdiff.py on one model, plus the judge's accuracy per identity; images reused when on disk."""
    import evaluate_pogdiff

    os.environ[JUDGE_ENV] = str(judge_path)
    argv = [
        "--train_data_dir", str(dataset),
        "--output_dir", str(output_dir),
        "--images_per_identity", str(size.images_per_identity),
        "--num_inference_steps", str(size.inference_steps),
        "--guidance_scale", str(guidance_scale),
        "--resolution", str(RESOLUTION),
        "--seed", str(seed),
        "--batch_size", "20",
        "--prompt_template", EVAL_PROMPT,
        "--feature_extractor", "run_study:judge_features",
        "--device", "cpu",
        "--model", f"{name}={model}",
    ]  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    with output_to(output_dir / "evaluate.log"):
        report = evaluate_pogdiff.main(argv)
    weights = load_judge(judge_path)
    classes = pseudonym_classes(dataset)
    accuracy = {}
    for identity, meta in report["identities"].items():
        paths = [output_dir / name / meta["folder"] / f"{i:03d}.png" for i in range(size.images_per_identity)]
        predicted = judge_predict(weights, [Image.open(p).convert("RGB") for p in paths])
        accuracy[identity] = float((predicted == classes[identity]).mean())
    report["models"][name]["accuracy_per_identity"] = accuracy
    return report


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_tasks(fn: Callable, tasks: Sequence[tuple], jobs: int, threads: int, desc: str) -> list[Any]:
    """`fn(*task)` for every task, `jobs` at a time in separate processes (in this one when jobs == 1), in order.

    Processes, not threads: each fine-tune holds the GIL most of the time and sets its own global state.
    """
    from tqdm.auto import tqdm

    if not tasks:
        return []
    if jobs <= 1:
        return [fn(*task) for task in tqdm(tasks, desc=desc, file=sys.stdout)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(threads,),
    ) as pool:
        futures = [pool.submit(fn, *task) for task in tasks]
        for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, file=sys.stdout):
            pass
        return [future.result() for future in futures]


# ----------------------------------------------------------------------------------------------------------------
# Metrics per seed, the regime check
# ----------------------------------------------------------------------------------------------------------------


def seed_metrics(report: dict[str, Any], model: str) -> dict[str, dict[str, float | None]]:
    """One model's numbers of one seed: metric -> {"all", "many", "few"}, each the mean over those identities of
    the per-identity values that exist (None when none does)."""
    few = set(report["split"]["few"])
    identities = list(report["identities"])
    groups = {
        "all": identities,
        "many": [i for i in identities if i not in few],
        "few": [i for i in identities if i in few],
    }
    result = report["models"][model]
    per_identity = {"accuracy": result["accuracy_per_identity"]}
    for metric in ("dino", "grecall", "fid"):
        per_identity[metric] = {i: result["per_identity"][i][metric] for i in identities}
    out: dict[str, dict[str, float | None]] = {}
    for metric, values in per_identity.items():
        out[metric] = {}
        for group, members in groups.items():
            present = [values[i] for i in members if values[i] is not None]
            out[metric][group] = float(np.mean(present)) if present else None
    return out


def regime_check(many: float | None, few: float | None) -> dict[str, Any]:
    """Whether vanilla's judge accuracies are in the regime the question needs: majority learned (>= 0.7), minority
    not (at least 0.3 below)."""
    # The 1e-9 keeps the bounds inclusive under float rounding (0.7 - 0.3 is 0.3999...).
    ok = (
        many is not None
        and few is not None
        and many >= REGIME_MIN_MAJORITY - 1e-9
        and few <= many - REGIME_MIN_GAP + 1e-9
    )
    return {
        "majority_accuracy": many,
        "few_shot_accuracy": few,
        "rule": f"majority >= {REGIME_MIN_MAJORITY} and few-shot <= majority - {REGIME_MIN_GAP}",
        "informative": bool(ok),
    }


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the non-missing values."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(present, ddof=1)) if len(present) > 1 else 0.0
    return {"mean": float(np.mean(present)), "std": std, "n": len(present)}


def format_cell(entry: dict[str, Any], digits: int) -> str:
    """'0.52 ± 0.04' (or 'n/a' when no seed had a value; no ± for a single seed)."""
    if entry["mean"] is None:
        return "n/a"
    if entry["n"] < 2:
        return f"{entry['mean']:.{digits}f}"
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def summarize_group(per_seed: dict[str, dict[str, dict[str, dict[str, float | None]]]]) -> dict[str, Any]:
    """method -> metric -> group -> mean/std over seeds, from per_seed[seed][method][metric][group]."""
    methods = list(next(iter(per_seed.values())))
    return {
        method: {
            metric: {
                group: mean_std([per_seed[seed][method][metric][group] for seed in per_seed])
                for group in SHOT_GROUPS
            }
            for metric, *_ in METRIC_COLUMNS
        }
        for method in methods
    }


def markdown_table(summary: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    """The paper's table shape, with the majority ("Many") beside the few-shot column for every metric."""
    labels = {**METHOD_LABELS, **(labels or {})}
    header = ["Method"] + [
        f"{label} {'↑' if higher else '↓'} {group.capitalize()}"
        for _, label, higher, _ in METRIC_COLUMNS
        for group in SHOT_GROUPS
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, metrics in summary.items():
        cells = [labels.get(method, method)]
        for metric, _, _, digits in METRIC_COLUMNS:
            cells += [format_cell(metrics[metric][group], digits) for group in SHOT_GROUPS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DIAGNOSTIC_COLUMNS = (
    ("consistency_share_mean", "consistency share of loss (mean)", "{:.1%}"),
    ("consistency_share_last_quarter", "(last quarter)", "{:.1%}"),
    ("psi_majority_mean", "psi majority", "{:.3g}"),
    ("psi_minority_mean", "psi minority", "{:.3g}"),
    ("neighbor_same_identity_mean", "neighbours of the same identity", "{:.0%}"),
    ("frac_skipped_mean", "rows skipped", "{:.0%}"),
    ("neighbor_mse_mean", "mean (a - c)^2", "{:.4f}"),
)


def diagnostics_table(group: dict[str, Any], labels: dict[str, str]) -> str:
    """PoGDiff runs' mechanism numbers, means over seeds: what explains a result either way."""
    header = ["Method"] + [label for _, label, _ in DIAGNOSTIC_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in group["methods"]:
        runs = [group["diagnostics"][seed][method] for seed in group["diagnostics"]]
        if not any("consistency_share_mean" in run for run in runs):
            continue
        cells = [labels.get(method, method)]
        for key, _, fmt in DIAGNOSTIC_COLUMNS:
            values = [run[key] for run in runs if key in run]
            cells.append(fmt.format(float(np.mean(values))) if values else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_accuracy_figure(fig, ax, title: str, fontsize: int, path: Path) -> None:
    """Finishes a few-shot vs majority accuracy figure as every such figure here is (both axes in [0, 1],
    labelled, legend, grid) and saves it as a PNG."""
    import matplotlib.pyplot as plt

    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("majority identities: judge accuracy (30 training images each)")
    ax.set_ylabel("few-shot identities: judge accuracy (2 training images each)")
    ax.set_title(title, fontsize=fontsize)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tradeoff(group: dict[str, Any], labels: dict[str, str], path: Path) -> None:
    """tradeoff.png: few-shot vs majority judge accuracy, one point per method (mean, error bars: std over
    seeds), so that what a method buys on the minority and pays on the majority is visible at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    markers = "osD^v<>phX*"
    for i, method in enumerate(group["methods"]):
        acc = group["summary"][method]["accuracy"]
        x, y = acc["many"], acc["few"]
        if x["mean"] is None or y["mean"] is None:
            continue
        ax.errorbar(
            x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt=markers[i % len(markers)], capsize=3,
            markersize=7, label=labels.get(method, method),
        )  # fmt: skip
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.axvline(REGIME_MIN_MAJORITY, color="tab:red", linewidth=0.8, linestyle="--")
    save_accuracy_figure(
        fig,
        ax,
        f"Shape {group['shape']}, captions `{group['caption_style']}`: mean ± std over seeds\n"
        f"(red: the regime's majority threshold {REGIME_MIN_MAJORITY}; dotted: few = many)",
        fontsize=9,
        path=path,
    )


def plot_few_shot_grid(
    eval_dir: Path, report: dict[str, Any], dataset: Path, methods: Sequence[str], labels: dict[str, str],
    path: Path, per_identity: int = 4,
) -> None:  # fmt: skip
    """A column block per few-shot identity (its 2 training images, then generated ones), a row per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    few = report["split"]["few"]
    metadata = [
        json.loads(line) for line in (dataset / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    train = {
        i: [r["file_name"] for r in metadata if r["identity"] == i and r["split"] == "train"] for i in few
    }
    n = min(per_identity, report["generation"]["images_per_identity"])
    rows = ["train", *methods]
    fig, axes = plt.subplots(
        len(rows), len(few) * n, figsize=(0.75 * len(few) * n + 3.2, 0.75 * len(rows) + 0.6), squeeze=False
    )
    for r, row in enumerate(rows):
        for b, identity in enumerate(few):
            for c in range(n):
                ax = axes[r][b * n + c]
                ax.set_xticks([])
                ax.set_yticks([])
                if row == "train":
                    files = train[identity]
                    image = Image.open(dataset / files[c]) if c < len(files) else None
                else:
                    folder = report["identities"][identity]["folder"]
                    image = Image.open(eval_dir / row / row / folder / f"{c:03d}.png")
                if image is not None:
                    ax.imshow(np.asarray(image.convert("L")), cmap="gray", vmin=0, vmax=255)
                else:
                    ax.axis("off")
                if r == 0 and c == 0:
                    ax.set_title(identity, fontsize=8, loc="left")
        axes[r][0].set_ylabel(
            "training images" if row == "train" else labels.get(row, row),
            rotation=0, ha="right", va="center", fontsize=7,
        )  # fmt: skip
    fig.suptitle("Few-shot identities: training images, then generated (same noise per column)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Data and models every stage shares."""

    thresholds: dict[str, list[float]]
    base: Path
    base_summary: dict[str, Any]
    judge_path: Path
    judge_report: dict[str, Any]
    class_dirs: dict[str, Path]


def prepare(work_dir: Path, size: StudySize, train_text_encoder: bool = False) -> Prepared:
    """Digits splits, captions, class folders, the judge and the base model (each cached in work_dir): the
    v2 base (`base-model`, text encoder frozen at random) or, with `train_text_encoder`, `base-model-te`."""
    from pogdiff.longtail import assign_pseudonyms

    images, labels = load_digit_images()
    split = split_classes(labels, size.judge_per_class, size.validation_per_class)
    generative_rows = [r for c in split for part in ("model", "validation") for r in split[c][part]]
    attributes = {r: stroke_attributes(images[r]) for r in generative_rows}
    thresholds = attribute_thresholds([attributes[r] for c in BASE_CLASSES for r in split[c]["model"]])
    descriptions = {r: describe(attributes[r], thresholds) for r in generative_rows}

    class_dirs = {}
    for part in ("model", "validation"):
        folder = work_dir / "data" / f"classes-eval-{part}"
        if not (folder / "captions_attr.jsonl").is_file():
            write_class_folders(folder, images, {c: split[c][part] for c in EVAL_CLASSES}, descriptions)
        class_dirs[part] = folder

    judge_path = work_dir / "judge.npz"
    judge_report_path = work_dir / "judge.json"
    if judge_path.is_file() and judge_report_path.is_file():
        judge_report = json.loads(judge_report_path.read_text(encoding="utf-8"))
    else:
        judge_rows = [r for c in split for r in split[c]["judge"]]
        logger.info("Training the judge classifier on %d judge-side images", len(judge_rows))
        weights, judge_report = train_judge(images, labels, judge_rows, size.judge_max_iter)
        np.savez(judge_path, **weights)
        judge_report_path.write_text(json.dumps(judge_report, indent=1), encoding="utf-8")
    logger.info("Judge held-out accuracy: %.3f", judge_report["heldout_accuracy"])
    os.environ[JUDGE_ENV] = str(judge_path)  # for `run_study:judge_features` in training and evaluation

    # Base-class pseudonyms come from another seed than the datasets' (0 and 1); a clash would leak a name.
    base_names = assign_pseudonyms([class_identity(c) for c in BASE_CLASSES], seed=7)
    names = {c: base_names[class_identity(c)] for c in BASE_CLASSES}
    base = work_dir / ("base-model-te" if train_text_encoder else "base-model")
    logger.info("Base model (classes %s) in %s", list(BASE_CLASSES), base)
    base_summary = build_base(
        base, images, labels, [r for c in BASE_CLASSES for r in split[c]["model"]], descriptions, names, size,
        train_text_encoder,
    )  # fmt: skip
    base_summary["pseudonyms"] = {str(c): n for c, n in names.items()}
    return Prepared(thresholds, base, base_summary, judge_path, judge_report, class_dirs)


def guidance_check(
    base: Path, names: dict[str, str], judge_path: Path, scales: Sequence[float], size: StudySize, n: int = 16
) -> list[dict[str, Any]]:
    """The base model on its own classes at each guidance scale: the judge's accuracy (picks the scale)."""
    import torch

    from pipeline_pogdiff import PoGDiffPipeline

    pipe = PoGDiffPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    weights = load_judge(judge_path)
    rows = []
    for scale in scales:
        per_class = {}
        for cls, name in names.items():
            images = pipe(
                [EVAL_PROMPT.format(name=name)] * n,
                height=RESOLUTION,
                width=RESOLUTION,
                num_inference_steps=size.inference_steps,
                guidance_scale=scale,
                generator=[torch.Generator().manual_seed(i) for i in range(n)],
            ).images
            per_class[cls] = float((judge_predict(weights, images) == int(cls)).mean())
        rows.append(
            {
                "guidance_scale": scale,
                "accuracy": float(np.mean(list(per_class.values()))),
                "per_class": per_class,
            }
        )
        print(
            f"base model, guidance {scale}: judge accuracy {rows[-1]['accuracy']:.2f} {per_class}", flush=True
        )
    return rows


def check_clash(dataset: Path, prepared: Prepared) -> dict[str, int]:
    classes = pseudonym_classes(dataset)
    clash = set(classes) & set(prepared.base_summary["pseudonyms"].values())
    if clash:
        raise RuntimeError(f"Pseudonyms {sorted(clash)} name both a base class and an evaluated one.")
    return classes


def train_and_evaluate(
    prepared: Prepared, runs: Sequence[tuple[str, Path, list[str]]], dataset: Path, eval_dir: Path, seed_of: dict[str, int],
    size: StudySize, guidance: float, jobs: int, threads: int, desc: str,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Fine-tunes `runs` (key, output dir, flags) and evaluates each; key -> {report, wall_time_s, diagnostics}."""
    trained = run_tasks(
        fine_tune, [(args, out) for _, out, args in runs], jobs, threads, f"{desc}: fine-tuning"
    )
    for (key, _, _), (_, now, _) in zip(runs, trained):
        if now and (eval_dir / key).exists():
            shutil.rmtree(eval_dir / key)  # images of an older model of that name
    reports = run_tasks(
        evaluate_one,
        [
            (key.rsplit("/", 1)[-1], out, dataset, eval_dir / key, seed_of[key], size, prepared.judge_path, guidance)
            for key, out, _ in runs
        ],
        jobs, threads, f"{desc}: evaluating",
    )  # fmt: skip
    return {
        key: {
            "report": report,
            "wall_time_s": round(wall, 1),
            "cpu_time_s": None if cpu is None else round(cpu, 1),
            "diagnostics": diagnostics(training_log_series(out)),
        }
        for (key, out, _), (wall, _, cpu), report in zip(runs, trained, reports)
    }


def pilot_search_space(size: StudySize) -> dict[str, Any]:
    """What the pilot searches (its cache is valid for exactly this), JSON-normalised."""
    keys = ("pilot_budgets", "psi_grid", "pilot_samplings", "pilot_shape", "guidance_scales")
    return json.loads(json.dumps({key: getattr(size, key) for key in keys}))


def pilot_budget(
    prepared: Prepared, root: Path, dataset: Path, style: str, size: StudySize, jobs: int, threads: int
) -> dict[str, Any]:
    """Steps 1 and 2 of the pilot, on `prepared.base`: the guidance scale (the base model on its own classes; the
    smallest scale within 0.02 of the best judge accuracy) and the budget (vanilla, seed 0, on the validation
    set `dataset` at each (lr, steps) of the size's grid, cheapest first and `jobs` at a time, stopping once one
    is in the regime; the cheapest whose vanilla is in the regime, else the one with the best majority accuracy).
    Runs go to root/pilot, images to root/pilot-eval. The returned dict also holds "results" (every run's
    evaluation, for the caller's further choices)."""
    scales = guidance_check(
        prepared.base, prepared.base_summary["pseudonyms"], prepared.judge_path, size.guidance_scales, size
    )
    best = max(row["accuracy"] for row in scales)
    guidance = min(row["guidance_scale"] for row in scales if row["accuracy"] >= best - 0.02)
    index_dir = root / "index" / "validation"
    budgets = [Budget(lr, steps) for lr, steps in size.pilot_budgets]
    results: dict[str, dict[str, Any]] = {}
    rows = []
    # Cheapest first, `jobs` budgets at a time; once one is in the regime, the dearer ones are not needed.
    for start in range(0, len(budgets), jobs):
        batch, runs = budgets[start : start + jobs], []
        for budget in batch:
            tag = f"lr{budget.learning_rate:g}-steps{budget.steps}"
            out = root / "pilot" / tag / "vanilla"
            args = finetune_args(
                prepared.base, dataset, out, index_dir, FIXED_METHODS["vanilla"], 0, budget, size
            )
            runs.append((f"{tag}/vanilla", out, args))
        results.update(
            train_and_evaluate(
                prepared,
                runs,
                dataset,
                root / "pilot-eval",
                {k: 0 for k, _, _ in runs},
                size,
                guidance,
                jobs,
                threads,
                "pilot budget",
            )  # fmt: skip
        )
        for budget, (key, _, _) in zip(batch, runs):
            acc = seed_metrics(results[key]["report"], "vanilla")["accuracy"]
            rows.append({**asdict(budget), "accuracy": acc, "regime": regime_check(acc["many"], acc["few"])})
        if any(row["regime"]["informative"] for row in rows):
            break
    reached = [row for row in rows if row["regime"]["informative"]]
    chosen = reached[0] if reached else max(rows, key=lambda row: row["accuracy"]["many"] or 0.0)
    budget = Budget(chosen["learning_rate"], chosen["steps"])
    print(
        f"pilot ({root.name}): budget lr {budget.learning_rate:g}, {budget.steps} steps "
        f"(regime reached: {bool(reached)}), guidance {guidance:g}",
        flush=True,
    )
    return {
        "dataset": "long-tailed set of validation-side images (seed 1: other roles and pseudonyms than the "
        f"evaluated set), captions `{style}`",
        "shape": size.pilot_shape,
        "guidance_on_base_classes": scales,
        "guidance_scale": guidance,
        "budgets": rows,
        "regime_reached": bool(reached),
        "budget": asdict(budget),
        "results": results,
    }


def run_pilot(prepared: Prepared, work_dir: Path, size: StudySize, jobs: int, threads: int) -> dict[str, Any]:
    """Chooses, on the validation side only, the guidance scale, the budget, PoGDiff's a2/a3 and the sampling.

    1. Guidance: the base model on its own classes; the smallest scale within 0.02 of the best judge accuracy.
    2. Budget: vanilla (seed 0) on a long-tailed set of validation images at each (lr, steps) of the size's
       grid, cheapest first; the first budget whose vanilla is in the regime is used, else the one with the best
       majority accuracy (and the study is then marked uninformative).
    3. At that budget: PoGDiff over the (a2, a3) grid, and vanilla with each sampling scheme; the best few-shot
       accuracy wins (ties: the better majority). Cached in work_dir/pilot.json.
    """
    pilot_path = work_dir / "pilot.json"
    searched = pilot_search_space(size)
    if pilot_path.is_file():
        cached = json.loads(pilot_path.read_text(encoding="utf-8"))
        if cached.get("search_space") == searched:
            return cached
        # Another grid: choose again (runs and images already made are reused).
    dataset = work_dir / "data" / f"validation-{size.pilot_shape}"
    build_shape(dataset, prepared.class_dirs["validation"], size.pilot_shape, "attr", seed=1)
    check_clash(dataset, prepared)
    chosen = pilot_budget(prepared, work_dir, dataset, "attr", size, jobs, threads)
    budget, guidance, results = Budget(**chosen["budget"]), chosen["guidance_scale"], chosen.pop("results")
    index_dir = work_dir / "index" / "validation"

    def runs_for(budget: Budget, named_flags: dict[str, list[str]]) -> list[tuple[str, Path, list[str]]]:
        tag = f"lr{budget.learning_rate:g}-steps{budget.steps}"
        return [
            (f"{tag}/{name}", work_dir / "pilot" / tag / name,
             finetune_args(prepared.base, dataset, work_dir / "pilot" / tag / name, index_dir, flags, 0, budget, size))
            for name, flags in named_flags.items()
        ]  # fmt: skip

    def accuracies(result: dict[str, Any], name: str) -> dict[str, float | None]:
        return seed_metrics(result["report"], name)["accuracy"]

    named = {
        f"pogdiff-a2_{a2:g}-a3_{a3:g}": ["--objective", "pogdiff", "--psi_a2", str(a2), "--psi_a3", str(a3)]
        for a2, a3 in size.psi_grid
    }
    named.update({f"vanilla-{s}": ["--objective", "vanilla", "--sampling", s] for s in size.pilot_samplings})
    grid_runs = runs_for(budget, named)
    results.update(
        train_and_evaluate(
            prepared,
            grid_runs,
            dataset,
            work_dir / "pilot-eval",
            {k: 0 for k, _, _ in grid_runs},
            size,
            guidance,
            jobs,
            threads,
            "pilot grid",
        )  # fmt: skip
    )
    tag = f"lr{budget.learning_rate:g}-steps{budget.steps}"

    def score(name: str) -> tuple[float, float]:
        acc = accuracies(results[f"{tag}/{name}"], name)
        return (acc["few"] or 0.0, acc["many"] or 0.0)

    psi_rows = []
    for a2, a3 in size.psi_grid:
        name = f"pogdiff-a2_{a2:g}-a3_{a3:g}"
        diag = results[f"{tag}/{name}"]["diagnostics"]
        psi_rows.append({"a2": a2, "a3": a3, "accuracy": accuracies(results[f"{tag}/{name}"], name),
                         "consistency_share_mean": diag.get("consistency_share_mean"),
                         "neighbor_same_identity_mean": diag.get("neighbor_same_identity_mean")})  # fmt: skip
    psi_choice = max(psi_rows, key=lambda row: score(f"pogdiff-a2_{row['a2']:g}-a3_{row['a3']:g}"))
    sampling_rows = [
        {"sampling": s, "accuracy": accuracies(results[f"{tag}/vanilla-{s}"], f"vanilla-{s}")}
        for s in size.pilot_samplings
    ]
    sampling_choice = max(sampling_rows, key=lambda row: score(f"vanilla-{row['sampling']}"))
    pilot = {
        **chosen,
        "psi_grid": psi_rows,
        "psi_choice": {"a2": psi_choice["a2"], "a3": psi_choice["a3"]},
        "samplings": sampling_rows,
        "sampling_choice": {"sampling": sampling_choice["sampling"]},
        "rule": "budget: cheapest in the regime; a2/a3 and sampling: best few-shot accuracy, ties by majority",
        "search_space": searched,
        "wall_time_s": {key: r["wall_time_s"] for key, r in results.items()},
    }
    pilot_path.write_text(json.dumps(pilot, indent=1), encoding="utf-8")
    return pilot


def method_labels(pilot: dict[str, Any]) -> dict[str, str]:
    """Labels that say what the pilot chose."""
    a2, a3 = pilot["psi_choice"]["a2"], pilot["psi_choice"]["a3"]
    return {
        **METHOD_LABELS,
        "pogdiff-tuned": f"PoGDiff, a2 = {a2:g}, a3 = {a3:g} (from validation)",
        "pogdiff-sampling": f"PoGDiff + {pilot['sampling_choice']['sampling']} (from validation)",
    }


def psi_statistics(index_dir: Path, base: Path, few_shot_max: int = 2) -> list[dict[str, Any]]:
    """Per seed's cached index (VAE neighbours of `base`): expected psi per sample (a1=a2=a3=1, both terms)
    and its *effective* value.

    Effective psi counts a neighbour with the sample's own caption as 0: the trainer skips it because the two
    predictions are identical, so that is what training applies.
    """
    import torch

    from pogdiff.identities import is_few_shot
    from pogdiff.index import PoGDiffIndex
    from pogdiff.neighbors import neighbor_weights
    from pogdiff.psi import PsiParams, compute_psi

    stats, seeds = [], set()
    for folder in sorted(index_dir.glob("pogdiff-index-*")):
        index = PoGDiffIndex.load(folder)
        config = index.config
        # The same data indexed again under another spelling of the base path is the same table: count it once.
        if (
            config.get("neighbor_encoder") != "vae"
            or config.get("pretrained_model_name_or_path") != str(base)
            or config.get("seed") in seeds
        ):
            continue
        seeds.add(config.get("seed"))
        k = index.neighbor_ids.shape[1]
        same_id = index.identity_ids[index.neighbor_ids] == index.identity_ids[:, None]
        psi = compute_psi(
            index.neighbor_sims.reshape(-1),
            same_id.reshape(-1),
            index.txt_log_weights.repeat_interleave(k),
            PsiParams(),
        ).reshape(index.neighbor_sims.shape)
        w = neighbor_weights(index.neighbor_sims)
        same_text = index.text_ids[index.neighbor_ids] == index.text_ids[:, None]
        counts = torch.bincount(index.identity_ids)[index.identity_ids]
        stats.append(
            {
                "seed": index.config.get("seed"),
                "minority": is_few_shot(counts, few_shot_max).tolist(),
                "expected_psi": (w * psi).sum(1).tolist(),
                "effective_psi": (w * psi * (~same_text)).sum(1).tolist(),
                "same_identity_neighbor_fraction": float(same_id.float().mean()),
            }
        )
    return stats


def plot_psi(psi_by_group: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """psi.png: expected and effective psi per sample, majority vs minority, for each group (all seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g, stats in psi_by_group.items() if stats]
    fig, axes = plt.subplots(
        1, max(1, len(groups)), figsize=(3.2 * max(1, len(groups)) + 0.5, 3.4), squeeze=False
    )
    rng = np.random.default_rng(0)
    for ax, group in zip(axes[0], groups):
        stats = psi_by_group[group]
        for position, kind in enumerate(("expected_psi", "effective_psi")):
            for offset, (minority, colour) in enumerate([(False, "tab:blue"), (True, "tab:orange")]):
                values = [v for s in stats for v, m in zip(s[kind], s["minority"]) if m == minority]
                x = position * 2.5 + offset
                ax.scatter(x + rng.uniform(-0.25, 0.25, len(values)), values, s=6, alpha=0.4, color=colour)
                if values:
                    ax.hlines(np.mean(values), x - 0.35, x + 0.35, color="black", linewidth=2)
        ax.set_xticks(
            [0, 1, 2.5, 3.5], ["E[psi]\nmaj", "E[psi]\nmin", "applied\nmaj", "applied\nmin"], fontsize=8
        )
        ax.set_title(group, fontsize=9)
        ax.set_ylabel("psi per training image")
    fig.suptitle("PoGDiff psi: majority (blue) vs minority (orange); bar = mean", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_groups(
    prepared: Prepared, work_dir: Path, size: StudySize, pilot: dict[str, Any], shapes: Sequence[str],
    seeds: Sequence[int], jobs: int, threads: int, methods_by_style: dict[str, Sequence[str]] | None = None,
    root: Path | None = None, flags: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every caption style x shape: fine-tune every method for every seed, evaluate, aggregate.

    `methods_by_style` defaults to the size's, `flags` to `method_flags(pilot)`; runs, images and indexes go
    under `root` (default `work_dir`), the data sets under work_dir/data (shared by every part).
    """
    budget = Budget(**pilot["budget"])
    flags = method_flags(pilot) if flags is None else flags
    root = work_dir if root is None else root
    groups = []
    for style, methods in (size.methods if methods_by_style is None else methods_by_style).items():
        methods = tuple(methods)
        for shape in shapes:
            name = f"{style}-{shape}"
            dataset = work_dir / "data" / name
            summary = build_shape(dataset, prepared.class_dirs["model"], shape, style, seed=0)
            classes = check_clash(dataset, prepared)
            runs, seed_of = [], {}
            for seed in seeds:
                for method in methods:
                    key = f"seed{seed}/{method}"
                    out = root / "runs" / name / key
                    args = finetune_args(
                        prepared.base,
                        dataset,
                        out,
                        root / "index" / name,
                        flags[method],
                        seed,
                        budget,
                        size,
                    )
                    runs.append((key, out, args))
                    seed_of[key] = seed
            results = train_and_evaluate(
                prepared, runs, dataset, root / "eval" / name, seed_of, size, pilot["guidance_scale"],
                jobs, threads, name,
            )  # fmt: skip
            per_seed = {
                str(s): {m: seed_metrics(results[f"seed{s}/{m}"]["report"], m) for m in methods}
                for s in seeds
            }
            metadata = [
                json.loads(line)
                for line in (dataset / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            ]
            summary_by_method = summarize_group(per_seed)
            vanilla = summary_by_method.get("vanilla", {}).get("accuracy", {})
            groups.append(
                {
                    "caption_style": style,
                    "shape": shape,
                    "dataset": {"train_counts": summary["train_counts"], "reference_counts": summary["reference_counts"]},
                    "identities": {
                        n: {"class": classes[n], "n_train": summary["train_counts"][n]}
                        for n in sorted(classes, key=lambda n: (-summary["train_counts"][n], n))
                    },
                    "example_caption": next(
                        r["text"] for r in metadata
                        if r["split"] == "train" and summary["train_counts"][r["identity"]] <= MINORITY_IMAGES
                    ),
                    "methods": list(methods),
                    "flags": {m: flags[m] for m in methods},
                    "per_seed": per_seed,
                    "per_identity_accuracy": {
                        str(s): {m: results[f"seed{s}/{m}"]["report"]["models"][m]["accuracy_per_identity"] for m in methods}
                        for s in seeds
                    },
                    "summary": summary_by_method,
                    "regime": regime_check(
                        (vanilla.get("many") or {}).get("mean"), (vanilla.get("few") or {}).get("mean")
                    ),
                    "run_wall_time_s": {str(s): {m: results[f"seed{s}/{m}"]["wall_time_s"] for m in methods} for s in seeds},
                    "diagnostics": {str(s): {m: results[f"seed{s}/{m}"]["diagnostics"] for m in methods} for s in seeds},
                    "_first_report": results[f"seed{seeds[0]}/{methods[0]}"]["report"],
                }
            )  # fmt: skip
    return groups


# ----------------------------------------------------------------------------------------------------------------
# v3, --part per-image: the paper's caption regime on a base whose text encoder was trained
# ----------------------------------------------------------------------------------------------------------------


def run_per_image(
    work_dir: Path, size: StudySize, shapes: Sequence[str], seeds: Sequence[int], jobs: int, threads: int
) -> tuple[dict[str, Any], Prepared]:
    """Per-image (`attr`) captions, name-only evaluation prompt, on `base-model-te`: the same pretraining data and
    steps as v2's base, but the text encoder learned beside the UNet on both caption styles of the base digits,
    as SD's CLIP arrives trained. Its own pilot (guidance, budget; validation side, `attr` captions) decides the
    budget; then every method of `size.per_image_methods` for every seed, with the mechanism diagnostics.
    Returns the part's results and its `Prepared` (for the figures)."""
    prepared = prepare(work_dir, size, train_text_encoder=True)
    root = work_dir / "per-image"
    dataset = work_dir / "data" / f"validation-{size.pilot_shape}"
    build_shape(dataset, prepared.class_dirs["validation"], size.pilot_shape, "attr", seed=1)
    check_clash(dataset, prepared)
    pilot = pilot_budget(prepared, root, dataset, "attr", size, jobs, threads)
    pilot["wall_time_s"] = {key: r["wall_time_s"] for key, r in pilot.pop("results").items()}
    groups = run_groups(
        prepared, work_dir, size, pilot, shapes, seeds, jobs, threads,
        methods_by_style={"attr": size.per_image_methods}, root=root, flags=dict(FIXED_METHODS),
    )  # fmt: skip
    return {"pilot": pilot, "base_model": prepared.base_summary, "groups": groups}, prepared


def format_per_image(results: dict[str, Any]) -> str:
    """per_image.md: the base, the pilot with its regime check on the validation side, then each group's regime
    check, table and diagnostics."""
    pilot, base = results["pilot"], results["base_model"]
    lines = [
        "# PoGDiff evidence study v3: per-image captions on a base with a trained text encoder",
        "",
        f"Command: `{results['command']}`. Size `{results['size']}`, seeds {results['seeds']}, on "
        f"{results['machine']}. {cost_sentence(results['cost'])}",
        "",
        f"Base model `base-model-te`: v2's pretraining (digits {list(BASE_CLASSES)}, each image with its `attr` and "
        f"its name-only caption, {base['unet']['steps']} UNet steps) with the text encoder "
        f"{base['unet']['text_encoder']} (UNet loss {base['unet']['loss_first_20']:.3f} -> "
        f"{base['unet']['loss_last_20']:.3f}). Fine-tuning keeps it frozen. Captions: one per image, "
        f'describing it (`attr`); evaluation prompt "{EVAL_PROMPT}".',
        "",
        "## Pilot (validation side only, `attr` captions, vanilla, seed 0)",
        "",
        "Guidance on the base's own classes: "
        + ", ".join(
            f"{r['guidance_scale']:g}: {r['accuracy']:.2f}" for r in pilot["guidance_on_base_classes"]
        )
        + f" -> {pilot['guidance_scale']:g}.",
        "",
        "| lr | steps | vanilla majority acc. | vanilla few-shot acc. | in the regime |",
        "|---|---|---|---|---|",
    ]
    for row in pilot["budgets"]:
        lines.append(
            f"| {row['learning_rate']:g} | {row['steps']} | {row['accuracy']['many']:.2f} | "
            f"{row['accuracy']['few']:.2f} | {'yes' if row['regime']['informative'] else 'no'} |"
        )
    budget = pilot["budget"]
    lines += [
        "",
        f"Chosen: lr {budget['learning_rate']:g} x {budget['steps']} steps (regime reached on validation: "
        f"{'yes' if pilot['regime_reached'] else 'NO'}).",
    ]
    lines += group_sections(results["groups"], METHOD_LABELS)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# v3, --part tradeoff: what balancing costs the majority, along the dials users tune
# ----------------------------------------------------------------------------------------------------------------

# The target, fixed before any run: few-shot within 0.1 of the majority, at a majority cost (vanilla's majority
# accuracy at the same budget minus the setting's) of at most 0.05.
TARGET_FEW_GAP, TARGET_MAJORITY_COST = 0.1, 0.05


@dataclass(frozen=True)
class Setting:
    """One point of the trade-off map: vanilla's objective with one way of drawing images, at one budget."""

    key: str  # folder-safe name, e.g. "power0.25-x2"
    dial: str  # what a user sets, e.g. "--sampling_power 0.25"
    flags: tuple[str, ...]
    factor: int  # multiple of the pilot's step budget


def tradeoff_settings(size: StudySize) -> list[Setting]:
    """Every (dial, budget) of the map, vanilla's uniform draw (power 1) first at each budget."""
    settings = []
    for factor in size.tradeoff_budget_factors:
        for power in size.tradeoff_powers:
            if power == 1.0:
                settings.append(Setting(f"uniform-x{factor}", "vanilla (uniform draw)", (), factor))
            else:
                flags = ("--sampling_power", f"{power:g}")
                settings.append(Setting(f"power{power:g}-x{factor}", " ".join(flags), flags, factor))
        for w_max in size.tradeoff_density_w_max:
            flags = ("--sampling", "density", "--density_w_max", f"{w_max:g}")
            settings.append(Setting(f"density-w{w_max:g}-x{factor}", " ".join(flags), flags, factor))
    return settings


def tradeoff_rows(
    accuracy: dict[str, dict[str, float | None]], settings: Sequence[Setting]
) -> list[dict[str, Any]]:
    """Per setting: its majority / few-shot accuracy, the majority cost against vanilla at the same budget, the
    gap (majority - few-shot), whether it meets the target, and by how much it misses it (0 when it meets it)."""
    vanilla = {s.factor: accuracy[s.key]["many"] for s in settings if not s.flags}
    rows = []
    for setting in settings:
        many, few = accuracy[setting.key]["many"], accuracy[setting.key]["few"]
        if many is None or few is None or vanilla.get(setting.factor) is None:
            rows.append({**asdict(setting), "many": many, "few": few, "cost": None, "gap": None,
                         "meets": False, "shortfall": None})  # fmt: skip
            continue
        cost, gap = vanilla[setting.factor] - many, many - few
        shortfall = max(0.0, gap - TARGET_FEW_GAP) + max(0.0, cost - TARGET_MAJORITY_COST)
        rows.append(
            {**asdict(setting), "many": many, "few": few, "cost": cost, "gap": gap,
             "meets": shortfall <= 1e-9, "shortfall": shortfall}
        )  # fmt: skip
    return rows


def choose_setting(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The rule, fixed in advance: among the settings that meet the target, the best few-shot accuracy (ties: the
    smaller budget, then the better majority); if none does, the smallest shortfall (ties: the better few-shot)."""
    scored = [r for r in rows if r["shortfall"] is not None]
    meeting = [r for r in scored if r["meets"]]
    if meeting:
        return max(meeting, key=lambda r: (r["few"], -r["factor"], r["many"]))
    return min(scored, key=lambda r: (r["shortfall"], -r["few"]))


def plot_front(
    rows: Sequence[dict[str, Any]], summary: dict[str, Any], chosen: str, title: str, path: Path
) -> None:
    """tradeoff_front.png: few-shot vs majority accuracy, one point per setting (mean, error bars: std over seeds),
    colour by dial, marker by budget, the target's bounds drawn, the validation-side choice starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 6.2))
    dials = list(dict.fromkeys(r["dial"] for r in rows))
    colours = {d: plt.get_cmap("tab10")(i) for i, d in enumerate(dials)}
    markers = {f: m for f, m in zip(sorted({r["factor"] for r in rows}), "osD^")}
    for row in rows:
        acc = summary[row["key"]]["accuracy"]
        x, y = acc["many"], acc["few"]
        if x["mean"] is None or y["mean"] is None:
            continue
        ax.errorbar(
            x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt=markers[row["factor"]], capsize=3,
            markersize=8, color=colours[row["dial"]], label=f"{row['dial']}, x{row['factor']} steps",
        )  # fmt: skip
        if row["key"] == chosen:
            ax.plot(x["mean"], y["mean"], marker="*", markersize=22, color="gold", markeredgecolor="black",
                    zorder=5, linestyle="none", label="chosen on the validation side")  # fmt: skip
    for row in rows:
        if not row["flags"]:
            ax.axvline(row["many"] - TARGET_MAJORITY_COST, color=colours[row["dial"]], linewidth=0.8,
                       linestyle="--" if row["factor"] == 1 else ":")  # fmt: skip
    grid = np.linspace(0, 1, 2)
    ax.plot(grid, grid - TARGET_FEW_GAP, color="grey", linewidth=0.8, linestyle="-.")
    save_accuracy_figure(
        fig,
        ax,
        f"{title}\ntarget: right of vanilla's majority - {TARGET_MAJORITY_COST} (vertical lines: dashed x1, dotted "
        f"x2 budget) and above few = many - {TARGET_FEW_GAP} (dash-dot)",
        fontsize=8,
        path=path,
    )


def run_tradeoff(
    work_dir: Path, output_dir: Path, size: StudySize, shapes: Sequence[str], seeds: Sequence[int], jobs: int,
    threads: int,
) -> dict[str, Any]:  # fmt: skip
    """The map in the `template` regime (where v2's vanilla passed the regime check), on v2's base and budget:
    every setting once on the validation side (seed 0, its own template-captioned set), where the rule picks
    one; then every setting for every seed on the evaluated set, for the front."""
    prepared = prepare(work_dir, size)
    committed = output_dir / "pilot.json"
    if not (work_dir / "pilot.json").is_file() and committed.is_file():
        cached = json.loads(committed.read_text(encoding="utf-8"))
        if cached.get("search_space") == pilot_search_space(size):
            # v2's pilot, made by this script on the same validation side: reuse its budget and guidance.
            logger.info("Reusing the pilot of %s (same search space)", committed)
            shutil.copyfile(committed, work_dir / "pilot.json")
    pilot = run_pilot(prepared, work_dir, size, jobs, threads)
    budget = Budget(**pilot["budget"])
    settings = tradeoff_settings(size)
    root = work_dir / "tradeoff"

    def runs_for(
        dataset: Path, name: str, run_seeds: Sequence[int]
    ) -> tuple[list[tuple[str, Path, list[str]]], dict[str, int]]:
        """The runs (key, output dir, arguments) of every setting x seed, and each key's seed."""
        runs, seed_of = [], {}
        for seed in run_seeds:
            for setting in settings:
                out = root / "runs" / name / f"seed{seed}" / setting.key
                flags = [*FIXED_METHODS["vanilla"], *setting.flags]
                steps = Budget(budget.learning_rate, budget.steps * setting.factor)
                args = finetune_args(
                    prepared.base, dataset, out, root / "index" / name, flags, seed, steps, size
                )
                runs.append((f"seed{seed}/{setting.key}", out, args))
                seed_of[f"seed{seed}/{setting.key}"] = seed
        return runs, seed_of

    validation = work_dir / "data" / f"validation-{size.pilot_shape}-template"
    build_shape(validation, prepared.class_dirs["validation"], size.pilot_shape, "template", seed=1)
    check_clash(validation, prepared)
    val_runs, val_seeds = runs_for(validation, validation.name, [0])
    val = train_and_evaluate(
        prepared, val_runs, validation, root / "eval" / validation.name, val_seeds, size,
        pilot["guidance_scale"], jobs, threads, "trade-off, validation",
    )  # fmt: skip
    val_acc = {s.key: seed_metrics(val[f"seed0/{s.key}"]["report"], s.key)["accuracy"] for s in settings}
    val_rows = tradeoff_rows(val_acc, settings)
    chosen = choose_setting(val_rows)
    print(
        f"trade-off: chosen on the validation side: {chosen['dial']}, x{chosen['factor']} steps", flush=True
    )

    groups = []
    for shape in shapes:
        name = f"template-{shape}"
        dataset = work_dir / "data" / name
        build_shape(dataset, prepared.class_dirs["model"], shape, "template", seed=0)
        check_clash(dataset, prepared)
        runs, seed_of = runs_for(dataset, name, seeds)
        results = train_and_evaluate(
            prepared, runs, dataset, root / "eval" / name, seed_of,
            size, pilot["guidance_scale"], jobs, threads, f"trade-off, {name}",
        )  # fmt: skip
        per_seed = {
            str(s): {st.key: seed_metrics(results[f"seed{s}/{st.key}"]["report"], st.key) for st in settings}
            for s in seeds
        }
        summary = summarize_group(per_seed)
        means = {k: {g: summary[k]["accuracy"][g]["mean"] for g in ("many", "few")} for k in summary}
        rows = tradeoff_rows(means, settings)
        vanilla = summary[settings[0].key]["accuracy"]
        groups.append(
            {
                "shape": shape,
                "caption_style": "template",
                "per_seed": per_seed,
                "summary": summary,
                "rows": rows,
                "regime": regime_check(vanilla["many"]["mean"], vanilla["few"]["mean"]),
                "chosen_on_validation": next(r for r in rows if r["key"] == chosen["key"]),
                "best_on_evaluated_set": choose_setting(rows),
                "run_wall_time_s": {k: r["wall_time_s"] for k, r in results.items()},
                "run_cpu_time_s": {k: r["cpu_time_s"] for k, r in results.items()},
            }
        )
        plot_front(
            rows, summary, chosen["key"],
            f"Trade-off, shape {shape}, captions `template`: mean ± std over seeds {list(seeds)}",
            output_dir / f"tradeoff_front_{name}.png",
        )  # fmt: skip
    return {
        "pilot": {k: pilot[k] for k in ("budget", "guidance_scale", "regime_reached")},
        "settings": [asdict(s) for s in settings],
        "target": {"few_shot_gap_at_most": TARGET_FEW_GAP, "majority_cost_at_most": TARGET_MAJORITY_COST},
        "validation": {
            "rows": val_rows,
            "chosen": chosen,
            "run_wall_time_s": {k: r["wall_time_s"] for k, r in val.items()},
            "run_cpu_time_s": {k: r["cpu_time_s"] for k, r in val.items()},
        },  # fmt: skip
        "groups": groups,
    }


def format_tradeoff(results: dict[str, Any]) -> str:
    """tradeoff.md: the rule, the validation-side map and choice, then per group the front's table."""
    budget = results["pilot"]["budget"]
    lines = [
        "# PoGDiff evidence study v3: the cost of balancing to the majority",
        "",
        f"Command: `{results['command']}`. Size `{results['size']}`, seeds {results['seeds']}, on "
        f"{results['machine']}. {cost_sentence(results['cost'])}",
        "",
        f"Every setting is vanilla's objective with one way of drawing images, on v2's base, `template` captions, "
        f"lr {budget['learning_rate']:g}, at x1 ({budget['steps']}) or x2 ({2 * budget['steps']}) steps (v2's "
        f"validation-side budget). Target, fixed in advance: few-shot accuracy within {TARGET_FEW_GAP} of the "
        f"majority's, at a majority cost (vanilla's majority accuracy at the same budget minus the setting's) of at "
        f"most {TARGET_MAJORITY_COST}. Rule: among the settings that meet it on the validation side, the best "
        "few-shot accuracy (ties: the smaller budget); if none does, the smallest shortfall "
        "(gap excess + cost excess).",
        "",
        "## Validation side (seed 0, its own identities and pseudonyms)",
        "",
        "| setting | steps | majority acc. | few-shot acc. | majority cost | gap | meets the target |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    for row in results["validation"]["rows"]:
        lines.append(
            f"| {row['dial']} | x{row['factor']} | {num(row['many'])} | {num(row['few'])} | {num(row['cost'])} | "
            f"{num(row['gap'])} | {'yes' if row['meets'] else 'no'} |"
        )
    chosen = results["validation"]["chosen"]
    lines += [
        "",
        f"Chosen: **{chosen['dial']}, x{chosen['factor']} steps** "
        f"({'meets the target' if chosen['meets'] else 'no setting meets the target; smallest shortfall'}).",
    ]
    for group in results["groups"]:
        lines += [
            "",
            f"## Evaluated set: shape {group['shape']}, captions `template`, seeds {results['seeds']}",
            "",
            regime_sentence(group["regime"]).replace("vanilla:", "vanilla x1:"),
            "",
            "| setting | steps | majority acc. | few-shot acc. | all | majority cost | gap | meets the target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in group["rows"]:
            acc = group["summary"][row["key"]]["accuracy"]
            star = " (chosen)" if row["key"] == chosen["key"] else ""
            lines.append(
                f"| {row['dial']}{star} | x{row['factor']} | {format_cell(acc['many'], 2)} | "
                f"{format_cell(acc['few'], 2)} | {format_cell(acc['all'], 2)} | {num(row['cost'])} | "
                f"{num(row['gap'])} | {'yes' if row['meets'] else 'no'} |"
            )
        picked, best = group["chosen_on_validation"], group["best_on_evaluated_set"]
        lines += [
            "",
            f"The validation-side choice ({picked['dial']}, x{picked['factor']}) on the evaluated set: majority "
            f"{num(picked['many'])}, few-shot {num(picked['few'])}, cost {num(picked['cost'])}, gap "
            f"{num(picked['gap'])}: {'meets' if picked['meets'] else 'misses'} the target"
            + ("." if picked["meets"] else f" by {picked['shortfall']:.2f}.")
            + f" Best on the evaluated set by the same rule (for reference, not a choice): {best['dial']}, "
            f"x{best['factor']} ("
            + ("meets the target" if best["meets"] else f"misses by {best['shortfall']:.2f}")
            + ").",
            "",
            f"![front](tradeoff_front_template-{group['shape']}.png)",
            "",
            "Every metric (mean ± std over seeds):",
            "",
            markdown_table(
                group["summary"], {r["key"]: f"{r['dial']}, x{r['factor']}" for r in group["rows"]}
            ),
        ]
    return "\n".join(lines) + "\n"


def cost_sentence(cost: dict[str, Any]) -> str:
    return (
        f"Cost: {cost['fine_tunes']} fine-tunes ({cost['trained_now']} trained by this invocation, the rest reused), "
        f"{cost['fine_tune_cpu_min']:.1f} CPU min and {cost['fine_tune_wall_min']:.1f} wall min of fine-tuning "
        f"summed; this invocation's wall time {cost['invocation_wall_min']:.1f} min."
    )


def part_cost(run_records: Sequence[dict[str, Any]], started: float, before: set[str]) -> dict[str, Any]:
    """The cost of a part: its fine-tunes (from each run's study_run.json), and this invocation's wall time."""
    walls = [r["wall_time_s"] for r in run_records]
    cpus = [r.get("cpu_time_s") for r in run_records]
    return {
        "fine_tunes": len(run_records),
        "trained_now": sum(1 for r in run_records if r["path"] not in before),
        "fine_tune_wall_min": sum(walls) / 60,
        "fine_tune_cpu_min": sum(c for c in cpus if c is not None) / 60,
        "fine_tunes_without_cpu_time": sum(1 for c in cpus if c is None),
        "invocation_wall_min": (time.perf_counter() - started) / 60,
    }


def run_records(root: Path) -> list[dict[str, Any]]:
    """Every finished fine-tune under `root`: its study_run.json plus its path."""
    return [
        {**json.loads(p.read_text(encoding="utf-8")), "path": str(p.parent)}
        for p in sorted(root.rglob("study_run.json"))
    ]


def group_figures(
    groups: Sequence[dict[str, Any]], root: Path, work_dir: Path, seeds: Sequence[int], labels: dict[str, str],
    output_dir: Path, tag: str, base: Path,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Each group's few-shot grid (first seed) and method front, then the psi plot of all groups, as
    output_dir/<figure><tag>_<group>.png; prints each group's regime check. Returns the psi statistics.
    Pops each group's "_first_report"."""
    for group in groups:
        report = group.pop("_first_report")
        name = f"{group['caption_style']}-{group['shape']}"
        plot_few_shot_grid(
            root / "eval" / name / f"seed{seeds[0]}", report, work_dir / "data" / name, group["methods"],
            labels, output_dir / f"grid_few_shot{tag}_{name}.png",
        )  # fmt: skip
        plot_tradeoff(group, labels, output_dir / f"tradeoff{tag}_{name}.png")
        label = f"{tag.strip('_')} {name}".strip()
        print(f"[{label}] " + regime_sentence(group["regime"]), flush=True)
    psi = {
        f"{g['caption_style']}-{g['shape']}": psi_statistics(
            root / "index" / f"{g['caption_style']}-{g['shape']}", base
        )
        for g in groups
    }
    plot_psi(psi, output_dir / f"psi{tag}.png")
    return psi


def psi_summary(psi: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per group: expected and applied psi, mean ± std over the majority's and the minority's samples."""
    return {
        group: {
            kind: {
                label: mean_std([v for s in stats for v, m in zip(s[kind], s["minority"]) if m == minority])
                for label, minority in (("majority", False), ("minority", True))
            }
            for kind in ("expected_psi", "effective_psi")
        }
        for group, stats in psi.items()
        if stats
    }


def regime_sentence(regime: dict[str, Any]) -> str:
    many, few = regime["majority_accuracy"], regime["few_shot_accuracy"]
    numbers = "n/a" if many is None or few is None else f"majority {many:.2f}, few-shot {few:.2f}"
    if regime["informative"]:
        return f"**Regime check: passed** (vanilla: {numbers}; rule: {regime['rule']}): the table can tell methods apart."
    return (
        f"**Regime check: FAILED, uninformative regime** (vanilla: {numbers}; rule: {regime['rule']}). No "
        "conclusion about the methods can be drawn from this table."
    )


def group_sections(groups: Sequence[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """Markdown per caption style x shape: the regime check, the identities, the table, the diagnostics."""
    lines: list[str] = []
    for group in groups:
        ids = ", ".join(
            f"{n} (digit {m['class']}, {m['n_train']} images)" for n, m in group["identities"].items()
        )
        lines += [
            "",
            f"## Shape {group['shape']}, captions `{group['caption_style']}`",
            "",
            regime_sentence(group["regime"]),
            "",
            f'Identities: {ids}. Example caption: "{group["example_caption"]}".',
            "",
            markdown_table({m: group["summary"][m] for m in group["methods"]}, labels),
        ]
        diag = diagnostics_table(group, labels)
        if len(diag.splitlines()) > 2:
            lines += [
                "",
                "Mechanism diagnostics (logged by the trainer, mean over steps and seeds):",
                "",
                diag,
            ]
    return lines


def format_results(results: dict[str, Any]) -> str:
    """results.md: the settings and the pilot, then per caption style x shape the regime check, the table and
    the mechanism's diagnostics."""
    s, pilot = results["settings"], results["pilot"]
    labels = method_labels(pilot)
    runs = [t for g in results["groups"] for per in g["run_wall_time_s"].values() for t in per.values()]
    budget = pilot["budget"]
    lines = [
        "# PoGDiff evidence study v2 (digits, offline)",
        "",
        f"Command: `{results['command']}`. Size `{results['size']}`, seeds {results['seeds']}, on {results['machine']}. "
        f"{len(runs)} fine-tunes in the tables, {sum(runs) / 60:.1f} min of fine-tuning summed; this invocation's "
        f"wall time {results['wall_time_s'] / 60:.1f} min (runs and images found in --work_dir are reused).",
        "",
        f"Base model: tiny SD pretrained on digits {s['base_classes']} ({results['base_model']['unet']['steps']} UNet "
        f"steps). Evaluated identities: digits {s['eval_classes']} under pseudonyms, never seen by the base model. "
        f"Fine-tuning (every method): lr {budget['learning_rate']:g} constant, {budget['steps']} steps, batch "
        f"{s['finetune_batch_size']}, full UNet, `--neighbor_encoder vae`, k = 5; chosen on the validation side "
        f"(below). Generation: {s['images_per_identity']} images per identity, DDIM {s['inference_steps']} steps, "
        f'guidance {pilot["guidance_scale"]:g}, prompt "{EVAL_PROMPT}". Judge: {results["judge"]["model"]}, held-out '
        f"accuracy {results['judge']['heldout_accuracy']:.3f} on {results['judge']['n_heldout']} real images. "
        "Accuracy = share of generated images the judge assigns to the prompted digit; DINO / gRecall / FID in the "
        "judge's hidden layer. Cells: mean ± std over seeds; Many = the 30-image identities, Few = the 2-image ones.",
        "",
        "## Pilot (validation side only)",
        "",
        "| lr | steps | vanilla majority acc. | vanilla few-shot acc. | in the regime |",
        "|---|---|---|---|---|",
    ]
    for row in pilot["budgets"]:
        lines.append(
            f"| {row['learning_rate']:g} | {row['steps']} | {row['accuracy']['many']:.2f} | {row['accuracy']['few']:.2f} "
            f"| {'yes' if row['regime']['informative'] else 'no'} |"
        )
    lines += [
        "",
        "| PoGDiff a2 | a3 | few-shot acc. | majority acc. | consistency share | same-identity neighbours |",
        "|---|---|---|---|---|---|",
    ]
    for row in pilot["psi_grid"]:
        share, same = row["consistency_share_mean"], row["neighbor_same_identity_mean"]
        lines.append(
            f"| {row['a2']:g} | {row['a3']:g} | {row['accuracy']['few']:.2f} | {row['accuracy']['many']:.2f} | "
            f"{'n/a' if share is None else f'{share:.1%}'} | {'n/a' if same is None else f'{same:.0%}'} |"
        )
    lines += ["", "| vanilla sampling | few-shot acc. | majority acc. |", "|---|---|---|"]
    lines += [
        f"| {r['sampling']} | {r['accuracy']['few']:.2f} | {r['accuracy']['many']:.2f} |"
        for r in pilot["samplings"]
    ]
    lines += [
        "",
        f"Chosen: lr {budget['learning_rate']:g} x {budget['steps']} steps (regime reached on validation: "
        f"{'yes' if pilot['regime_reached'] else 'NO'}), a2 = {pilot['psi_choice']['a2']:g}, a3 = "
        f"{pilot['psi_choice']['a3']:g}, sampling `{pilot['sampling_choice']['sampling']}`, guidance "
        f"{pilot['guidance_scale']:g}. Rule: {pilot['rule']}.",
    ]
    lines += group_sections(results["groups"], labels)
    return "\n".join(lines) + "\n"


PARTS = ("methods", "per-image", "tradeoff")


def invocation(args: argparse.Namespace, argv: Sequence[str] | None, seeds: Sequence[int]) -> dict[str, Any]:
    """The command, size, seeds and machine of this invocation, for a results file."""
    return {
        "command": "python examples/study/run_study.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "size": args.size,
        "seeds": list(seeds),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), {args.jobs} job(s) x {args.threads} torch "
        "thread(s), no GPU",
    }


def run_v3_part(
    args: argparse.Namespace, argv: Sequence[str] | None, size: StudySize, seeds: Sequence[int],
    shapes: Sequence[str], work_dir: Path, output_dir: Path, started: float,
) -> dict[str, Any]:  # fmt: skip
    """`--part per-image` or `--part tradeoff`: runs it, writes <part>.json / .md and its figures."""
    root = work_dir / ("per-image" if args.part == "per-image" else "tradeoff")
    before = {r["path"] for r in run_records(root)}
    if args.part == "per-image":
        results, prepared = run_per_image(work_dir, size, shapes, seeds, args.jobs, args.threads)
        psi = group_figures(
            results["groups"], root, work_dir, seeds, METHOD_LABELS, output_dir, "_per-image", prepared.base
        )
        results["psi"] = psi_summary(psi)
    else:
        results = run_tradeoff(work_dir, output_dir, size, shapes, seeds, args.jobs, args.threads)
    results = {
        **invocation(args, argv, seeds),
        "part": args.part,
        **results,
        "cost": part_cost(run_records(root), started, before),
    }
    stem = "per_image" if args.part == "per-image" else "tradeoff"
    (output_dir / f"{stem}.json").write_text(
        json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8"
    )
    markdown = format_per_image(results) if args.part == "per-image" else format_tradeoff(results)
    (output_dir / f"{stem}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="examples/study/results", help="results.md/json and figures")
    parser.add_argument(
        "--work_dir", default=None, help="models, data, images (default outputs/study-<size>)"
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the size's seeds")
    parser.add_argument(
        "--shapes", nargs="+", choices=sorted(SHAPES), default=None, help="default: the size's"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="fine-tunes / evaluations side by side, each in its own process"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per job. 1 by default: the tiny model gains nothing from more, and on a shared 2-core "
        "machine 2 threads made a step up to 9x slower (each op waits for its preempted second thread)",
    )
    parser.add_argument(
        "--pilot", action="store_true", help="only run the pilot (validation side), then stop"
    )
    parser.add_argument(
        "--part",
        choices=PARTS,
        default="methods",
        help="methods: v2, every method in both caption regimes (results.md); per-image: v3, per-image captions "
        "on a base whose text encoder was trained (per_image.md); tradeoff: v3, the sampling dials x budget "
        "front (tradeoff.md)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1.")
    if args.work_dir is None:
        args.work_dir = str(REPO_ROOT / "outputs" / f"study-{args.size}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    seeds = tuple(args.seeds) if args.seeds else size.seeds
    shapes = tuple(args.shapes) if args.shapes else size.shapes
    work_dir, output_dir = Path(args.work_dir), Path(args.output_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.part != "methods":
        return run_v3_part(args, argv, size, seeds, shapes, work_dir, output_dir, started)
    prepared = prepare(work_dir, size)
    pilot = run_pilot(prepared, work_dir, size, args.jobs, args.threads)
    (output_dir / "pilot.json").write_text(json.dumps(pilot, indent=1), encoding="utf-8")
    if args.pilot:
        return pilot

    groups = run_groups(prepared, work_dir, size, pilot, shapes, seeds, args.jobs, args.threads)
    psi = group_figures(
        groups, work_dir, work_dir, seeds, method_labels(pilot), output_dir, "", prepared.base
    )

    results = {
        **invocation(args, argv, seeds),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "settings": {
            **asdict(size),
            "seeds": list(seeds),
            "shapes": list(shapes),
            "base_classes": list(BASE_CLASSES),
            "eval_classes": list(EVAL_CLASSES),
            "caption_thresholds": prepared.thresholds,
            "eval_prompt": EVAL_PROMPT,
            "neighbor_encoder": "vae",
        },
        "pilot": pilot,
        "base_model": prepared.base_summary,
        "judge": prepared.judge_report,
        "groups": groups,
        "psi": psi_summary(psi),
    }
    (output_dir / "results.json").write_text(
        json.dumps(results, indent=1, ensure_ascii=False), encoding="utf-8"
    )
    markdown = format_results(results)
    (output_dir / "results.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return results


if __name__ == "__main__":
    main()
