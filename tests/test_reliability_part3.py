"""Nothing lost, nothing silent, part 3 (issue 27, the rest): a run is identified by its data's and base
model's content, not by paths; an output folder holds one result, saved whole or not at all; a full disk is
said as such; the last user mistakes that gave tracebacks are one line.

Unit tests and in-process runs on the tiny model; no accelerate launch.
"""

from __future__ import annotations

import os
import shutil

from pogdiff.data import dataset_fingerprint, load_image_text_dataset

# ---- item 4a: the data fingerprint is the content's, not the path's -----------------------------------------


def test_the_same_folder_by_relative_and_absolute_path_from_any_cwd_has_one_fingerprint(
    tiny_dataset_path, tmp_path, monkeypatch
):
    folder = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, folder)
    absolute = dataset_fingerprint(load_image_text_dataset(train_data_dir=str(folder)))
    monkeypatch.chdir(tmp_path)
    relative = dataset_fingerprint(load_image_text_dataset(train_data_dir="data"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    dotted = dataset_fingerprint(load_image_text_dataset(train_data_dir="../data"))
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)  # a copy (new modification times) is the same data
    copied = dataset_fingerprint(load_image_text_dataset(train_data_dir=str(moved)))
    assert absolute == relative == dotted == copied


def test_the_fingerprint_follows_image_and_caption_content(tiny_dataset_path, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, folder)
    first = dataset_fingerprint(load_image_text_dataset(train_data_dir=str(folder)))
    image = sorted(folder.glob("*.png"))[0]
    stat = image.stat()
    data = bytearray(image.read_bytes())
    data[-5] ^= 0xFF  # same size, same modification time, other content
    image.write_bytes(bytes(data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = dataset_fingerprint(load_image_text_dataset(train_data_dir=str(folder)))
    assert changed != first
    metadata = folder / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace('"text": "', '"text": "a ', 1))
    recaptioned = dataset_fingerprint(load_image_text_dataset(train_data_dir=str(folder)))
    assert recaptioned not in (first, changed)
    subset = load_image_text_dataset(train_data_dir=str(folder)).select(range(3))
    assert dataset_fingerprint(subset) != recaptioned


def test_the_trainer_resumes_with_the_data_given_by_another_path(
    tiny_sd_path, tiny_dataset_path, tmp_path, monkeypatch
):
    from test_train import run_in_process, train_args

    folder = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, folder)
    out = tmp_path / "out"
    common = ("--objective", "vanilla", "--checkpointing_steps", "1")
    run_in_process(train_args(tiny_sd_path, str(folder), out, *common, steps=1))
    monkeypatch.chdir(tmp_path)
    run_in_process(train_args(tiny_sd_path, "data", out, *common, "--resume_from_checkpoint", "latest"))
    assert (out / "checkpoint-2").is_dir()
