"""kohya-style folders: captions in files beside the images, identities and repeats from sub-folder names.

Read by the trainer's loader (`load_image_text_dataset(train_data_dir=..., caption_extension=".txt")`) and by
the long-tail builder (`python -m pogdiff.data build --image_dir ... --caption_extension .txt`).
"""

import json
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pogdiff.data import (
    dataset_fingerprint,
    identity_labels,
    load_image_text_dataset,
    parse_kohya_folder,
    resolve_columns,
    row_image_loader,
)
from pogdiff.errors import UserError
from pogdiff.longtail import build_longtail_dataset
from pogdiff.longtail import main as longtail_main
from pogdiff.testing import run_process_group

REPO = Path(__file__).resolve().parents[1]

# relative image path -> (caption file content, colour)
KOHYA_FILES = {
    "10_alice/a1.png": ("  alice at the beach\n", (200, 10, 10)),
    "10_alice/a2.png": ("alice, smiling", (210, 20, 10)),
    "bob/b1.png": ("", (10, 10, 200)),  # an empty caption file: an empty caption
    "bob/sub/b2.png": ("bob in a hat\n\n", (10, 20, 210)),  # identity from the first sub-folder
}


def _write(root: Path, files: dict, caption_extension: str = ".txt") -> Path:
    for key, (caption, colour) in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), colour).save(path)
        if caption is not None:
            path.with_suffix(caption_extension).write_text(caption, encoding="utf-8")
    return root


@pytest.fixture()
def kohya_dir(tmp_path) -> Path:
    return _write(tmp_path / "kohya", KOHYA_FILES)


def test_folder_rows_texts_identities_and_repeats(kohya_dir):
    # Hidden files and folders, and files that are neither images nor captions, are skipped.
    (kohya_dir / ".cache").mkdir()
    (kohya_dir / ".cache" / "x.txt").write_text("stray")
    (kohya_dir / "bob" / ".notes.txt").write_text("stray")
    (kohya_dir / "bob" / "b1.npz").write_bytes(b"latents")
    dataset = load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    assert dataset.column_names == ["image", "text", "identity", "num_repeats"]
    assert resolve_columns(dataset.column_names, None, None) == ("image", "text", "identity")
    rows = dataset.with_format(None)
    assert rows["text"][:] == ["alice at the beach", "alice, smiling", "", "bob in a hat"]
    assert rows["identity"][:] == ["alice", "alice", "bob", "bob"]
    assert rows["num_repeats"][:] == [10, 10, 1, 1]
    assert identity_labels(dataset, "identity", "text") == ["alice", "alice", "bob", "bob"]
    # The image column holds the files' paths, in sorted relative-path order, and decodes to their pixels.
    import datasets

    paths = [v["path"] for v in dataset.cast_column("image", datasets.Image(decode=False))["image"][:]]
    assert paths == [str(kohya_dir / key) for key in KOHYA_FILES]
    load = row_image_loader(dataset, "image")
    for i, (_, colour) in enumerate(KOHYA_FILES.values()):
        assert np.array_equal(np.asarray(load(i)), np.full((8, 8, 3), colour, np.uint8))
    assert dataset[0]["image"].size == (8, 8)


def test_caption_extension_with_or_without_the_dot(kohya_dir):
    with_dot = load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    without = load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension="txt")
    assert with_dot.with_format(None)[:] == without.with_format(None)[:]
    assert dataset_fingerprint(with_dot) == dataset_fingerprint(without)
    # Another extension reads other files.
    other = _write(kohya_dir.parent / "other", {"x/1.png": ("from .caption", (1, 2, 3))}, ".caption")
    (other / "x" / "2.png").write_bytes((other / "x" / "1.png").read_bytes())
    (other / "x" / "2.caption").write_text("second")
    loaded = load_image_text_dataset(train_data_dir=str(other), caption_extension="caption")
    assert loaded["text"][:] == ["from .caption", "second"]
    assert parse_kohya_folder("10_alice") == ("alice", 10)
    assert parse_kohya_folder("bob") == ("bob", 1)
    assert parse_kohya_folder("3_mary_ann") == ("mary_ann", 3)
    assert parse_kohya_folder("_x") == ("_x", 1)


