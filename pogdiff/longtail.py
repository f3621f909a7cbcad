"""Build a long-tailed image-text dataset from an identity-labelled image collection.

The result has the shape of the paper's AgeDB-IT2I / DigiFace-IT2I (Sec. 4.1, Fig. 4): a few "majority"
identities with many training images, many "minority" identities with two. Real names are masked by stable
pseudonyms, and each identity's unused images become a `reference` split for evaluation. Command line::

    python -m pogdiff.data build --image_dir AgeDB --identity_from agedb --preset L --output_dir agedb-it2i-l

(`python -m pogdiff.longtail build ...` is the same command.) The output is an `imagefolder` directory:
`images/`, `metadata.jsonl` with rows `{"file_name", "text", "identity", "split"}`, `summary.json`,
`identity_histogram.png`, and, for the owner only, `names.json` (pseudonym -> real name) and `sources.json`
(file -> source image). Train on it with `--train_data_dir DIR` (or `--dataset_name DIR`):
`pogdiff.data.load_image_text_dataset` keeps `split == "train"`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data import (
    IMAGE_EXTENSIONS,
    REFERENCE_SPLIT,
    SPLIT_COLUMN,
    TRAIN_SPLIT,
    _missing_column_error,
    identity_labels,
    load_image_text_dataset,
    load_rgb,
    scan_caption_folder,
)
from .errors import UserError, report_user_errors
from .seeds import pseudonym_hash

logger = logging.getLogger(__name__)

DEFAULT_CAPTION_TEMPLATE = "An image of {name}."

# AgeDB names its files `<image id>_<Name>_<age>_<gender>.jpg`, e.g. `715_RonaldReagan_53_m.jpg`. The name
# is matched greedily because age and gender are anchored at the end, so a name with an underscore parses too.
AGEDB_PATTERN = r"(?P<image_id>\d+)_(?P<identity>.+)_(?P<age>\d+)_(?P<gender>[mfMF])\.(?i:jpe?g|png)"

# The paper's AgeDB-IT2I shapes: (majority ids, majority images, minority ids, minority images) and the
# totals the paper reports. Only S is reachable exactly with 30s and 2s. M (10 ids, 100 images) would need
# 28a = 80 and L (223 ids, 976 images) 28a = 530, neither integral; we take the nearest integer solution,
# keep the paper's identity count, and report the realised image total (M: 104, L: 978).
PRESETS: dict[str, dict[str, int]] = {
    "S": {"majority_ids": 1, "majority_images": 30, "minority_ids": 1, "minority_images": 2},
    "M": {"majority_ids": 3, "majority_images": 30, "minority_ids": 7, "minority_images": 2},
    "L": {"majority_ids": 19, "majority_images": 30, "minority_ids": 204, "minority_images": 2},
}
PAPER_TOTALS: dict[str, dict[str, int]] = {
    "S": {"identities": 2, "images": 32},
    "M": {"identities": 10, "images": 100},
    "L": {"identities": 223, "images": 976},
}

# Pseudonyms for name masking (paper Sec. 4.1 replaces "Albert Einstein" with "Lukas"). Generic first names;
# when they run out (or collide with a real name), "First Last" pairs with the surnames below are used.
PSEUDONYM_FIRST_NAMES: tuple[str, ...] = tuple(
    """
    Lukas Mira Tomas Elena Jonas Sofia Matteo Alma Felix Ines Oskar Lena Emil Nora Hugo Ida Leon Clara Anton
    Vera Milo Greta Theo Livia Elias Maren Jakob Selma Noah Freya Nils Hanna Arvid Liv Mats Tove Ronja Sven
    Frida Aksel Signe Eero Aino Kalle Saga Otto Ylva Linus Edda Henrik Astrid Rasmus Tilde Viggo Malin Bruno
    Carla Dario Elsa Fabio Gaia Ivo Irene Lorenzo Marta Nico Olga Paolo Rita Sergio Tessa Ugo Valeria Pablo
    Lucia Mateo Alba Diego Carmen Rafael Nuria Andres Paula Javier Ainhoa Tiago Beatriz Joao Leonor Rui Iris
    Duarte Marisa Pedro Joana Bernardo Catarina Goncalo Filipa Amaury Camille Bastien Margaux Cyril Elodie
    Damien Fleur Gaspard Helene Jules Lea Mathis Manon Remi Oriane Thibault Sylvie Yannick Zoe Benedikt
    Annika Florian Katrin Jannik Leonie Moritz Pauline Tobias Ricarda Yannis Daphne Nikos Eleni Stavros
    Thalia Kostas Zeta Andrei Ilinca Bogdan Ioana Darius Oana Marek Zofia Pawel Agata Tomasz Kinga Ondrej
    Hedda Radek Zuzana Milan Katarina Luka Petra Goran Mila Dusan Nevena Aleks Dunja Janek Kaisa Taavi
    Helmi Ville Aada Timo Kerttu Arto Ilse Bram Femke Daan Noor Sander Lotte Joris Anouk Pieter Sanne Wout
    Eline Ruben Mette Casper Sofie Magnus Karin Torben Inge Jesper Birte Aurel Dalia Cosmin Irina Farid
    Leila Kian Nasrin Omid Shirin Arash Yasmin Karim Salma Tarik Amira Idris Nadia Kofi Ama Kwame Efua Tendai
    Chipo Jabari Zuri Amani Imani Kenji Aiko Haruto Yui Sora Rin Daichi Mei Jun Hana Min Seo Tae Ara Ravi
    Asha Vikram Meera Arjun Priya Rohan Anjali Tenzin Pema Dorje Sonam Bao Linh Minh Thu Khoa Lan Mateus
    Talia Ezra Noemi Caleb Juno Silas Wren Rowan Ivy Jasper Hazel Emmett Willa Otis Maeve Ansel Briar Cyrus
    Delia Ellis Fern Gideon Harriet Ira Junia Kit Lyra Merritt Nell Orrin Posy Quinn Rhea Soren Tamsin Ulla
    """.split()
)
PSEUDONYM_SURNAMES: tuple[str, ...] = tuple(
    """
    Alder Ashby Birch Brook Calder Colby Dale Dunmore Ellery Everly Fenn Frost Garrow Glenn Hale Harlow Ives
    Jarrow Kell Lark Marlow Noyes Orme Penn Quill Rook Sable Thorne Upton Vale Wrenfield Yarrow
    """.split()
)


# ----------------------------------------------------------------------------------------------------------
# Names: parsing, pseudonyms, masking
# ----------------------------------------------------------------------------------------------------------


def parse_agedb_filename(file_name: str) -> dict[str, Any]:
    """Parse AgeDB's `<image id>_<Name>_<age>_<gender>.jpg`, e.g. `715_RonaldReagan_53_m.jpg`.

    Returns `{"image_id": 715, "identity": "RonaldReagan", "age": 53, "gender": "m"}`.

    Raises:
        ValueError: the file name does not follow AgeDB's pattern (the message names it).
    """
    match = re.fullmatch(AGEDB_PATTERN, os.path.basename(file_name))
    if match is None:
        raise UserError(
            f"File {file_name!r} does not follow AgeDB's naming `<image id>_<Name>_<age>_<gender>.jpg` "
            "(e.g. 715_RonaldReagan_53_m.jpg). Remove it, or use --identity_from folder / --identity_regex."
        )
    return {
        "image_id": int(match["image_id"]),
        "identity": match["identity"],
        "age": int(match["age"]),
        "gender": match["gender"].lower(),
    }


def name_parts(name: str) -> list[str]:
    """Split a name into words: separators, then CamelCase (`JWMarriott` -> `JW`, `Marriott`)."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return [part for part in re.split(r"[\s_.'\-]+", spaced) if part]


def display_name(name: str) -> str:
    """The readable form of an identity key: `RonaldReagan` -> `Ronald Reagan`."""
    return " ".join(name_parts(name)) or name


def assign_pseudonyms(names: list[str], seed: int = 0) -> dict[str, str]:
    """Give each real name a stable, unique pseudonym (real name -> pseudonym).

    A name's pseudonym is picked by hashing (seed, name) into `PSEUDONYM_FIRST_NAMES`, so it depends on
    nothing else unless two names collide; collisions are resolved by probing to the next free name, in
    an order fixed by the hashes (not by the input order). A candidate equal to any word of any real name
    is skipped. When first names run out, "First Last" pairs are used.
    """
    unique = sorted(set(names))
    forbidden = {part.lower() for name in unique for part in name_parts(name)}
    first = PSEUDONYM_FIRST_NAMES
    pairs = [f"{f} {s}" for s in PSEUDONYM_SURNAMES for f in first]
    used: set[str] = set()
    result: dict[str, str] = {}
    for name in sorted(unique, key=lambda n: (pseudonym_hash(seed, n), n)):
        start = pseudonym_hash(seed, name)
        for pool in (first, pairs):
            candidates = (pool[(start + k) % len(pool)] for k in range(len(pool)))
            choice = next(
                (c for c in candidates if c not in used and not forbidden & {w.lower() for w in c.split()}),
                None,
            )
            if choice is not None:
                break
        else:
            raise UserError(f"Ran out of pseudonyms for {len(unique)} identities; extend PSEUDONYM_SURNAMES.")
        used.add(choice)
        result[name] = choice
    return result


def _full_name_pattern(name: str) -> str:
    # Words may be joined by nothing (CamelCase), spaces, dots, underscores or hyphens; short all-caps words
    # are initials and may be written with dots ("JW" matches "J.W." and "J. W.").
    words = []
    for part in name_parts(name) or [name]:
        if part.isupper() and part.isalpha() and len(part) <= 3:
            words.append(r"[\s.]*".join(re.escape(ch) for ch in part) + r"\.?")
        else:
            words.append(re.escape(part))
    return r"[\s._'\-]*".join(words)


class NameMasker:
    """Replace real names in captions with their pseudonyms.

    Every full-name form of every identity (`RonaldReagan`, `Ronald Reagan`, `ronald_reagan`, ...;
    case-insensitive) is replaced in every caption. In a caption of identity X, X's own single name words
    of three or more letters (`Reagan`, `Ronald`; case-sensitive, so ordinary words survive) are replaced
    too. Pseudonyms never equal a real name word, so the second pass cannot touch the first pass's output.
    """

    def __init__(self, pseudonyms: dict[str, str]):
        self.pseudonyms = dict(pseudonyms)
        self._by_key = {self._key(name): pseudo for name, pseudo in self.pseudonyms.items()}
        forms = sorted((_full_name_pattern(name) for name in self.pseudonyms), key=len, reverse=True)
        self._full = (
            re.compile(r"(?<!\w)(?:" + "|".join(forms) + r")(?!\w)", re.IGNORECASE) if forms else None
        )
        self._parts: dict[str, re.Pattern | None] = {}

    @staticmethod
    def _key(text: str) -> str:
        return re.sub(r"[\s._'\-]", "", text).lower()

    def _own_parts(self, identity: str) -> re.Pattern | None:
        if identity not in self._parts:
            words = sorted(
                {p for p in name_parts(identity) if len(p) >= 3 and p.isalpha()}, key=len, reverse=True
            )
            self._parts[identity] = (
                re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)") if words else None
            )
        return self._parts[identity]

    def __call__(self, caption: str, identity: str | None = None) -> str:
        if self._full is not None:
            caption = self._full.sub(lambda m: self._by_key[self._key(m.group(0))], caption)
        if identity is not None and identity in self.pseudonyms:
            parts = self._own_parts(identity)
            if parts is not None:
                caption = parts.sub(self.pseudonyms[identity], caption)
        return caption


