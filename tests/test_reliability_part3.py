"""Nothing lost, nothing silent, part 3 (issue 27, the rest): a run is identified by its data's and base
model's content, not by paths; an output folder holds one result, saved whole or not at all; a full disk is
said as such; the last user mistakes that gave tracebacks are one line.

Unit tests and in-process runs on the tiny model; no accelerate launch.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from test_index import MeanColour, _build
from test_index import rows as rows  # noqa: F401 (the fixture)

from pogdiff import checkpointing
from pogdiff.checkpointing import (
    base_model_fingerprint,
    claim_output_dir_for_new_run,
    save_checkpoint,
    save_result_atomically,
)
from pogdiff.data import dataset_fingerprint, load_image_text_dataset
from pogdiff.errors import UserError


def error_line(capsys) -> str:
    """The `error:` line of stderr; there must be no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if " error: " in line)


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


# ---- item 4b: the base model is identified by content; a rewritten base is caught on resume and in the index --


def copy_model(tiny_sd_path: str, tmp_path: Path) -> Path:
    model = tmp_path / "base"
    shutil.copytree(tiny_sd_path, model)
    return model


def rewrite_text_encoder(model: Path) -> None:
    """Save another text encoder into the base in place (same config, other weights), as a user might."""
    import torch
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(model / "text_encoder")
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.01)
    encoder.save_pretrained(model / "text_encoder")


def test_base_model_fingerprint_is_by_content_for_a_folder(tiny_sd_path, tmp_path, monkeypatch):
    model = copy_model(tiny_sd_path, tmp_path)
    first = base_model_fingerprint(str(model))
    assert first.startswith("folder-sha256:")
    monkeypatch.chdir(tmp_path)
    assert base_model_fingerprint("base") == base_model_fingerprint("./base/") == first
    (model / "checkpoint-3").mkdir()  # a training output's checkpoints beside the model are not the model
    (model / "checkpoint-3" / "x.bin").write_bytes(b"x")
    assert base_model_fingerprint("base") == first
    rewrite_text_encoder(model)
    rewritten = base_model_fingerprint("base")
    assert rewritten != first
    # Weights over the size limit count by size and modification time: a rewrite (new mtime) is caught.
    monkeypatch.setattr(checkpointing, "FULLY_HASHED_MODEL_FILE_BYTES", 1024)
    by_stat = base_model_fingerprint("base")
    weights = next((model / "unet").glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))
    assert base_model_fingerprint("base") not in (by_stat, rewritten)


def test_base_model_fingerprint_of_a_hub_id_is_its_cached_commit(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert base_model_fingerprint("org/model") == "hub:org/model@main"  # not in the cache
    assert base_model_fingerprint("org/model", "v2") == "hub:org/model@v2"
    commit = "a" * 40
    repo = tmp_path / "models--org--model"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert base_model_fingerprint("org/model") == f"hub:org/model@{commit}"
    assert base_model_fingerprint("not a repo id!") == "hub:not a repo id!@main"


def test_a_base_rewritten_in_place_rebuilds_the_index(rows, tiny_sd_path, tmp_path, caplog):  # noqa: F811
    model = copy_model(tiny_sd_path, tmp_path)
    first, _ = _build(rows, str(model), tmp_path / "cache", MeanColour())
    rewrite_text_encoder(model)
    encoder = MeanColour()
    with caplog.at_level(logging.INFO, logger="pogdiff.index"):
        again, _ = _build(rows, str(model), tmp_path / "cache", encoder)
    assert "cache miss" in caplog.text and "cache hit" not in caplog.text
    assert again.config["key"] != first.config["key"]


def test_resuming_on_a_base_rewritten_in_place_is_refused_naming_the_base(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    from test_train import run_in_process, train_args

    model = copy_model(tiny_sd_path, tmp_path)
    out = tmp_path / "out"
    common = ("--objective", "vanilla", "--checkpointing_steps", "1")
    run_in_process(train_args(str(model), tiny_dataset_path, out, *common, steps=1))
    record = json.loads((out / "checkpoint-1" / "pogdiff_run.json").read_text())
    assert record["settings"]["base_model_fingerprint"] == base_model_fingerprint(str(model))
    rewrite_text_encoder(model)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_in_process(
            train_args(str(model), tiny_dataset_path, out, *common, "--resume_from_checkpoint", "latest")
        )
    assert info.value.code == 2
    line = error_line(capsys)
    assert f"the base model --pretrained_model_name_or_path {model} (rewritten in place" in line
    assert "--allow_changed_settings" in line


# ---- item 4c and 9b: an output folder holds one result, saved whole or not at all -----------------------------


def fake_full_result(folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "unet": ["d", "U"], "vae": ["d", "V"]})
    )
    for part in ("unet", "vae"):
        (folder / part).mkdir()
        (folder / part / "config.json").write_text("{}")


def save_fake_lora(folder: str) -> None:
    Path(folder, "pytorch_lora_weights.safetensors").write_bytes(b"lora")


