"""Nothing lost, nothing silent, part 2 (issue 27): one run per output folder, explicit resumes of an older
checkpoint, a declared range for every numeric flag, one line under `accelerate launch`, data read faithfully.

Most checks are unit or parse-time tests; the few training runs are in-process on the tiny model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_index import MeanColour, _assert_tensors_equal, _build
from test_index import rows as rows  # noqa: F401 (the fixture)
from test_train import run_in_process, train_args, train_pogdiff_parser_actions

from pogdiff.checkpointing import (
    checkpoint_dirs,
    claim_output_dir_for_new_run,
    set_aside_newer_checkpoints,
)
from pogdiff.errors import UserError
from pogdiff.testing import run_process_group

REPO = Path(__file__).resolve().parent.parent


def error_line(capsys) -> str:
    """The `error:` line of stderr; there must be no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if " error: " in line)


def parse(*flags: str):
    import train_pogdiff

    return train_pogdiff.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *flags])


def fake_checkpoints(folder: Path, *steps: int, objective: str = "vanilla", seed: int = 0) -> None:
    for step in steps:
        ckpt = folder / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        record = {"global_step": step, "settings": {"--objective": objective, "--seed": seed}, "files": {}}
        (ckpt / "pogdiff_run.json").write_text(json.dumps(record))


# ---- items 1 and 2: a new run never mixes with another run's checkpoints; an older resume loses nothing ------


def test_a_new_run_in_a_folder_with_checkpoints_is_refused_naming_the_run(tmp_path):
    fake_checkpoints(tmp_path, 2, 4, objective="cbdm", seed=7)
    with pytest.raises(UserError) as info:
        claim_output_dir_for_new_run(str(tmp_path), overwrite=False, is_main_process=True)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"--output_dir {str(tmp_path)!r} holds the checkpoints of another run")
    assert (
        "checkpoint-2, checkpoint-4; the newest is step 4 of an --objective cbdm run with --seed 7" in message
    )
    for choice in ("--resume_from_checkpoint latest", "--overwrite_output_dir", "another --output_dir"):
        assert choice in message
    assert checkpoint_dirs(str(tmp_path)) == ["checkpoint-2", "checkpoint-4"]  # nothing touched


def test_a_new_run_with_an_unreadable_record_is_still_refused(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "pogdiff_run.json").write_text("{not json")
    with pytest.raises(UserError, match="the newest, checkpoint-3, has no readable pogdiff_run.json"):
        claim_output_dir_for_new_run(str(tmp_path), overwrite=False, is_main_process=True)


def test_overwrite_output_dir_removes_the_other_runs_checkpoints_saying_so(tmp_path, caplog):
    from accelerate.state import PartialState

    PartialState()  # accelerate's logger needs a state, as in the trainer
    fake_checkpoints(tmp_path, 1, 2)
    (tmp_path / "superseded-checkpoint-9").mkdir()  # not a checkpoint of rotation: left alone
    caplog.set_level(logging.WARNING)
    claim_output_dir_for_new_run(str(tmp_path), overwrite=True, is_main_process=True)
    assert checkpoint_dirs(str(tmp_path)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["superseded-checkpoint-9"]
    assert any("--overwrite_output_dir" in r.getMessage() and "checkpoint-1, checkpoint-2" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    # An empty (or new) folder needs no consent.
    claim_output_dir_for_new_run(str(tmp_path / "new"), overwrite=False, is_main_process=True)


def test_overwrite_output_dir_and_resume_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        parse("--overwrite_output_dir", "--resume_from_checkpoint", "latest")
    assert info.value.code == 2
    assert "give one of them" in error_line(capsys)


def test_resuming_an_older_checkpoint_sets_newer_ones_aside(tmp_path):
    fake_checkpoints(tmp_path, 1, 2, 3, 4)
    (tmp_path / "superseded-checkpoint-4").mkdir()  # an earlier set-aside is never overwritten
    moved = set_aside_newer_checkpoints(str(tmp_path), str(tmp_path / "checkpoint-2"))
    assert moved == [
        ("checkpoint-3", "superseded-checkpoint-3"),
        ("checkpoint-4", "superseded-checkpoint-4.2"),
    ]
    assert checkpoint_dirs(str(tmp_path)) == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "superseded-checkpoint-4.2" / "pogdiff_run.json").is_file()


@pytest.fixture(scope="module")
def two_checkpoints(tiny_sd_path, tiny_dataset_path, tmp_path_factory) -> Path:
    """Two vanilla steps, a checkpoint after each (copied before use)."""
    out = tmp_path_factory.mktemp("run") / "out"
    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", "--checkpointing_steps", "1"
        )
    )
    return out