def test_fingerprint_is_stable_and_follows_the_files(kohya_dir):
    first = dataset_fingerprint(
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    )
    again = dataset_fingerprint(
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    )
    assert first == again
    image = kohya_dir / "bob" / "b1.png"
    Image.new("RGB", (8, 8), (0, 0, 0)).save(image)
    os.utime(image, ns=(1_000_000_000, 1_000_000_000))  # a rewrite shows in the modification time
    rewritten = dataset_fingerprint(
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    )
    assert rewritten != first
    (kohya_dir / "bob" / "b1.txt").write_text("now with a caption")
    recaptioned = dataset_fingerprint(
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    )
    assert recaptioned not in (first, rewritten)


def test_images_all_in_the_root_give_no_identity_column(tmp_path):
    root = _write(tmp_path / "flat", {"b.png": ("second", (1, 1, 1)), "a.png": ("first", (2, 2, 2))})
    dataset = load_image_text_dataset(train_data_dir=str(root), caption_extension=".txt")
    assert dataset.column_names == ["image", "text", "num_repeats"]
    assert dataset["text"][:] == ["first", "second"]
    assert resolve_columns(dataset.column_names, None, None) == ("image", "text", None)


def test_an_image_without_its_caption_file_is_named(kohya_dir):
    (kohya_dir / "bob" / "sub" / "b2.txt").unlink()
    expected = kohya_dir / "bob" / "sub" / "b2.txt"
    with pytest.raises(UserError) as error:
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    assert str(error.value) == (
        f"Image {kohya_dir / 'bob' / 'sub' / 'b2.png'} has no caption file: expected {expected} "
        "(--caption_extension .txt). Write its caption there (an empty file means an empty caption) or remove "
        "the image."
    )


def test_a_caption_file_without_an_image_is_named(kohya_dir):
    orphan = kohya_dir / "10_alice" / "a3.txt"
    orphan.write_text("no picture")
    with pytest.raises(UserError, match=rf"^Caption file {re.escape(str(orphan))} has no image beside it"):
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension="txt")


def test_metadata_and_caption_files_together_are_ambiguous(kohya_dir):
    metadata = kohya_dir / "metadata.jsonl"
    metadata.write_text(json.dumps({"file_name": "bob/b1.png", "text": "x"}) + "\n")
    with pytest.raises(UserError) as error:
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    assert str(error.value) == (
        f"{metadata} is imagefolder metadata, but --caption_extension .txt asks for captions in .txt files "
        "beside the images: drop --caption_extension to use metadata.jsonl, or remove metadata.jsonl to use the "
        ".txt files."
    )


def test_other_folder_errors(kohya_dir, tmp_path):
    # Images both in the root and in sub-folders: which identity would the root ones have?
    _write(kohya_dir, {"loose.png": ("loose", (0, 0, 0))})
    with pytest.raises(
        UserError, match=rf"^Image {re.escape(str(kohya_dir / 'loose.png'))} lies directly in"
    ):
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    (kohya_dir / "loose.png").unlink()
    (kohya_dir / "loose.txt").unlink()
    # Two images, one caption file.
    (kohya_dir / "bob" / "b1.jpg").write_bytes((kohya_dir / "bob" / "b1.png").read_bytes())
    with pytest.raises(UserError, match=r"would all take their caption from .*b1\.txt"):
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    (kohya_dir / "bob" / "b1.jpg").unlink()
    # Zero repeats, and a caption extension given for a Hub dataset.
    _write(kohya_dir, {"0_carl/c.png": ("carl", (0, 0, 0))})
    with pytest.raises(UserError, match=r"Folder '0_carl' asks for 0 repeats"):
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    with pytest.raises(UserError, match=r"pass the folder as --train_data_dir"):
        load_image_text_dataset(dataset_name="someone/faces", caption_extension=".txt")
    with pytest.raises(UserError, match=r"is an image extension"):
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension="png")
    (kohya_dir / "0_carl").rename(kohya_dir / "carl")
    (kohya_dir / "carl" / "c.txt").write_bytes(b"caf\xe9")
    with pytest.raises(
        UserError, match=rf"^Caption file {re.escape(str(kohya_dir / 'carl' / 'c.txt'))} is not UTF-8"
    ):
        load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^No images found in"):
        load_image_text_dataset(train_data_dir=str(tmp_path / "empty"), caption_extension=".txt")