def test_a_lora_result_replaces_a_full_one_saying_so(tmp_path, caplog):
    from accelerate.state import PartialState

    PartialState()
    out = tmp_path / "out"
    fake_full_result(out)
    (out / "logs").mkdir()
    (out / "README.md").write_text("card")
    caplog.set_level(logging.WARNING)
    removed = save_result_atomically(save_fake_lora, str(out))
    assert removed == ["model_index.json", "unet", "vae"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "logs", "pytorch_lora_weights.safetensors"]
    assert "removed the previous result's model_index.json, unet, vae" in caplog.text
    # And back: a full pipeline replaces the LoRA weights.
    assert save_result_atomically(fake_full_result, str(out)) == ["pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "logs", "model_index.json", "unet", "vae"]


def test_a_failed_final_save_leaves_no_half_model_and_says_the_disk_is_full(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sample_counts.json").write_text("{}")

    def save_until_the_disk_is_full(folder: str) -> None:
        Path(folder, "unet").mkdir()
        Path(folder, "unet", "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError) as info:
        save_result_atomically(save_until_the_disk_is_full, str(out))
    message = str(info.value)
    assert message.startswith(f"The disk is full: no space left while saving the trained model to {out} (")
    assert "\n" not in message
    assert sorted(p.name for p in out.iterdir()) == ["sample_counts.json"]  # no unet/config.json alone


def test_overwrite_output_dir_removes_the_previous_result_saying_so(tmp_path, caplog):
    from accelerate.state import PartialState

    PartialState()
    out = tmp_path / "out"
    fake_full_result(out)
    save_fake_lora(str(out))
    (out / "notes.txt").write_text("mine")
    caplog.set_level(logging.WARNING)
    claim_output_dir_for_new_run(
        str(out), overwrite=False, is_main_process=True
    )  # no checkpoints: no consent needed
    assert (out / "model_index.json").is_file()
    claim_output_dir_for_new_run(str(out), overwrite=True, is_main_process=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert "--overwrite_output_dir: removed the previous result" in caplog.text
    assert "model_index.json, unet, vae, pytorch_lora_weights.safetensors" in caplog.text


def test_a_lora_run_after_a_full_run_in_one_folder_loads_as_the_lora(
    tiny_sd_path, tiny_dataset_path, tmp_path
):
    from test_train import run_in_process, train_args

    from pipeline_pogdiff import PoGDiffPipeline

    out = tmp_path / "out"
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", steps=1))
    assert (out / "unet" / "config.json").is_file()
    run_in_process(
        train_args(tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", "--use_lora", steps=1)
    )
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    pipe = PoGDiffPipeline.from_pretrained(str(out))
    assert "default_0" in getattr(pipe.unet, "peft_config", {}) or pipe.get_list_adapters()


# ---- item 9a: a full disk while saving a checkpoint or the index says so and names the folder ------------------


class FullDiskAccelerator:
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, folder: str) -> None:
        os.makedirs(folder)
        Path(folder, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_checkpoint_save_is_one_line_naming_the_folder(tmp_path):
    fake_checkpoints = tmp_path / "checkpoint-1"
    fake_checkpoints.mkdir()
    with pytest.raises(UserError) as info:
        save_checkpoint(FullDiskAccelerator(), str(tmp_path), 2, {}, total_limit=1)
    assert str(info.value).startswith(
        f"The disk is full: no space left while saving checkpoint checkpoint-2 to {tmp_path}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # the older one kept, no leftover


def test_a_full_disk_during_the_index_save_is_one_line_naming_the_folder(
    rows, tiny_sd_path, tmp_path, monkeypatch
):  # noqa: F811
    from pogdiff.index import PoGDiffIndex

    def full(self, folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PoGDiffIndex, "save", full)
    with pytest.raises(
        UserError,
        match=f"The disk is full: no space left while saving the PoGDiff index to {tmp_path / 'cache'}",
    ):
        _build(rows, tiny_sd_path, tmp_path / "cache", MeanColour())


# ---- item 9c-f: the last user mistakes that gave tracebacks ---------------------------------------------------


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (
            ["--device", "cuda"],
            "--device cuda: this machine has no CUDA GPU that torch can use; pass --device cpu.",
        ),
        (["--device", "gpu0"], "--device 'gpu0' is not a torch device"),
    ],
)
def test_index_cli_batch_size_and_device_are_checked(
    flags, expected, tiny_sd_path, tmp_path, capsys, monkeypatch
):
    import torch

    from pogdiff import index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd_path,
        "--train_data_dir",
        "d",
        "--output_dir",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as info:
        index.parse_args([*argv, "--resolution", "32", *flags])
    assert info.value.code == 2
    assert expected in error_line(capsys)


def test_a_caption_column_mixing_strings_and_numbers_is_one_line(tiny_dataset_path, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[1]["text"] = 123
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(UserError) as info:
        load_image_text_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"The metadata of {str(folder)!r} cannot be read as a table: JSON parse error")
    assert "changed from string to number" in message


@pytest.mark.parametrize("spec", ["nonexistent_module:fn", "os:sep"])
def test_an_unloadable_neighbor_encoder_names_the_flag(spec):
    from pogdiff.features import get_feature_extractor

    with pytest.raises(UserError) as info:
        get_feature_extractor(spec, flag="--neighbor_encoder")
    assert str(info.value).startswith(f"--neighbor_encoder {spec!r}")


def test_a_checkpoint_with_an_older_path_based_data_fingerprint_still_resumes():
    from pogdiff.checkpointing import settings_differences

    saved = {"data_fingerprint": "0123456789abcdef", "--seed": 0}
    assert settings_differences(saved, {"data_fingerprint": "f" * 64, "--seed": 0}) == []
    assert settings_differences(
        {**saved, "data_fingerprint": "e" * 64}, {"data_fingerprint": "f" * 64, "--seed": 0}
    ) == ["data_fingerprint"]