# ----------------------------------------------------------------------------------------------------------
# Long-tail sampling
# ----------------------------------------------------------------------------------------------------------


def longtail_targets(
    majority_ids: int | None = None,
    majority_images: int = 30,
    minority_ids: int | None = None,
    minority_images: int = 2,
    power_law: float | None = None,
    max_images: int = 30,
    min_images: int = 2,
    num_ids: int | None = None,
) -> list[int]:
    """Training images per identity, largest first.

    Either majority/minority (`majority_ids` x `majority_images` + `minority_ids` x `minority_images`,
    paper Sec. 4.1) or a power law: rank r = 1..num_ids gets max(min_images, round(max_images * r^-alpha)).
    """
    if power_law is not None:
        if power_law < 0 or num_ids is None or num_ids < 1 or not 1 <= min_images <= max_images:
            raise UserError(
                "--power_law needs ALPHA >= 0, --num_ids >= 1 and 1 <= --min_images <= --max_images; got "
                f"alpha={power_law}, num_ids={num_ids}, min_images={min_images}, max_images={max_images}."
            )
        return [
            max(min_images, math.floor(max_images * r ** (-power_law) + 0.5)) for r in range(1, num_ids + 1)
        ]
    if majority_ids is None or minority_ids is None:
        raise UserError("Give --preset S|M|L, or --majority_ids and --minority_ids, or --power_law ALPHA.")
    if majority_ids < 0 or minority_ids < 0 or majority_ids + minority_ids == 0:
        raise UserError(
            f"Need >= 1 identity; got --majority_ids {majority_ids} --minority_ids {minority_ids}."
        )
    if min(majority_images, minority_images) < 1:
        raise UserError("--majority_images and --minority_images must be >= 1.")
    targets = [majority_images] * majority_ids + [minority_images] * minority_ids
    return sorted(targets, reverse=True)