def test_an_unreadable_image_is_reported_by_path(kohya_dir):
    broken = kohya_dir / "bob" / "b1.png"
    broken.write_bytes(b"not a png")
    dataset = load_image_text_dataset(train_data_dir=str(kohya_dir), caption_extension=".txt")
    with pytest.raises(UserError, match=re.escape(f"{broken} (row 2 of the training set)")):
        row_image_loader(dataset, "image")(2)


def _read_metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _faces(root: Path) -> Path:
    """kohya folders: 3_AnnaBell (4 images), ben (3), cleo (2); each caption names the person."""
    files = {}
    for k, (folder, name, n) in enumerate(
        [("3_AnnaBell", "Anna Bell", 4), ("ben", "Ben", 3), ("cleo", "Cleo", 2)]
    ):
        for i in range(n):
            files[f"{folder}/{i}.png"] = (f"{name} photo {i}\n", (60 * k, 20 * i, 0))
    return _write(root, files)


def test_builder_takes_captions_from_sidecar_files(tmp_path, caplog):
    root = _faces(tmp_path / "faces")
    out = tmp_path / "out"
    options = dict(majority_ids=1, majority_images=3, minority_ids=2, minority_images=2, show_progress=False)
    with caplog.at_level(logging.WARNING, logger="pogdiff.longtail"):
        summary = build_longtail_dataset(
            str(out), image_dir=str(root), caption_extension="txt", mask_names=False, **options
        )
    assert "['3_AnnaBell'] carry kohya's repeats prefix" in caplog.text
    assert summary["train_counts"] == {"Anna Bell": 3, "ben": 2, "cleo": 2}
    rows = _read_metadata(out)
    sources = json.loads((out / "sources.json").read_text())
    for row in rows:
        source = Path(sources[row["file_name"]])
        assert row["text"] == source.with_suffix(".txt").read_text().strip()
    assert sorted(r["text"] for r in rows if r["split"] == "train" and r["identity"] == "cleo") == [
        "Cleo photo 0",
        "Cleo photo 1",
    ]

    # Masked: the sidecar captions get the pseudonyms too.
    masked = build_longtail_dataset(
        str(tmp_path / "masked"), image_dir=str(root), caption_extension=".txt", **options
    )
    names = json.loads((tmp_path / "masked" / "names.json").read_text())
    assert sorted(names.values()) == ["AnnaBell", "ben", "cleo"]
    pseudonym = {real: pseudo for pseudo, real in names.items()}
    for row in _read_metadata(tmp_path / "masked"):
        assert re.fullmatch(rf"{re.escape(row['identity'])} photo \d", row["text"]), row
    assert masked["train_counts"][pseudonym["AnnaBell"]] == 3

    with pytest.raises(UserError, match="two sources of captions"):
        build_longtail_dataset(
            str(tmp_path / "x"),
            image_dir=str(root),
            caption_extension=".txt",
            captions_file="c.jsonl",
            **options,
        )
    (root / "ben" / "0.txt").unlink()
    with pytest.raises(
        UserError, match=rf"^Image {re.escape(str(root / 'ben' / '0.png'))} has no caption file"
    ):
        build_longtail_dataset(str(tmp_path / "y"), image_dir=str(root), caption_extension=".txt", **options)


def test_cli_help_under_both_module_names(capsys):
    # `python -m pogdiff.data build` (the documented name; a UserError through it is in test_user_errors.py).
    done = run_process_group(
        [sys.executable, "-m", "pogdiff.data", "build", "--help"], timeout=120, cwd=str(REPO)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m pogdiff.data build ")
    assert "--caption_extension" in done.stdout
    # The same parser under its own module name (`python -m pogdiff.longtail build`).
    with pytest.raises(SystemExit) as exit_:
        longtail_main(["build", "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m pogdiff.longtail build ")