def test_trainer_refuses_a_new_run_over_another_runs_checkpoints(
    two_checkpoints, tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SystemExit) as info:
        run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out, "--objective", "pogdiff"))
    assert info.value.code == 2
    line = error_line(capsys)
    assert line.startswith(
        f"train_pogdiff.py: error: --output_dir {str(out)!r} holds the checkpoints of another"
    )
    assert "the newest is step 2 of an --objective vanilla run with --seed 0" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_trainer_resuming_an_older_checkpoint_keeps_the_newer_one(
    two_checkpoints, tiny_sd_path, tiny_dataset_path, tmp_path, caplog
):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    newer = (out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    caplog.set_level(logging.INFO)
    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "checkpoint-1", "--noise_offset", "0.1",
            "--allow_changed_settings", steps=2,
        )
    )  # fmt: skip
    # Today: checkpoint-2 of the first course was replaced by this run's and the rotation went on silently.
    kept = out / "superseded-checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors"
    assert kept.read_bytes() == newer
    assert checkpoint_dirs(str(out)) == ["checkpoint-2"]  # this run's step 2; checkpoint-1 rotated out
    assert (out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != newer
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint-2 is kept as" in m and "superseded-checkpoint-2" in m for m in warnings), warnings


# ---- items 5 and 8: every numeric flag has a declared range, checked at parse time ----------------------------


def test_every_numeric_flag_has_a_declared_range():
    from pogdiff.arguments import FLAG_RANGES, _float_or_none

    actions = train_pogdiff_parser_actions()
    numeric = {a.dest for a in actions if a.type in (int, float, _float_or_none)}
    assert numeric - FLAG_RANGES.keys() == set(), "declare a range in pogdiff.arguments.FLAG_RANGES"
    assert FLAG_RANGES.keys() - {a.dest for a in actions} == set(), "a range for a flag that does not exist"


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--max_grad_norm", "-1", "--max_grad_norm must be > 0, got -1.0"),
        ("--max_grad_norm", "0", "--max_grad_norm must be > 0, got 0.0"),
        ("--snr_gamma", "-1", "--snr_gamma must be > 0, got -1.0"),
        ("--snr_gamma", "0", "--snr_gamma must be > 0, got 0.0"),
        ("--lora_alpha", "0", "--lora_alpha must be > 0, got 0"),
        ("--max_train_steps", "0", "--max_train_steps must be >= 1, got 0"),
        ("--max_train_steps", "-1", "--max_train_steps must be >= 1, got -1"),
        ("--max_train_samples", "0", "--max_train_samples must be >= 1, got 0"),
        ("--max_train_samples", "-1", "--max_train_samples must be >= 1, got -1"),
        ("--few_shot_max", "-1", "--few_shot_max must be >= 0, got -1"),
        ("--learning_rate", "-1e-4", "--learning_rate must be >= 0, got -0.0001"),
        ("--adam_beta1", "1.5", "--adam_beta1 must be in [0, 1), got 1.5"),
        ("--adam_beta2", "1", "--adam_beta2 must be in [0, 1), got 1.0"),
        ("--adam_epsilon", "-1e-8", "--adam_epsilon must be > 0, got -1e-08"),
        ("--adam_weight_decay", "-0.01", "--adam_weight_decay must be >= 0, got -0.01"),
        ("--train_batch_size", "0", "--train_batch_size must be >= 1, got 0"),
        ("--train_batch_size", "-1", "--train_batch_size must be >= 1, got -1"),
        ("--gradient_accumulation_steps", "0", "--gradient_accumulation_steps must be >= 1, got 0"),
        ("--rank", "0", "--rank must be >= 1, got 0"),
        ("--rank", "-1", "--rank must be >= 1, got -1"),
        ("--dataloader_num_workers", "-1", "--dataloader_num_workers must be >= 0, got -1"),
        ("--seed", "-1", "--seed must be in [0, 4294967295], got -1"),
        ("--sampling_power", "1000", "--sampling_power must be in [-10, 10], got 1000.0"),
        ("--num_train_epochs", "0", "--num_train_epochs must be >= 1, got 0"),
        ("--density_w_min", "0", "--density_w_min must be in (0, 1], got 0.0"),
    ],
)
def test_out_of_range_flags_are_one_line_at_parse_time(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as info:
        parse(f"{flag}={value}")  # "=": argparse takes "-1e-4" for an option otherwise
    assert info.value.code == 2
    line = error_line(capsys)
    assert line.split(" error: ", 1)[1].startswith(expected), line


def test_range_edges_are_accepted():
    args = parse(
        "--few_shot_max", "0", "--adam_beta1", "0", "--adam_weight_decay", "0", "--dataloader_num_workers", "0",
        "--seed", "0", "--sampling_power", "-1", "--max_train_steps", "1", "--lr_scheduler", "cosine",
        "--report_to", "all", "--lr_warmup_steps", "0",
    )  # fmt: skip
    assert args.few_shot_max == 0 and args.sampling_power == -1.0 and args.lora_alpha == args.rank


@pytest.mark.parametrize(
    "flags, expected",
    [
        (("--lr_scheduler", "cosine_annealing"), "--lr_scheduler must be one of linear, cosine,"),
        (("--report_to", ""), "--report_to must name a tracker"),
        (("--report_to", "tensorbord"), "--report_to 'tensorbord' is not a tracker accelerate knows"),
    ],
)
def test_scheduler_and_tracker_names_are_checked(flags, expected, capsys):
    with pytest.raises(SystemExit) as info:
        parse(*flags)
    assert info.value.code == 2
    assert expected in error_line(capsys)


def test_report_to_a_tracker_that_is_not_installed(capsys, monkeypatch):
    import accelerate.tracking

    # As on a machine without wandb (whether or not this one has it): accelerate would train without tracking.
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(SystemExit) as info:
        parse("--report_to", "wandb")
    assert info.value.code == 2
    assert "--report_to wandb: the wandb package is not installed" in error_line(capsys)


# ---- item 7: under `accelerate launch` the error line is the last thing the user reads ------------------------


def test_the_error_line_comes_after_the_traceback_hint():
    from pogdiff.errors import user_error_message

    lines = user_error_message("train_pogdiff.py", UserError("--flag is wrong.")).splitlines()
    assert lines[-1] == "train_pogdiff.py: error: --flag is wrong."
    assert "POGDIFF_TRACEBACK=1" in lines[-2]


@pytest.mark.e2e
def test_accelerate_launch_quiet_ends_with_the_error_line(tmp_path):
    """accelerate's simple launcher re-raises a failed child as a CalledProcessError traceback after the child's
    output unless `--quiet`, which makes it exit 1 and print nothing more (accelerate/commands/launch.py,
    `_run_subprocess`); the README's command carries `--quiet`, and the trainer prints its error line last."""
    out = tmp_path / "out"
    fake_checkpoints(out, 3, objective="pogdiff", seed=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_process_group(
        [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--cpu",
         str(REPO / "train_pogdiff.py"), "--pretrained_model_name_or_path", str(tmp_path / "no-model"),
         "--train_data_dir", str(tmp_path / "no-data"), "--output_dir", str(out)],
        cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.rstrip().splitlines()[-1]
    assert last.startswith(f"train_pogdiff.py: error: --output_dir {str(out)!r} holds the checkpoints"), last


# ---- item 6: data read faithfully ---------------------------------------------------------------------------


def copy_data(tiny_dataset_path: str, tmp_path: Path) -> tuple[Path, list[dict]]:
    folder = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return folder, rows


def test_an_image_missing_from_metadata_is_counted_and_said_once(tiny_dataset_path, tmp_path, caplog):
    from pogdiff.data import load_image_text_dataset

    folder, rows = copy_data(tiny_dataset_path, tmp_path)
    extra = folder / rows[0]["file_name"]
    shutil.copy(extra, folder / "forgotten-1.png")
    shutil.copy(extra, folder / "forgotten-2.png")
    caplog.set_level(logging.WARNING)
    dataset = load_image_text_dataset(train_data_dir=str(folder))
    assert len(dataset) == len(rows)  # imagefolder still reads the listed rows only
    about = [r.getMessage() for r in caplog.records if "not listed in its metadata.jsonl" in r.getMessage()]
    assert len(about) == 1, about
    assert about[0].startswith("2 image(s) in") and "forgotten-1.png, forgotten-2.png" in about[0]


def test_a_fully_listed_folder_gives_no_warning(tiny_dataset_path, caplog):
    from pogdiff.data import unlisted_images

    assert unlisted_images(tiny_dataset_path) == []


def test_a_null_identity_is_an_error_not_the_identity_none(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    folder, rows = copy_data(tiny_dataset_path, tmp_path)
    rows[3]["identity"] = None
    rows[7]["identity"] = None
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as info:
        run_in_process(train_args(tiny_sd_path, str(folder), tmp_path / "o"))
    assert info.value.code == 2
    line = error_line(capsys)
    assert "Row 3 of the training set has no identity: its 'identity' value is missing or null (2 of" in line


def test_a_float_tiff_with_nan_is_refused_naming_the_file(tmp_path):
    import numpy as np
    from PIL import Image

    from pogdiff.data import load_rgb

    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    good, bad = tmp_path / "good.tif", tmp_path / "nan.tif"
    Image.fromarray(values, mode="F").save(good)
    values[2, 3] = np.nan
    Image.fromarray(values, mode="F").save(bad)
    assert np.asarray(load_rgb(str(good))).max() == 255
    with pytest.raises(UserError) as info:
        load_rgb(str(bad))
    assert str(info.value).startswith(
        f"Cannot decode image {bad}: 1 of 64 pixels of this float image are NaN"
    )


# ---- item 3: checkpoint content is verified, not only its size ------------------------------------------------


def same_size_garbage(path: Path, offset: int | None = None) -> None:
    """Overwrite 64 bytes in the middle of `path` (a bad sector, a stray write): the size stays the same."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if offset is None else offset
    data[start : start + 64] = bytes((b + 1) % 256 for b in data[start : start + 64])
    path.write_bytes(bytes(data))


def test_the_run_record_holds_a_hash_per_file_and_checkpoint_problem_checks_it(tmp_path):
    from pogdiff.checkpointing import checkpoint_problem, file_sha256, write_run_record

    folder = tmp_path / "checkpoint-3"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text('{"sample_size": 8}')
    (folder / "scheduler.txt").write_bytes(bytes(range(256)) * 4)
    write_run_record(str(folder), 3, {"--seed": 0})
    record = json.loads((folder / "pogdiff_run.json").read_text())
    assert record["sha256"] == {
        "scheduler.txt": file_sha256(str(folder / "scheduler.txt")),
        "unet/config.json": file_sha256(str(folder / "unet" / "config.json")),
    }
    assert checkpoint_problem(str(folder)) is None
    (folder / "unet" / "config.json").write_text('{"sample_size": 9}')  # same size, other content
    problem = checkpoint_problem(str(folder))
    assert problem is not None and problem.startswith(f"{folder / 'unet' / 'config.json'} does not match the")


def test_a_run_record_without_settings_is_a_damaged_checkpoint(tmp_path):
    from pogdiff.checkpointing import checkpoint_problem

    (tmp_path / "pogdiff_run.json").write_text("{}")
    assert "is not a run record train_pogdiff.py wrote" in checkpoint_problem(str(tmp_path))


def test_latest_falls_back_past_same_size_corruption_naming_the_file(
    two_checkpoints, tiny_sd_path, tiny_dataset_path, tmp_path, caplog
):
    out = tmp_path / "out"
    shutil.copytree(two_checkpoints, out)
    same_size_garbage(out / "checkpoint-2" / "optimizer.bin")
    caplog.set_level(logging.INFO)
    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, out, "--objective", "vanilla", "--checkpointing_steps", "1",
            "--resume_from_checkpoint", "latest",
        )
    )  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "checkpoint-2" in m
        and "optimizer.bin does not match the SHA-256" in m
        and "Resuming from checkpoint-1" in m
        for m in warnings
    ), warnings
    assert any(f"Resuming from checkpoint {out / 'checkpoint-1'}" in r.getMessage() for r in caplog.records)
    # Step 2 was trained again from checkpoint-1, so checkpoint-2 is whole again.
    from pogdiff.checkpointing import checkpoint_problem

    assert checkpoint_problem(str(out / "checkpoint-2")) is None


def test_a_same_size_damaged_index_cache_is_rebuilt_not_a_cache_hit(rows, tiny_sd_path, tmp_path, caplog):
    first, _ = _build(rows, tiny_sd_path, tmp_path, MeanColour())
    tensors = tmp_path / f"pogdiff-index-{first.config['key'][:16]}" / "index.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-64:] = bytes(64)  # 64 zero bytes at the end of the tensor data: still a readable safetensors file
    tensors.write_bytes(bytes(data))
    encoder = MeanColour()
    with caplog.at_level(logging.WARNING, logger="pogdiff.index"):
        again, _ = _build(rows, tiny_sd_path, tmp_path, encoder)
    assert "does not match the SHA-256" in caplog.text and "rebuilding it" in caplog.text
    assert encoder.calls > 0
    _assert_tensors_equal(first, again)


# ---- item 10: an error raised in a DataLoader worker is still one line -----------------------------------------


def test_an_error_from_a_dataloader_worker_is_one_line_without_the_worker_traceback():
    from torch._utils import ExceptionWrapper

    from pogdiff.errors import user_error_message

    try:
        try:
            raise OSError("cannot identify image file")
        except OSError as cause:
            raise UserError("Cannot decode image bad.png (row 3 of the training set): broken.") from cause
    except UserError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 1")  # what a worker sends back
    with pytest.raises(UserError) as info:
        wrapped.reraise()
    assert "Traceback" in str(info.value)  # how torch rebuilds it in the main process
    message = user_error_message("train_pogdiff.py", info.value)
    assert "Traceback" not in message and "OSError" not in message
    assert message.splitlines()[-1] == (
        "train_pogdiff.py: error: Cannot decode image bad.png (row 3 of the training set): broken. "
        "(in DataLoader worker process 1)"
    )


# ---- item 8, the rest: LoRA target modules, kohya repeats ------------------------------------------------------


def test_lora_target_modules_that_match_nothing_name_the_flag(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    with pytest.raises(SystemExit) as info:
        run_in_process(
            train_args(
                tiny_sd_path,
                tiny_dataset_path,
                tmp_path / "o",
                "--use_lora",
                "--lora_target_modules",
                "to_kk",
            )
        )
    assert info.value.code == 2
    line = error_line(capsys)
    assert line.startswith(
        "train_pogdiff.py: error: --lora_target_modules 'to_kk': Target modules {'to_kk'} not"
    )
    with pytest.raises(SystemExit) as info:
        parse("--use_lora", "--lora_target_modules", " , ")
    assert info.value.code == 2
    assert "--lora_target_modules must name at least one UNet module" in error_line(capsys)


def test_a_kohya_repeats_prefix_too_large_is_one_line():
    from pogdiff.data import parse_kohya_folder

    assert parse_kohya_folder("2147483647_alice") == ("alice", 2**31 - 1)
    with pytest.raises(
        UserError, match=r"Folder '99999999999999999999_alice' asks for 99999999999999999999 rep"
    ):
        parse_kohya_folder("99999999999999999999_alice")


# ---- item 9, the cheap ones: metadata files, huge images, an unusable output folder -----------------------------


def test_an_empty_metadata_jsonl_is_one_line(tiny_dataset_path, tmp_path):
    from pogdiff.data import load_image_text_dataset

    folder, _ = copy_data(tiny_dataset_path, tmp_path)
    (folder / "metadata.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"metadata.jsonl is empty: add one JSON row per image"):
        load_image_text_dataset(train_data_dir=str(folder))


def test_two_metadata_files_in_one_folder_are_one_line(tiny_dataset_path, tmp_path):
    from pogdiff.data import load_image_text_dataset

    folder, _ = copy_data(tiny_dataset_path, tmp_path)
    (folder / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(UserError, match=r"holds metadata.jsonl and metadata.csv: imagefolder reads one"):
        load_image_text_dataset(train_data_dir=str(folder))


def test_an_image_over_pils_pixel_limit_names_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from pogdiff.data import load_rgb

    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is then over twice the limit: a "bomb"
    with pytest.raises(
        UserError, match=rf"Cannot decode image {path}: Image size \(4096 pixels\) exceeds limit"
    ):
        load_rgb(str(path))


def test_an_output_dir_under_a_file_is_one_line(tmp_path):
    from pogdiff.checkpointing import lock_output_dir

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match=r"--output_dir .*a-file/out' cannot be used: Not a directory"):
        lock_output_dir(str(tmp_path / "a-file" / "out"))


@pytest.mark.parametrize("damage", ["no-tokenizer", "truncated-unet"])
def test_an_incomplete_base_model_folder_is_one_line(
    damage, tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_path, model)
    if damage == "no-tokenizer":  # today: "OverflowError: int too big to convert"
        shutil.rmtree(model / "tokenizer")
        expected = f"--pretrained_model_name_or_path {str(model)!r} lacks tokenizer/: a diffusers Stable"
    else:  # today: an OSError traceback
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        expected = f"--pretrained_model_name_or_path {str(model)!r}: its UNet did not load (Unable to load"
    with pytest.raises(SystemExit) as info:
        run_in_process(train_args(str(model), tiny_dataset_path, tmp_path / "o"))
    assert info.value.code == 2
    assert error_line(capsys).startswith(f"train_pogdiff.py: error: {expected}")


def test_a_bad_identity_regex_in_the_builder_is_one_line(tmp_path):
    from pogdiff.longtail import _scan_image_dir

    with pytest.raises(
        UserError, match=r"--identity_regex '\(\?P<identity>\[a-z' is not a valid regular expr"
    ):
        _scan_image_dir(str(tmp_path), "regex", "(?P<identity>[a-z")


def test_push_to_hub_offline_is_refused_before_training(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest.py
    with pytest.raises(SystemExit) as info:
        run_in_process(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "o", "--push_to_hub"))
    assert info.value.code == 2
    assert "error: --push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set" in error_line(capsys)
    assert not (tmp_path / "o" / "unet").exists()  # nothing trained