def assign_identities(
    counts: dict[str, int], targets: list[int], selection: str, rng: np.random.Generator
) -> list[tuple[str, int]]:
    """Match identities to target image counts: [(identity, target)], largest target first.

    Targets are served largest first from the identities that have at least that many images:
    `most_images` takes the one with the most images (ties by name), `random` a uniformly random one
    (drawn from `rng`). Serving large targets first finds an assignment whenever one exists.

    Raises:
        ValueError: no identity left with enough images; names the best candidate and its count.
    """
    if selection not in ("most_images", "random"):
        raise UserError(f"--selection must be 'most_images' or 'random', got {selection!r}.")
    if len(targets) > len(counts):
        raise UserError(
            f"Asked for {len(targets)} identities but the input has only {len(counts)}. Lower the number "
            "of identities (--majority_ids / --minority_ids / --num_ids) or use a smaller --preset."
        )
    ranked = sorted(counts, key=lambda n: (-counts[n], n))
    taken: set[str] = set()
    assignment = []
    for rank, target in enumerate(sorted(targets, reverse=True), start=1):
        eligible = [n for n in ranked if n not in taken and counts[n] >= target]
        if not eligible:
            best = next(n for n in ranked if n not in taken)
            raise UserError(
                f"Identity {best!r} has {counts[best]} images, fewer than the {target} requested for the "
                f"identity ranked {rank} of {len(targets)} (it is the best one left; "
                f"{sum(c >= target for c in counts.values())} identities have >= {target}). Lower the "
                "requested counts, request fewer large identities, or add images."
            )
        name = (
            eligible[0] if selection == "most_images" else sorted(eligible)[int(rng.integers(len(eligible)))]
        )
        taken.add(name)
        assignment.append((name, target))
    return assignment


