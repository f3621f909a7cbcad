"""Image-text data for PoGDiff at training time: loading, validation and the image transform.

Loading follows diffusers' `train_text_to_image.py`: a Hub dataset name (or local dataset folder) goes
through `datasets.load_dataset(name, config)`, a plain folder through the `imagefolder` builder, and the
columns default to `image` / `text` (else the first and second column). On top of that, PoGDiff needs an
identity per row (`identity` column, else the caption itself) and at least two images per identity.

A folder may instead be kohya-style (`caption_extension`): captions in `.txt` files beside the images,
identities from sub-folder names, `N_name` sub-folders repeating their images N times (`num_repeats`).
Folders written by the long-tail builder (`pogdiff/longtail.py`, also run as `python -m pogdiff.data build`)
carry a `split` column; loading keeps the rows of one split.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError, report_user_errors
from .families import add_time_ids
from .identities import identity_counts
from .seeds import derive_seed

if TYPE_CHECKING:  # `datasets` is imported where used: the transforms alone should not pay for it
    import datasets

logger = logging.getLogger(__name__)

SPLIT_COLUMN = "split"
TRAIN_SPLIT = "train"
REFERENCE_SPLIT = "reference"
INTERPOLATION_MODES: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# The metadata files imagefolder reads; a kohya-style folder with one of them is ambiguous.
METADATA_FILE_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# kohya's sub-folder convention `<repeats>_<name>`, e.g. `10_alice`: alice's images count 10 times per epoch.
KOHYA_FOLDER_PATTERN = re.compile(r"(?P<repeats>\d+)_(?P<name>.+)")
REPEATS_COLUMN = "num_repeats"


# ----------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------


def check_metadata_files(folder: str | os.PathLike) -> None:
    """Every `metadata.jsonl` under `folder` is UTF-8 text of one JSON object per line; else a ValueError that
    names the file and the line (imagefolder would fail deep inside datasets with neither)."""
    for root, _, names in os.walk(folder):
        present = [name for name in METADATA_FILE_NAMES if name in names]
        if len(present) > 1:
            # imagefolder would fail with a traceback that names neither file.
            raise UserError(
                f"{root} holds {' and '.join(present)}: imagefolder reads one metadata file per folder. Keep one."
            )
        for name in names:
            if name != "metadata.jsonl":
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
            if not any(line.strip() for line in lines):
                raise UserError(
                    f"{path} is empty: add one JSON row per image (file_name, text, ...), or remove the file."
                )
            for number, raw in enumerate(lines, start=1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UserError(
                        f"{path} line {number} is not UTF-8 text (byte {raw[err.start : err.start + 1]!r} at column "
                        f"{err.start + 1}); save the file as UTF-8."
                    ) from err
                if text.strip():
                    try:
                        row = json.loads(text)
                    except json.JSONDecodeError as err:
                        raise UserError(f"{path} line {number} is not a JSON object: {err.msg}.") from err
                    if not isinstance(row, dict):
                        raise UserError(
                            f"{path} line {number} is not a JSON object (got {type(row).__name__})."
                        )


def unlisted_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder` (paths relative to it) that no `metadata.jsonl` lists as `file_name`.

    imagefolder reads a folder with metadata files row by row, so it silently leaves such images out. Only
    images at or below a folder holding a metadata.jsonl are considered (the ones it would have covered).
    Call after `check_metadata_files` (every line is then a JSON object).
    """
    listed: set[str] = set()
    covered: list[str] = []
    for root, _, names in os.walk(folder):
        if "metadata.jsonl" not in names:
            continue
        covered.append(os.path.normpath(root))
        with open(os.path.join(root, "metadata.jsonl"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    file_name = json.loads(line).get("file_name")
                    if isinstance(file_name, str):
                        listed.add(os.path.normpath(os.path.join(root, file_name)))
    unlisted = []
    for root, _, names in os.walk(folder):
        norm_root = os.path.normpath(root)
        if not any(norm_root == c or norm_root.startswith(c + os.sep) for c in covered):
            continue
        for name in sorted(names):
            path = os.path.normpath(os.path.join(root, name))
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and path not in listed:
                unlisted.append(os.path.relpath(path, folder))
    return sorted(unlisted)


# ----------------------------------------------------------------------------------------------------------
# kohya-style folders: captions in files beside the images, identities (and repeats) from sub-folder names
# ----------------------------------------------------------------------------------------------------------


def normalize_caption_extension(caption_extension: str) -> str:
    """`caption_extension` with its leading dot: "txt" and ".txt" both give ".txt"."""
    extension = caption_extension.strip()
    extension = extension if extension.startswith(".") else "." + extension
    if extension == "." or "/" in extension or os.sep in extension:
        raise UserError(
            f"--caption_extension {caption_extension!r} is not a file extension; pass one like .txt."
        )
    if extension.lower() in IMAGE_EXTENSIONS:
        raise UserError(
            f"--caption_extension {caption_extension!r} is an image extension; captions are text files (e.g. .txt)."
        )
    return extension


MAX_KOHYA_REPEATS = 2**31 - 1


def parse_kohya_folder(name: str) -> tuple[str, int]:
    """kohya's sub-folder name `<repeats>_<name>` -> (name, repeats); any other name -> (name, 1).

    `10_alice` -> ("alice", 10), `bob` -> ("bob", 1). As in kohya's scripts, a leading integer followed by an
    underscore always counts as repeats.

    Raises:
        UserError: the folder asks for 0 repeats (its images would never be drawn), or more than
            `MAX_KOHYA_REPEATS`.
    """
    match = KOHYA_FOLDER_PATTERN.fullmatch(name)
    if match is None:
        return name, 1
    repeats = int(match["repeats"])
    if repeats < 1:
        raise UserError(
            f"Folder {name!r} asks for {repeats} repeats (kohya's `N_name`), so its images would never be "
            "drawn; rename it with N >= 1, or drop the number to repeat once."
        )
    if repeats > MAX_KOHYA_REPEATS:
        # The repeats column is int64 (and a draw weight): a longer number would fail deep inside datasets.
        raise UserError(
            f"Folder {name!r} asks for {match['repeats']} repeats (kohya's `N_name`), more than "
            f"{MAX_KOHYA_REPEATS}; rename it with a smaller N (repeats are relative draw weights, e.g. 10)."
        )
    return match["name"], repeats


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a kohya-style folder and what its place in the folder says about it."""

    key: str  # path relative to the folder, '/'-separated; rows are ordered by it
    path: str
    caption_path: str
    caption: str  # the caption file's text, whitespace stripped ("" for an empty file)
    folder: str | None  # the first sub-folder's name as written (`10_alice`); None for an image in the root
    identity: str | None  # that name without kohya's repeats prefix (`alice`)
    num_repeats: int  # kohya's N of `N_name`, else 1


def scan_caption_folder(folder: str | os.PathLike, caption_extension: str) -> list[CaptionedImage]:
    """The images under `folder` with their captions from sidecar files, sorted by relative path.

    An image's caption file is its path with the image extension replaced by `caption_extension`
    (`10_alice/1.png` -> `10_alice/1.txt`), read as UTF-8 and stripped; an empty file is an empty caption.
    The first sub-folder names the identity, kohya-style (`parse_kohya_folder`). Files and folders whose name
    starts with a dot are skipped, as are files that are neither images (`IMAGE_EXTENSIONS`) nor captions.

    Raises:
        UserError: `folder` is missing or holds an imagefolder metadata file (ambiguous), an image has no
            caption file, a caption file has no image, two images share one caption file, a caption file is
            not UTF-8, a sub-folder asks for 0 repeats, or there are no images. The message names the file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{os.fspath(folder)!r} is not a directory.")
    extension = normalize_caption_extension(caption_extension)
    images: list[str] = []
    caption_files: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if name in METADATA_FILE_NAMES:
                raise UserError(
                    f"{path} is imagefolder metadata, but --caption_extension {extension} asks for captions in "
                    f"{extension} files beside the images: drop --caption_extension to use {name}, or remove "
                    f"{name} to use the {extension} files."
                )
            key = path.relative_to(root).as_posix()
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(key)
            elif name.endswith(extension):
                caption_files.add(key)

    images.sort()
    caption_of = {key: os.path.splitext(key)[0] + extension for key in images}
    for key in images:
        if caption_of[key] not in caption_files:
            raise UserError(
                f"Image {root / key} has no caption file: expected {root / caption_of[key]} (--caption_extension "
                f"{extension}). Write its caption there (an empty file means an empty caption) or remove the image."
            )
    orphans = sorted(caption_files - set(caption_of.values()))
    if orphans:
        raise UserError(
            f"Caption file {root / orphans[0]} has no image beside it (an image with the same name and one of "
            f"the extensions {', '.join(IMAGE_EXTENSIONS)}); add the image or remove the caption file"
            + (f" ({len(orphans)} such files)." if len(orphans) > 1 else ".")
        )
    shared = Counter(caption_of.values())
    for key in images:
        if shared[caption_of[key]] > 1:
            others = [k for k in images if caption_of[k] == caption_of[key]]
            raise UserError(
                f"Images {', '.join(str(root / k) for k in others)} would all take their caption from "
                f"{root / caption_of[key]}; rename or remove all but one of them."
            )
    if not images:
        raise UserError(
            f"No images found in {os.fspath(folder)!r} or its sub-folders (extensions {', '.join(IMAGE_EXTENSIONS)})."
        )

    result = []
    for key in images:
        caption_path = root / caption_of[key]
        try:
            caption = caption_path.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as err:
            raise UserError(
                f"Caption file {caption_path} is not UTF-8 text (byte {err.object[err.start : err.start + 1]!r} "
                f"at offset {err.start}); save it as UTF-8."
            ) from err
        sub_folder = key.split("/", 1)[0] if "/" in key else None
        identity, repeats = parse_kohya_folder(sub_folder) if sub_folder is not None else (None, 1)
        result.append(
            CaptionedImage(
                key=key,
                path=str(root / key),
                caption_path=str(caption_path),
                caption=caption,
                folder=sub_folder,
                identity=identity,
                num_repeats=repeats,
            )
        )
    return result


def _caption_folder_dataset(folder: str, caption_extension: str) -> datasets.Dataset:
    """A kohya-style folder as a `datasets.Dataset`: image (paths), text, identity, num_repeats columns."""
    import datasets

    items = scan_caption_folder(folder, caption_extension)
    in_root = [item.key for item in items if item.folder is None]
    if in_root and len(in_root) < len(items):
        raise UserError(
            f"Image {Path(folder) / in_root[0]} lies directly in --train_data_dir {folder!r} while other images "
            f"are in sub-folders ({len(in_root)} of {len(items)} images are in the root). With --caption_extension "
            "the sub-folder names are the identities (kohya's `N_name`): move it into a sub-folder named after its "
            "identity, or put every image in the root to use the captions as identities."
        )
    columns: dict[str, list] = {
        "image": [item.path for item in items],
        "text": [item.caption for item in items],
    }
    features = {"image": datasets.Image(), "text": datasets.Value("string")}
    if not in_root:
        columns["identity"] = [item.identity for item in items]
        features["identity"] = datasets.Value("string")
    columns[REPEATS_COLUMN] = [item.num_repeats for item in items]
    features[REPEATS_COLUMN] = datasets.Value("int64")

    # `from_dict`'s own `_fingerprint` (datasets' caching) hashes the table (paths and captions), not the image
    # files; the files' sizes and modification times go into the info it also hashes, so a rewritten image
    # changes it as it does for imagefolder. The run's identity is `dataset_fingerprint`, by content.
    stats = hashlib.sha256()
    for item in items:
        for path in (item.path, item.caption_path):
            stat = os.stat(path)
            stats.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    extension = normalize_caption_extension(caption_extension)
    info = datasets.DatasetInfo(
        description=f"kohya-style folder {os.path.abspath(folder)}, captions {extension}, files {stats.hexdigest()}",
        features=datasets.Features(features),
    )
    return datasets.Dataset.from_dict(columns, features=info.features, info=info, split=datasets.Split.TRAIN)


def sidecar_caption_extension(folder: str | os.PathLike) -> str | None:
    """The extension of caption files beside the images of a folder without imagefolder metadata (kohya-style),
    e.g. ".txt"; None when the folder has a metadata file or no image has a text file of the same name beside it."""
    stems: dict[str, set[str]] = {}
    for root, dirnames, names in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in names:
            if name in METADATA_FILE_NAMES:
                return None
            stem, extension = os.path.splitext(os.path.join(root, name))
            stems.setdefault(stem, set()).add(extension.lower())
    for extensions in stems.values():
        if extensions & set(IMAGE_EXTENSIONS):
            for candidate in (".txt", ".caption"):
                if candidate in extensions:
                    return candidate
    return None


def load_image_text_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    split: str = TRAIN_SPLIT,
    caption_extension: str | None = None,
) -> datasets.Dataset:
    """Load an image-text dataset the way diffusers' `train_text_to_image.py` does and return one split.

    Exactly one of `dataset_name` (a Hub id or a local dataset folder) and `train_data_dir` (a folder read
    by the `imagefolder` builder, usually with a `metadata.jsonl`) must be given. The `train` split of the
    result is returned. If its rows carry a `split` column (as the long-tail builder writes), only the rows
    whose `split` equals `split` are kept; otherwise a `split` other than "train" selects that split of the
    dataset itself.

    With `caption_extension` (e.g. ".txt" or "txt"), `train_data_dir` is read kohya-style instead
    (`scan_caption_folder`): each image's caption is the file beside it with that extension, and the rows,
    sorted by relative path, have the columns `image` (file paths, decoded on access), `text`, `identity`
    and `num_repeats`. The identity is the first sub-folder's name; kohya's `N_name` sub-folders give
    identity `name` and `num_repeats` N (else 1), for `--sampling_weight_column num_repeats`. If every
    image lies directly in the folder there is no `identity` column (the caption is then the identity);
    images both in the folder itself and in sub-folders are an error.

    Raises:
        UserError: neither or both sources given, a missing folder, no images, no rows for `split`, and for a
            kohya-style folder the errors of `scan_caption_folder`.
    """
    import datasets
    import pyarrow
    from datasets.data_files import EmptyDatasetError

    if (dataset_name is None) == (train_data_dir is None):
        raise UserError(
            "Give exactly one data source: --dataset_name (a Hub dataset or a local dataset folder) or "
            "--train_data_dir (a folder of images with a metadata.jsonl, read by the imagefolder builder); "
            f"got dataset_name={dataset_name!r} and train_data_dir={train_data_dir!r}."
        )
    source = dataset_name if dataset_name is not None else train_data_dir
    if caption_extension is not None and dataset_name is not None:
        raise UserError(
            f"--caption_extension {caption_extension!r} reads caption files beside the images of a folder; pass "
            "the folder as --train_data_dir, or drop --caption_extension to load --dataset_name."
        )
    try:
        if dataset_name is not None:
            dataset_dict = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        elif not os.path.isdir(train_data_dir):
            raise UserError(f"--train_data_dir {train_data_dir!r} is not a directory.")
        elif caption_extension is not None:
            dataset_dict = {TRAIN_SPLIT: _caption_folder_dataset(train_data_dir, caption_extension)}
        else:
            # imagefolder fails with an IndexError deep inside datasets when a metadata file has no image
            # beside it; say what is wrong instead.
            if not any(
                os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
                for _, _, names in os.walk(train_data_dir)
                for name in names
            ):
                raise EmptyDatasetError(train_data_dir)
            check_metadata_files(train_data_dir)
            # imagefolder would read a kohya folder as images with a `label` column and no captions, and the
            # error would come later as a missing 'text' column; name the flag that reads it instead.
            sidecar = sidecar_caption_extension(train_data_dir)
            if sidecar is not None:
                raise UserError(
                    f"{train_data_dir!r} is a kohya-style folder (captions in {sidecar} files beside the images, no "
                    f"metadata.jsonl): pass --caption_extension {sidecar} to read its captions and identities."
                )
            dataset_dict = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
            # imagefolder drops an image that metadata.jsonl does not list without a word: say so, once.
            unlisted = unlisted_images(train_data_dir)
            if unlisted:
                shown = ", ".join(unlisted[:5]) + (", ..." if len(unlisted) > 5 else "")
                logger.warning(
                    "%d image(s) in %s are not listed in its metadata.jsonl and are not trained on (%s). Add a "
                    "row for each, or move them out of the folder.",
                    len(unlisted),
                    train_data_dir,
                    shown,
                )
    except EmptyDatasetError as err:
        raise UserError(
            f"No images found in {source!r}: the folder holds no image or metadata files. Point the flag "
            "at the folder that contains the images and metadata.jsonl."
        ) from err
    except pyarrow.ArrowInvalid as err:
        # A metadata column whose values are of several types (a caption that is a number, a list in some
        # rows): pyarrow refuses the file deep inside `datasets`.
        raise UserError(
            f"The metadata of {source!r} cannot be read as a table: {str(err).splitlines()[0]}. Give each column "
            'one type in every row (quote numbers that are captions: "text": "123").'
        ) from err

    if TRAIN_SPLIT not in dataset_dict:
        raise UserError(
            f"Dataset {source!r} has no 'train' split; it has {sorted(dataset_dict)}. Rename the split or "
            "save the data you want to train on as 'train'."
        )
    dataset = dataset_dict[TRAIN_SPLIT]
    if len(dataset) == 0:
        raise UserError(f"No images found in {source!r}: its 'train' split is empty.")

    if SPLIT_COLUMN in dataset.column_names:
        values = [str(v) for v in dataset.with_format(None)[SPLIT_COLUMN][:]]
        keep = [i for i, value in enumerate(values) if value == split]
        if not keep:
            raise UserError(
                f"No rows of {source!r} have {SPLIT_COLUMN} == {split!r}; the {SPLIT_COLUMN!r} column holds "
                f"{sorted(set(values))}."
            )
        logger.info(
            "Kept %d of %d rows of %s with %s == %r.", len(keep), len(values), source, SPLIT_COLUMN, split
        )
        return dataset.select(keep)
    if split == TRAIN_SPLIT:
        return dataset
    if split in dataset_dict:
        return dataset_dict[split]
    raise UserError(
        f"Dataset {source!r} has no {SPLIT_COLUMN!r} column and no {split!r} split (splits: "
        f"{sorted(dataset_dict)}). Build it with `python -m pogdiff.data build` to get a reference split."
    )


def _missing_column_error(flag: str, name: str, column_names: list[str]) -> UserError:
    return UserError(
        f"{flag} value {name!r} is not a column of the dataset; its columns are {list(column_names)}. "
        f"Pass one of them with {flag}."
    )


def resolve_columns(
    column_names: list[str],
    image_column: str | None,
    caption_column: str | None,
    identity_column: str | None = "identity",
) -> tuple[str, str, str | None]:
    """Pick the image, caption and identity columns, with diffusers' defaults.

    A `None` image (caption) column means "image" ("text") when present, else the first (next other)
    column, as `imagefolder` + `metadata.jsonl` and diffusers' script expect. A missing identity column
    gives `None` (the caption is then the identity), unless a non-default name was asked for explicitly.

    Raises:
        ValueError: a named or needed column is missing; the message names the flag and the columns.
    """
    columns = list(column_names)
    if image_column is None:
        if not columns:
            raise UserError("The dataset has no columns; --image_column and --caption_column need some.")
        image_column = "image" if "image" in columns else columns[0]
    elif image_column not in columns:
        raise _missing_column_error("--image_column", image_column, columns)

    if caption_column is None:
        others = [c for c in columns if c != image_column]
        if not others:
            raise UserError(
                f"The dataset has no caption column besides the image column {image_column!r}; its columns "
                f"are {columns}. Add captions (a 'text' field in metadata.jsonl) or pass --caption_column."
            )
        caption_column = "text" if "text" in others else others[0]
    elif caption_column not in columns:
        raise _missing_column_error("--caption_column", caption_column, columns)
    if caption_column == image_column:
        raise UserError(f"--image_column and --caption_column are both {image_column!r}; they must differ.")

    if identity_column is not None and identity_column not in columns:
        if identity_column != "identity":
            raise _missing_column_error("--identity_column", identity_column, columns)
        identity_column = None
    return image_column, caption_column, identity_column


def identity_labels(dataset: datasets.Dataset, identity_column: str | None, caption_column: str) -> list[str]:
    """Per-row identity as strings: the identity column, or the caption when `identity_column` is None.

    Reads that one column only (no image decoding). A `ClassLabel` column yields its label names.
    """
    import datasets

    column = caption_column if identity_column is None else identity_column
    plain = dataset.with_format(None)  # a custom transform would otherwise decode every column
    values = plain[column][:]
    feature = plain.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return [feature.int2str(int(v)) for v in values]
    missing = [i for i, v in enumerate(values) if v is None]
    if missing:
        # str(None) would make "None" one more identity, pooling every unlabelled image into it.
        raise UserError(
            f"Row {missing[0]} of the training set has no identity: its {column!r} value is missing or null "
            f"({len(missing)} of {len(values)} rows are). Fill in every row's {column!r}, or drop the column to "
            "use each caption as its identity."
        )
    return [str(v) for v in values]


def check_identities(labels: list[str]) -> dict[str, int]:
    """Count images per identity and warn about identities with a single image.

    PoGDiff borrows strength from a neighbouring image of the same identity (paper App. "Limitations":
    at least 2 per minority class), so an identity with one image gets no same-identity neighbour.
    """
    counts = identity_counts(labels)
    singles = [name for name, n in counts.items() if n == 1]
    if singles:
        shown = ", ".join(repr(s) for s in singles[:20])
        more = f" and {len(singles) - 20} more" if len(singles) > 20 else ""
        warnings.warn(
            f"PoGDiff needs >= 2 images per identity to find a same-identity neighbour; {len(singles)} "
            f"identities have exactly one: {shown}{more}. Add images or drop them.",
            stacklevel=2,
        )
    return counts


# Background that transparent pixels are composited over (what an image viewer shows for them on a white page).
ALPHA_BACKGROUND = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB with its intensities scaled, not clipped, and transparency composited over white.

    PIL's `convert("RGB")` clips wide integer and float modes to 0-255, which turns a 16-bit photo almost
    entirely white, and it drops alpha, which shows whatever colour hides under transparent pixels (often
    black). Here:
    - `I;16*` (16-bit): value * 255 / 65535;
    - `I` (32-bit int, how PIL may open 16-bit PNGs): as 8-bit if every value is in 0-255, as 16-bit if in
      0-65535, else min-max scaled;
    - `F` (float): * 255 if every value is in [0, 1], else min-max scaled;
    - alpha (`RGBA`, `LA`, `PA`, `P` with a transparency entry): composited over `ALPHA_BACKGROUND`;
    - every other mode (`L`, `1`, `P`, `CMYK`, `YCbCr`, ...): PIL's own conversion, which is exact for them.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode == "F" and not np.isfinite(values).all():
            # NaN would pass min/max scaling as NaN and come out black (inf would wash out every other pixel).
            bad = int((~np.isfinite(values)).sum())
            raise ValueError(f"{bad} of {values.size} pixels of this float image are NaN or infinite")
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if mode.startswith("I;16"):
            scale, offset = 255.0 / 65535.0, 0.0
        elif mode == "I" and lo >= 0 and hi <= 255:
            scale, offset = 1.0, 0.0
        elif mode == "I" and lo >= 0 and hi <= 65535:
            scale, offset = 255.0 / 65535.0, 0.0
        elif mode == "F" and lo >= 0 and hi <= 1:
            scale, offset = 255.0, 0.0
        else:
            scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo
        grey = np.clip(np.round((values - offset) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def empty_caption_rows(captions: Sequence[Any]) -> list[int]:
    """Rows whose caption is empty or only whitespace (for a row with several captions: any of them).

    Such a row trains the unconditional prediction, as a dropped caption does, which the data rarely means.
    """
    rows = []
    for i, caption in enumerate(captions):
        texts = list(caption) if isinstance(caption, (list, tuple, np.ndarray)) else [caption]
        if any(isinstance(t, str) and not t.strip() for t in texts):
            rows.append(i)
    return rows


def load_rgb(image: Any, path_hint: str | None = None) -> Image.Image:
    """Return `image` as a decoded RGB PIL image.

    Accepts what a `datasets` image column hands over: a PIL image, a dict with "path" and/or "bytes"
    (an undecoded column, `dataset.cast_column(col, datasets.Image(decode=False))`), or a file path.
    Paths and bytes are EXIF-transposed like `datasets` does. To get the failing file's path in errors
    from a dataset, read the column undecoded: a decoded column fails inside `datasets` before this runs.
    `path_hint` (e.g. "row 12 of the training set") is added to the error message.

    Raises:
        ValueError: the image cannot be decoded; the message names the path and/or `path_hint`.
    """
    path = None
    try:
        if isinstance(image, Image.Image):
            path = getattr(image, "filename", None) or None
            image.load()
            decoded = image
        else:
            if isinstance(image, dict):
                path = image.get("path")
                data = image.get("bytes")
                source = io.BytesIO(data) if data is not None else image.get("path")
            elif isinstance(image, (str, os.PathLike)):
                path = os.fspath(image)
                source = path
            else:
                raise TypeError(f"unsupported image value of type {type(image).__name__}")
            if source is None:
                raise UserError("the image value has neither 'path' nor 'bytes'")
            with Image.open(source) as opened:
                opened.load()
                decoded = ImageOps.exif_transpose(opened)
        return to_rgb(decoded)
    # DecompressionBombError (an image over PIL's pixel limit, e.g. 20000x20000) is none of the others.
    except (
        OSError,
        UnidentifiedImageError,
        ValueError,
        TypeError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as err:
        where = (
            " ".join(x for x in (path, f"({path_hint})" if path_hint else None) if x) or "<in-memory image>"
        )
        raise UserError(f"Cannot decode image {where}: {err}. Remove or replace this file.") from err


def row_image_loader(
    dataset, image_column: str, where: str = "the training set"
) -> Callable[[int], Image.Image]:
    """A function i -> row i's image as RGB (`load_rgb`), reading the dataset's image column undecoded.

    `datasets` decodes an `Image` column itself and fails without naming the file; undecoded, each value
    keeps its path, so an unreadable image is reported by path and by "row i of `where`". Only the image
    column is read; a format or transform set on `dataset` is ignored.
    """
    import datasets

    rows = dataset.with_format(None).select_columns([image_column])
    if isinstance(rows.features[image_column], datasets.Image):
        rows = rows.cast_column(image_column, datasets.Image(decode=False))

    def load(i: int) -> Image.Image:
        return load_rgb(rows[int(i)][image_column], path_hint=f"row {i} of {where}")

    return load


def preprocess_image(
    image: Image.Image,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """diffusers' train_text_to_image transform without torchvision: (3, resolution, resolution) in [-1, 1].

    `preprocess_image_and_crop` also says where the crop was taken (what SDXL's micro-conditioning needs).
    """
    return preprocess_image_and_crop(image, resolution, center_crop, random_flip, generator, interpolation)[0]


def preprocess_image_and_crop(
    image: Image.Image,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
    interpolation: str = "bilinear",
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """`preprocess_image`'s pixels with the image's original (height, width) and the crop's (top, left).

    Same steps and arithmetic as `Resize(resolution, interpolation)`, `CenterCrop` or `RandomCrop`,
    optional `RandomHorizontalFlip(0.5)`, `ToTensor()`, `Normalize([0.5], [0.5])` on a PIL image.
    `interpolation` is one of `INTERPOLATION_MODES` (diffusers' `--image_interpolation_mode`; torchvision
    hands these to PIL's resize, as we do). Random draws (crop offset: row then column; then the flip)
    come only from `generator`, so the caller decides how per-sample randomness is seeded (e.g.
    reproducible across resume).

    Raises:
        ValueError: `resolution` < 1, an unknown `interpolation`, or a random crop/flip without a generator.
    """
    if resolution < 1:
        raise UserError(f"resolution must be a positive number of pixels, got {resolution}.")
    if interpolation not in INTERPOLATION_MODES:
        raise UserError(f"interpolation must be one of {sorted(INTERPOLATION_MODES)}, got {interpolation!r}.")
    if generator is None and (random_flip or not center_crop):
        raise UserError(
            "preprocess_image draws its random crop (center_crop=False) and flip (random_flip=True) from "
            "`generator` only; pass a torch.Generator (seeded per sample) or use center_crop=True and "
            "random_flip=False."
        )
    if image.mode != "RGB":
        image = image.convert("RGB")
    original_size = (image.height, image.width)

    # Resize: the shorter side becomes `resolution`, the longer one int(resolution * long / short).
    width, height = image.size
    if width <= height:
        new_size = (resolution, int(resolution * height / width))
    else:
        new_size = (int(resolution * width / height), resolution)
    if new_size != image.size:
        image = image.resize(new_size, INTERPOLATION_MODES[interpolation])
    width, height = image.size

    if center_crop:
        # Python's round (half to even) on purpose: it is what torchvision's CenterCrop uses.
        top = int(round((height - resolution) / 2.0))
        left = int(round((width - resolution) / 2.0))
    elif (width, height) == (resolution, resolution):
        top = left = 0  # torchvision's RandomCrop makes no draw when there is nothing to choose
    else:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator).item())
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator).item())
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and torch.rand(1, generator=generator).item() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        # diffusers' SDXL script flips before it crops and records the crop in the flipped image; cropping at
        # `left` then flipping is the same image as flipping then cropping at width - resolution - left.
        left = width - resolution - left

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
    return pixels.sub(0.5).div(0.5), original_size, (top, left)


_FINGERPRINT_BATCH = 256
_FINGERPRINT_CHUNK = 8 << 20


def _image_digest(value: Any) -> bytes:
    """SHA-256 of an undecoded `Image` value's content: its bytes, else its file's bytes (streamed)."""
    digest = hashlib.sha256()
    if value is None:
        digest.update(b"null")
    elif value.get("bytes") is not None:
        digest.update(value["bytes"])
    elif value.get("path") is not None and os.path.isfile(value["path"]):
        with open(value["path"], "rb") as f:
            while chunk := f.read(_FINGERPRINT_CHUNK):
                digest.update(chunk)
    else:
        # Not readable here (it fails when loaded, naming the file): its name is all there is to identify it.
        digest.update(b"unreadable\0" + os.path.basename(str(value.get("path"))).encode())
    return digest.digest()


def dataset_fingerprint(dataset) -> str:
    """A stable string identifying the dataset's content, for the run record and cache keys (the PoGDiff index).

    For a `datasets.Dataset` it is the SHA-256 of its features, its row count and every row in order: the
    values of the plain columns, and for each `Image` column the content of the image (its embedded bytes, or
    its file's bytes), never its path. So the same folder reached by a relative or an absolute path, from
    another working directory, or copied elsewhere gives the same fingerprint, while a rewritten image or
    caption, another `--max_train_samples` draw or a filtered split gives another. Every image is read once
    (threads overlap the reads; a few thousand images take seconds). Other objects are hashed with `datasets`'
    pickling hasher.
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        from datasets.fingerprint import Hasher

        return Hasher.hash(dataset)
    rows = dataset.with_format(None)
    image_columns = [name for name, feature in rows.features.items() if isinstance(feature, datasets.Image)]
    for name in image_columns:
        rows = rows.cast_column(name, datasets.Image(decode=False))
    digest = hashlib.sha256()
    header = {"fingerprint_format": 2, "features": dataset.features.to_dict(), "num_rows": len(dataset)}
    digest.update(json.dumps(header, sort_keys=True, default=repr).encode())
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(rows), _FINGERPRINT_BATCH):
            batch = rows[start : start + _FINGERPRINT_BATCH]
            plain = {name: values for name, values in batch.items() if name not in image_columns}
            digest.update(json.dumps(plain, sort_keys=True, default=repr, ensure_ascii=False).encode())
            for name in image_columns:
                for image_digest in pool.map(_image_digest, batch[name]):
                    digest.update(image_digest)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# A training set as every tool reads it


@dataclass
class TrainingData:
    """A training set as the trainer, `python -m pogdiff.index` and `evaluate_pogdiff.py` all read it: the same
    columns, captions, identities and images, so that the three cannot disagree about the data.

    `captions` holds each row's caption or list of captions; `texts` each row's first caption (what the index and
    validation read); `identities` each row's identity (the identity column, or the caption without one).
    """

    dataset: datasets.Dataset
    image_column: str
    caption_column: str
    identity_column: str | None
    captions: list[Any]
    texts: list[str]
    identities: list[str]
    identity_counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def image(self) -> Callable[[int], Image.Image]:
        """Row -> its image as RGB (decoded one at a time; see `row_image_loader`)."""
        return row_image_loader(self.dataset, self.image_column)

    def fingerprint(self) -> str:
        """The content's fingerprint (`dataset_fingerprint`: reads every image once)."""
        return dataset_fingerprint(self.dataset)

    def source(self) -> str:
        """Where the identities come from, for messages."""
        if self.identity_column:
            return f"column {self.identity_column!r}"
        return f"the captions ({self.caption_column!r})"


# The flags naming a training set, with the same names in the trainer, `python -m pogdiff.index` and
# `evaluate_pogdiff.py` (the keywords of `load_training_data`).
DATA_FLAGS = (
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "cache_dir",
    "caption_extension",
    "image_column",
    "caption_column",
    "identity_column",
)


def data_flags(args) -> dict[str, Any]:
    """The `DATA_FLAGS` values of a parsed command line, as `load_training_data` keywords."""
    return {name: getattr(args, name) for name in DATA_FLAGS}


def load_training_data(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    cache_dir: str | None = None,
    caption_extension: str | None = None,
    image_column: str | None = "image",
    caption_column: str | None = "text",
    identity_column: str | None = None,
    split: str = "train",
    max_train_samples: int | None = None,
    seed: int | None = None,
) -> TrainingData:
    """Load a training set (`load_image_text_dataset`), resolve its columns, optionally keep `max_train_samples`
    rows (shuffled with `seed`, as train_text_to_image.py does), and read its captions and identities.

    Raises:
        UserError: no rows, a missing column, a row without a caption or identity.
    """
    dataset = load_image_text_dataset(
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        train_data_dir=train_data_dir,
        cache_dir=cache_dir,
        split=split,
        caption_extension=caption_extension,
    )
    image_column, caption_column, identity_column = resolve_columns(
        dataset.column_names, image_column, caption_column, identity_column
    )
    if max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise UserError("The training dataset is empty: check --train_data_dir / --dataset_name.")
    captions = list(dataset.with_format(None)[caption_column][:])
    texts = [first_caption(c, row=i, column=caption_column) for i, c in enumerate(captions)]
    empty_rows = empty_caption_rows(captions)
    if empty_rows:
        logger.warning(
            f"{len(empty_rows)} of {len(captions)} captions are empty (rows {', '.join(map(str, empty_rows[:10]))}"
            f"{', ...' if len(empty_rows) > 10 else ''}): those images teach the unconditional prediction, not a "
            f"prompt. Fill in --caption_column {caption_column!r} or drop those rows."
        )
    identities = identity_labels(dataset, identity_column, caption_column)
    return TrainingData(
        dataset,
        image_column,
        caption_column,
        identity_column,
        captions,
        texts,
        identities,
        check_identities(identities),
    )


# ----------------------------------------------------------------------------------------------------------
# What the trainer's dataloader yields


def first_caption(caption, row: int | None = None, column: str | None = None) -> str:
    """The caption of a row (the first one when a row has several); `row` and `column` name it in errors."""
    if isinstance(caption, str):
        return caption
    if isinstance(caption, (list, tuple, np.ndarray)) and len(caption) > 0:
        return str(caption[0])
    where = f"Row {row} of the training set" if row is not None else "A row"
    if caption is None:
        raise UserError(
            f"{where} has no caption: its {column or 'caption'!r} value is missing or null. Give every row "
            "a caption (an empty string trains it unconditionally) or drop the row."
        )
    raise UserError(
        f"{where}: captions must be strings or lists of strings, got {type(caption).__name__}: {caption!r}."
    )


class TrainDataset(torch.utils.data.Dataset):
    """Rows of the image-text dataset as (pixel_values, input_ids, index) for the UNet; just the index when
    `cached` (--cache_latents: latents and text states come from caches). With `micro_conditioning` (SDXL)
    each row also carries its `time_ids` (original size, crop top-left, target size): from the crop drawn
    here, or from `cached_time_ids` (one row per image, the cache's centre crop).

    Random crop/flip draw from a generator seeded by (seed, epoch, row), and the choice among several captions is
    `RowCaptions`' (the one the neighbour lookups use too), so a resumed run sees exactly the pixels and captions
    the uninterrupted run saw, whatever the worker count.
    """

    def __init__(
        self,
        dataset,
        image_column: str,
        row_captions,
        tokenize: Callable[[list[str]], torch.Tensor],
        *,
        seed: int,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        interpolation: str = "lanczos",
        cached: bool = False,
        micro_conditioning: bool = False,
        cached_time_ids: torch.Tensor | None = None,
    ) -> None:
        self.image = row_image_loader(dataset, image_column)
        self.row_captions = row_captions  # `sampling.RowCaptions`
        self.tokenize = tokenize  # `families.TextEncoders.tokenize`
        self.seed = seed
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.interpolation = interpolation
        self.cached = cached
        self.micro_conditioning = micro_conditioning
        self.cached_time_ids = cached_time_ids
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.row_captions.per_row)

    def __getitem__(self, i: int) -> dict:
        if self.cached:
            # Latents and text embeddings come from the caches: no image decoding at all.
            if self.micro_conditioning:
                return {"index": i, "time_ids": self.cached_time_ids[i]}
            return {"index": i}
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, i))
        pixel_values, original_size, crop_top_left = preprocess_image_and_crop(
            self.image(i),
            self.resolution,
            center_crop=self.center_crop,
            random_flip=self.random_flip,
            generator=generator,
            interpolation=self.interpolation,
        )
        # Several captions per image: one per (epoch, row), as train_text_to_image picks one at random.
        input_ids = self.tokenize([self.row_captions.text(i, self.epoch)])[0]
        item = {"pixel_values": pixel_values, "input_ids": input_ids, "index": i}
        if self.micro_conditioning:
            item["time_ids"] = add_time_ids(original_size, crop_top_left, (self.resolution, self.resolution))
        return item


def collate_fn(examples: list[dict]) -> dict:
    batch = {"index": torch.tensor([e["index"] for e in examples], dtype=torch.long)}
    if "pixel_values" in examples[0]:
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).to(
            memory_format=torch.contiguous_format
        )
        batch["pixel_values"] = pixel_values.float()
        batch["input_ids"] = torch.stack([e["input_ids"] for e in examples])
    if "time_ids" in examples[0]:
        batch["time_ids"] = torch.stack([e["time_ids"] for e in examples])
    return batch


if __name__ == "__main__":
    # The long-tail builder's command line, kept under its historical name `python -m pogdiff.data build`.
    from pogdiff.longtail import main

    prog = "python -m pogdiff.data"
    report_user_errors(prog, lambda: main(prog=prog))