# ----------------------------------------------------------------------------------------------------------
# Builder
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """One input image: where its bytes are and what we know about it."""

    key: str  # relative file name: orders images deterministically and keys --captions_file
    identity: str
    path: str | None = None
    data: bytes | None = None
    caption: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


def _scan_image_dir(
    image_dir: str, identity_from: str, identity_regex: str | None, caption_extension: str | None = None
) -> list[_Source]:
    root = Path(image_dir)
    if not root.is_dir():
        raise UserError(f"--image_dir {image_dir!r} is not a directory.")
    pattern = None
    if identity_from == "agedb":
        pattern = re.compile(AGEDB_PATTERN)
    elif identity_from == "regex":
        if not identity_regex:
            raise UserError(
                "--identity_from regex needs --identity_regex with a named group (?P<identity>...)."
            )
        try:
            pattern = re.compile(identity_regex)
        except re.error as error:  # re's own traceback names neither the flag nor the pattern
            raise UserError(
                f"--identity_regex {identity_regex!r} is not a valid regular expression: {error}."
            ) from None
        if "identity" not in pattern.groupindex:
            raise UserError(f"--identity_regex {identity_regex!r} has no named group (?P<identity>...).")
    elif identity_from != "folder":
        raise UserError(f"--identity_from must be folder, agedb or regex, got {identity_from!r}.")

    # With sidecar captions (kohya-style), the folder scan that the trainer's loader uses also gives the
    # captions and strips kohya's `N_` repeats prefix from sub-folder names.
    captioned = None
    if caption_extension is not None:
        captioned = {item.key: item for item in scan_caption_folder(root, caption_extension)}
        paths = [root / key for key in captioned]
        with_repeats = sorted(
            {i.folder for i in captioned.values() if i.folder is not None and i.folder != i.identity}
        )
        if identity_from == "folder" and with_repeats:
            logger.warning(
                "Sub-folders %s carry kohya's repeats prefix (`N_name`); the identity is the name after it and "
                "the repeats are ignored: the builder sets each identity's image count itself.",
                with_repeats[:10],
            )
    else:
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    sources = []
    for path in paths:
        key = path.relative_to(root).as_posix()
        if identity_from == "folder":
            if "/" not in key:
                raise UserError(
                    f"File {key!r} lies directly in --image_dir; with --identity_from folder every image "
                    "must be inside a sub-folder named after its identity."
                )
            identity, fields = key.split("/", 1)[0], {}
            if captioned is not None:
                identity = captioned[key].identity
        elif identity_from == "agedb":
            fields = parse_agedb_filename(path.name)
            identity = fields.pop("identity")
        else:
            match = pattern.fullmatch(path.name)
            if match is None:
                raise UserError(
                    f"File {key!r} does not match --identity_regex {pattern.pattern!r} (matched against the "
                    "whole file name). Fix the pattern or remove the file."
                )
            fields = {k: v for k, v in match.groupdict().items() if k != "identity"}
            identity = match["identity"]
        caption = captioned[key].caption if captioned is not None else None
        sources.append(_Source(key=key, identity=identity, path=str(path), caption=caption, fields=fields))
    if not sources:
        raise UserError(f"No images found in --image_dir {image_dir!r} (extensions {IMAGE_EXTENSIONS}).")
    return sources


def _read_dataset_sources(
    dataset_name: str | None,
    dataset_config_name: str | None,
    input_data_dir: str | None,
    cache_dir: str | None,
    image_column: str | None,
    identity_column: str,
    caption_column: str | None,
) -> list[_Source]:
    import datasets

    dataset = load_image_text_dataset(dataset_name, dataset_config_name, input_data_dir, cache_dir)
    columns = dataset.column_names
    image_column = image_column or ("image" if "image" in columns else columns[0])
    for flag, name in (("--image_column", image_column), ("--identity_column", identity_column)):
        if name not in columns:
            raise _missing_column_error(flag, name, columns)
    if caption_column is not None and caption_column not in columns:
        raise _missing_column_error("--caption_column", caption_column, columns)

    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    identities = identity_labels(dataset, identity_column, caption_column or identity_column)
    captions = identity_labels(dataset, caption_column, caption_column) if caption_column else None
    images = dataset.with_format(None)[image_column][:]
    sources = []
    for i, (image, identity) in enumerate(zip(images, identities)):
        path = image.get("path") if isinstance(image, dict) else str(image)
        data = image.get("bytes") if isinstance(image, dict) else None
        key = f"{i:08d}_{os.path.basename(path)}" if path else f"{i:08d}"
        caption = captions[i] if captions is not None else None
        sources.append(_Source(key=key, identity=identity, path=path, data=data, caption=caption))
    return sources


def _read_captions_file(captions_file: str) -> dict[str, str]:
    captions = {}
    with open(captions_file, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("text", row.get("caption"))
            if "file_name" not in row or not isinstance(text, str):
                raise UserError(
                    f"{captions_file}:{line_number}: each line must be a JSON object with 'file_name' and "
                    f"'text' (or 'caption'); got keys {sorted(row)}."
                )
            captions[row["file_name"]] = text
    return captions


def _lookup_caption(captions: dict[str, str], source: _Source, captions_file: str) -> str:
    # Keys may be the path relative to --image_dir or the bare file name.
    candidates = [source.key, os.path.basename(source.key)]
    if source.path:
        candidates.append(os.path.basename(source.path))
    for candidate in candidates:
        if candidate in captions:
            return captions[candidate]
    raise UserError(f"--captions_file {captions_file!r} has no caption for image {source.key!r}.")


def _slug(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "id"


def _write_image(source: _Source, target_stem: Path, image_format: str, resolution: int | None) -> str:
    """Copy or re-encode one image next to `target_stem`; returns the file name written."""
    image = load_rgb({"path": source.path or source.key, "bytes": source.data})
    if image_format == "copy" and resolution is None:
        suffix = Path(source.path).suffix.lower() if source.path else ""
        if source.data is not None:
            with Image.open(io.BytesIO(source.data)) as probe:
                suffix = suffix or f".{(probe.format or 'png').lower()}"
            target = target_stem.with_suffix(suffix)
            target.write_bytes(source.data)
        else:
            target = target_stem.with_suffix(suffix)
            shutil.copyfile(source.path, target)
        return target.name
    if resolution is not None:
        width, height = image.size
        scale = resolution / min(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
    target = target_stem.with_suffix(".png")
    image.save(target, format="PNG")
    return target.name


def plot_identity_histogram(train_counts: dict[str, int], path: str | os.PathLike, title: str) -> None:
    """Paper Fig. 4 style: training images per identity, sorted largest first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(train_counts, key=lambda n: (-train_counts[n], n))
    values = [train_counts[n] for n in names]
    fig, ax = plt.subplots(figsize=(max(4.0, min(12.0, 0.25 * len(names) + 2)), 3.2))
    ax.bar(range(len(names)), values, width=0.85, color="#4C72B0")
    ax.set_xlabel("identity (sorted by number of training images)")
    ax.set_ylabel("training images")
    ax.set_title(title)
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks([])
    ax.set_xlim(-0.6, len(names) - 0.4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


_OUTPUT_FILES = ("metadata.jsonl", "names.json", "sources.json", "summary.json", "identity_histogram.png")


def _prepare_output_dir(output_dir: Path) -> None:
    # Remove only what the builder writes, never anything else the user keeps there.
    shutil.rmtree(output_dir / "images", ignore_errors=True)
    for name in _OUTPUT_FILES:
        (output_dir / name).unlink(missing_ok=True)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)


def build_longtail_dataset(
    output_dir: str,
    *,
    image_dir: str | None = None,
    identity_from: str = "folder",
    identity_regex: str | None = None,
    caption_extension: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    input_data_dir: str | None = None,
    cache_dir: str | None = None,
    image_column: str | None = None,
    identity_column: str = "identity",
    caption_column: str | None = None,
    preset: str | None = None,
    majority_ids: int | None = None,
    majority_images: int | None = None,
    minority_ids: int | None = None,
    minority_images: int | None = None,
    power_law: float | None = None,
    max_images: int = 30,
    min_images: int = 2,
    num_ids: int | None = None,
    selection: str = "most_images",
    caption_template: str = DEFAULT_CAPTION_TEMPLATE,
    captions_file: str | None = None,
    mask_names: bool = True,
    pseudonym_seed: int = 0,
    image_format: str = "copy",
    resolution: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Build a long-tailed image-text `imagefolder` dataset; returns the summary (also `summary.json`).

    Input: `image_dir` (identity from the sub-folder, AgeDB file names, or `identity_regex`), or an
    existing dataset (`dataset_name` / `input_data_dir`) with an `identity_column`. With `caption_extension`
    (kohya-style, e.g. ".txt"), each image of `image_dir` brings its caption in the file beside it
    (`pogdiff.data.scan_caption_folder`, with its errors), and kohya's `N_name` sub-folders give identity
    `name`; their repeats N are ignored (logged), since the builder sets each identity's count itself.
    Shape: `preset` S/M/L (see `PRESETS`; flags given explicitly override it), majority/minority counts,
    or `power_law` with `num_ids` (default: every identity with >= `min_images`).
    Identities are matched to targets by `assign_identities` (`selection`, seeded by `seed`); each
    identity's training images are a seeded draw from its images (the draw depends only on `seed` and
    the identity, so adding other identities does not change it); its other images form the reference split.
    Captions: `captions_file` (jsonl `{"file_name", "text"}`), else the sidecar files (`caption_extension`) or
    the dataset's `caption_column`, else
    `caption_template` with `{name}` and any parsed fields (`{age}`, `{gender}` for AgeDB). With
    `mask_names`, names are replaced by pseudonyms (`assign_pseudonyms` over the chosen identities, seeded
    by `pseudonym_seed`) everywhere (captions, identity column, file names).
    Output files are named `images/<identity>_<nnnn>.<ext>`, copied as is or (`image_format="png"` or a
    `resolution`, shorter side resized to it) re-encoded as PNG. `push_to_hub` uploads the loaded dataset
    (train and reference rows, `split` column; never names.json/sources.json) as a private dataset.
    """
    # Which input.
    if sum(x is not None for x in (image_dir, dataset_name, input_data_dir)) != 1:
        raise UserError("Give exactly one input: --image_dir, --dataset_name or --input_data_dir.")
    if identity_regex is not None and image_dir is not None:
        identity_from = "regex"
    if caption_extension is not None and image_dir is None:
        raise UserError(
            "--caption_extension reads the caption files beside the images of --image_dir; use it with "
            "--image_dir (or give the dataset's captions with --caption_column)."
        )
    if caption_extension is not None and captions_file is not None:
        raise UserError(
            "--caption_extension and --captions_file are two sources of captions; drop one of them."
        )
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output_dir!r} is not empty; pass --overwrite to replace it.")
    if image_format not in ("copy", "png"):
        raise UserError(f"--image_format must be 'copy' or 'png', got {image_format!r}.")

    # Which shape.
    if power_law is not None and (preset or majority_ids is not None or minority_ids is not None):
        raise UserError("--power_law cannot be combined with --preset or --majority_ids/--minority_ids.")
    shape: dict[str, Any]
    if power_law is None:
        if preset is not None and preset not in PRESETS:
            raise UserError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}.")
        given = {
            "majority_ids": majority_ids,
            "majority_images": majority_images,
            "minority_ids": minority_ids,
            "minority_images": minority_images,
        }
        defaults = PRESETS[preset] if preset else {"majority_images": 30, "minority_images": 2}
        shape = {k: v if v is not None else defaults.get(k) for k, v in given.items()}
        targets = longtail_targets(**shape)
        shape = {"kind": "majority_minority", **shape}
    else:
        shape = {"kind": "power_law", "alpha": power_law, "max_images": max_images, "min_images": min_images}

    # Read the input and group images by identity, in a fixed order.
    if image_dir is not None:
        sources = _scan_image_dir(image_dir, identity_from, identity_regex, caption_extension)
    else:
        sources = _read_dataset_sources(
            dataset_name,
            dataset_config_name,
            input_data_dir,
            cache_dir,
            image_column,
            identity_column,
            caption_column,
        )
    by_identity: dict[str, list[_Source]] = {}
    for source in sorted(sources, key=lambda s: (s.identity, s.key)):
        by_identity.setdefault(source.identity, []).append(source)
    counts = {name: len(items) for name, items in by_identity.items()}

    if power_law is not None:
        if num_ids is None:
            num_ids = sum(c >= min_images for c in counts.values())
        targets = longtail_targets(
            power_law=power_law, max_images=max_images, min_images=min_images, num_ids=num_ids
        )
        shape["num_ids"] = num_ids

    assignment = assign_identities(counts, targets, selection, np.random.default_rng(seed))

    # Names: real identity -> the name written out (a pseudonym when masking).
    chosen = [name for name, _ in assignment]
    if mask_names:
        pseudonyms = assign_pseudonyms(chosen, seed=pseudonym_seed)
        out_name = dict(pseudonyms)
        masker = NameMasker(pseudonyms)
    else:
        out_name = {name: display_name(name) for name in chosen}
        clashes = Counter(out_name.values())
        duplicated = sorted(n for n in chosen if clashes[out_name[n]] > 1)
        if duplicated:
            raise UserError(
                f"Identities {duplicated} share the display name; rename them or use --mask_names."
            )
        masker = None
    captions = _read_captions_file(captions_file) if captions_file else None

    # Per identity: a seeded draw of training images; the rest is the reference split.
    rows: list[tuple[_Source, str, str]] = []  # (source, identity written out, split)
    for name, target in assignment:
        items = by_identity[name]
        rng = np.random.default_rng(pseudonym_hash(seed, name))
        picked = set(rng.choice(len(items), size=target, replace=False).tolist())
        rows += [(items[i], out_name[name], TRAIN_SPLIT) for i in sorted(picked)]
        rows += [(items[i], out_name[name], REFERENCE_SPLIT) for i in range(len(items)) if i not in picked]
    rows.sort(key=lambda r: (r[2] != TRAIN_SPLIT, r[1]))  # stable: keeps each identity's image order

    def caption_for(source: _Source, written_name: str) -> str:
        if captions is not None:
            text = _lookup_caption(captions, source, captions_file)
        elif source.caption is not None:
            text = source.caption
        else:
            try:
                text = caption_template.format(name=written_name, **source.fields)
            except (KeyError, IndexError) as err:
                raise UserError(
                    f"--caption_template {caption_template!r} uses {err}, but only {{name}}"
                    f"{''.join(', {' + k + '}' for k in source.fields)} are available for {source.key!r}."
                ) from err
        return masker(text, source.identity) if masker is not None else text

    # Captions first, so a missing caption fails before anything is written.
    texts = [caption_for(source, written_name) for source, written_name, _ in rows]

    # Write.
    _prepare_output_dir(out)
    from tqdm.auto import tqdm

    metadata, source_map, index = [], {}, Counter()
    progress = tqdm(zip(rows, texts), total=len(rows), desc="Writing images", disable=not show_progress)
    for (source, written_name, split), text in progress:
        stem = out / "images" / f"{_slug(written_name)}_{index[written_name]:04d}"
        index[written_name] += 1
        file_name = "images/" + _write_image(source, stem, image_format, resolution)
        metadata.append({"file_name": file_name, "text": text, "identity": written_name, SPLIT_COLUMN: split})
        source_map[file_name] = source.path or source.key
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in metadata:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(out / "sources.json", "w", encoding="utf-8") as f:
        json.dump(source_map, f, indent=1, ensure_ascii=False)
    if mask_names:
        with open(out / "names.json", "w", encoding="utf-8") as f:
            json.dump({out_name[n]: n for n in chosen}, f, indent=1, sort_keys=True, ensure_ascii=False)

    train_counts = {out_name[n]: t for n, t in assignment}
    reference_counts = {out_name[n]: counts[n] - t for n, t in assignment}
    summary: dict[str, Any] = {
        "output_dir": str(out),
        "num_identities": len(assignment),
        "num_train_images": sum(train_counts.values()),
        "num_reference_images": sum(reference_counts.values()),
        "train_counts": train_counts,
        "reference_counts": reference_counts,
        "shape": shape,
        "preset": preset,
        "paper_totals": PAPER_TOTALS.get(preset) if preset else None,
        "selection": selection,
        "seed": seed,
        "mask_names": mask_names,
        "pseudonym_seed": pseudonym_seed if mask_names else None,
    }
    with open(out / "summary.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    plot_identity_histogram(
        train_counts,
        out / "identity_histogram.png",
        f"{summary['num_identities']} identities, {summary['num_train_images']} training images",
    )

    if push_to_hub:
        # The upload goes through `datasets`, so only images and metadata leave the machine.
        import datasets

        datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=cache_dir).push_to_hub(
            push_to_hub, private=True
        )
    return summary


def format_summary(summary: dict[str, Any], max_rows: int = 20) -> str:
    """A human-readable summary of `build_longtail_dataset`'s result."""
    shape = summary["shape"]
    if shape["kind"] == "power_law":
        shape_text = (
            f"power law alpha={shape['alpha']} over {shape['num_ids']} identities, "
            f"{shape['max_images']}..{shape['min_images']} images"
        )
    else:
        shape_text = (
            f"{shape['majority_ids']} majority x {shape['majority_images']} + "
            f"{shape['minority_ids']} minority x {shape['minority_images']}"
        )
    if summary["preset"]:
        paper = summary["paper_totals"]
        shape_text += (
            f" (preset {summary['preset']}; paper: {paper['identities']} identities / {paper['images']} images, "
            f"realised: {summary['num_identities']} / {summary['num_train_images']})"
        )
    lines = [
        f"Long-tailed dataset written to {summary['output_dir']}",
        f"  shape: {shape_text}",
        f"  identities: {summary['num_identities']}   training images: {summary['num_train_images']}   "
        f"reference images: {summary['num_reference_images']}",
        f"  {'identity':<24}{'train':>7}{'reference':>11}",
    ]
    train, reference = summary["train_counts"], summary["reference_counts"]
    names = sorted(train, key=lambda n: (-train[n], n))
    lines += [f"  {n:<24}{train[n]:>7}{reference[n]:>11}" for n in names[:max_rows]]
    if len(names) > max_rows:
        lines.append(
            f"  ... and {len(names) - max_rows} more identities (see summary.json, identity_histogram.png)"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def _build_parser(prog: str = "python -m pogdiff.longtail") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser(
        "build",
        help="build a long-tailed image-text dataset (imagefolder) from identity-labelled images",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = build.add_argument_group("input (exactly one of --image_dir, --dataset_name, --input_data_dir)")
    source.add_argument("--image_dir", help="folder of images; identity from --identity_from")
    source.add_argument(
        "--identity_from",
        choices=("folder", "agedb", "regex"),
        default="folder",
        help="folder: first sub-folder name; agedb: `<id>_<Name>_<age>_<gender>.jpg`; regex: --identity_regex",
    )
    source.add_argument("--identity_regex", help="regex with a named group (?P<identity>...), full file name")
    source.add_argument(
        "--caption_extension",
        help="with --image_dir: each image's caption is the file beside it with this extension (kohya-style, "
        "e.g. .txt), instead of --caption_template; kohya's `N_name` sub-folders give identity `name`, and the "
        "repeats N are ignored (the builder sets each identity's image count itself)",
    )
    source.add_argument("--dataset_name", help="Hub dataset or local dataset folder with an identity column")
    source.add_argument("--dataset_config_name")
    source.add_argument(
        "--input_data_dir", help="imagefolder (with metadata.jsonl) holding an identity column"
    )
    source.add_argument("--cache_dir")
    source.add_argument("--image_column")
    source.add_argument("--identity_column", default="identity")
    source.add_argument("--caption_column", help="reuse this column's captions (names masked)")

    shape = build.add_argument_group("long-tail shape")
    shape.add_argument("--preset", choices=sorted(PRESETS), help="the paper's AgeDB-IT2I S/M/L shapes")
    shape.add_argument("--majority_ids", type=int)
    shape.add_argument("--majority_images", type=int, help="default 30 (or the preset's)")
    shape.add_argument("--minority_ids", type=int)
    shape.add_argument("--minority_images", type=int, help="default 2 (or the preset's)")
    shape.add_argument(
        "--power_law", type=float, metavar="ALPHA", help="images(rank r) = max_images * r^-ALPHA"
    )
    shape.add_argument("--max_images", type=int, default=30)
    shape.add_argument("--min_images", type=int, default=2)
    shape.add_argument("--num_ids", type=int, help="power law: identities (default: all with >= min_images)")
    shape.add_argument(
        "--selection",
        choices=("most_images", "random"),
        default="most_images",
        help="which identity serves each target, largest first: most images available (ties by name) or random",
    )
    shape.add_argument("--seed", type=int, default=0)

    text = build.add_argument_group("captions")
    text.add_argument("--caption_template", default=DEFAULT_CAPTION_TEMPLATE)
    text.add_argument(
        "--captions_file", help='jsonl lines {"file_name": ..., "text": ...}, e.g. from a captioner'
    )
    text.add_argument(
        "--mask_names",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replace real names by pseudonyms",
    )
    text.add_argument("--pseudonym_seed", type=int, default=0)

    output = build.add_argument_group("output")
    output.add_argument("--output_dir", required=True)
    output.add_argument("--image_format", choices=("copy", "png"), default="copy")
    output.add_argument(
        "--resolution", type=int, help="re-encode as PNG with the shorter side resized to this"
    )
    output.add_argument("--overwrite", action="store_true")
    output.add_argument("--push_to_hub", metavar="REPO_ID", help="upload as a private Hub dataset")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m pogdiff.longtail") -> None:
    args = vars(_build_parser(prog).parse_args(argv))
    args.pop("command")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = build_longtail_dataset(args.pop("output_dir"), **args)
    print(format_summary(summary))


if __name__ == "__main__":
    report_user_errors("python -m pogdiff.longtail", main)
