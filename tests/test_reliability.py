"""Nothing lost, nothing silent: checkpoint durability, resume choices, run identity, flag values, data warnings.

SPEC section 7. Training runs are in-process (`test_train.run_in_process`) except the one that must really be
killed, which runs as a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_train import assert_same_tensors, run_in_process, train_args, unet_state

from pogdiff.testing import run_process_group, write_tiny_dataset

REPO = Path(__file__).resolve().parent.parent


def error_line(capsys) -> str:
    """The line of stderr that carries the error message (argparse puts a usage line before it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if " error: " in line)


def expect_exit_2(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(argv)
    assert exit_info.value.code == 2
    return error_line(capsys)


def without(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


@pytest.fixture(scope="module")
def base_run(tiny_sd_path, tiny_dataset_path, tmp_path_factory) -> Path:
    """Two vanilla steps with a checkpoint after each: checkpoint-1, checkpoint-2 and the final model.

    Tests copy it before touching it (see `copy_run`)."""
    out = tmp_path_factory.mktemp("base") / "out"
    run_in_process(base_argv(tiny_sd_path, tiny_dataset_path, out))
    return out


def base_argv(model: str, data: str, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return train_args(
        model, data, out, "--objective", "vanilla", "--checkpointing_steps", "1", *extra, steps=steps
    )


def copy_run(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(base, out)
    return out


# ---- 1. a kill while a checkpoint is written leaves the previous one; resuming from it is exact ---------------


@pytest.mark.e2e
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(
    tiny_sd_path, tiny_dataset_path, tmp_path, caplog
):
    common = ("--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--random_flip")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, straight, *common, steps=4))

    # The worst moment: checkpoint-3 is completely written under its temporary name, not yet renamed, and
    # (with --checkpoints_total_limit 1) checkpoint-2 would be the only complete one left.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # Same thread count as this process: the resumed run must match the in-process one bit for bit.
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
        "POGDIFF_TEST_KILL_AFTER_TMP_CHECKPOINT": "3",
    }
    proc = run_process_group(
        [sys.executable, str(REPO / "train_pogdiff.py"), *train_args(tiny_sd_path, tiny_dataset_path, killed, *common, steps=4)],
        cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    names = sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name)
    assert names == [".tmp-checkpoint-3", "checkpoint-2"], names

    caplog.set_level(logging.INFO)
    run_in_process(
        train_args(
            tiny_sd_path, tiny_dataset_path, killed, *common, "--resume_from_checkpoint", "latest", steps=4
        )
    )
    assert any(".tmp-checkpoint-3" in m and "unfinished" in m for m in messages(caplog)), messages(caplog)
    assert sorted(p.name for p in killed.iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]
    assert_same_tensors(unet_state(straight / "checkpoint-4"), unet_state(killed / "checkpoint-4"))
    assert_same_tensors(unet_state(straight), unet_state(killed))


def test_pruning_never_removes_the_new_checkpoint(tmp_path):
    """Oldest first, and the one just written stays even when a newer one is left from before a resume."""
    from pogdiff.checkpointing import checkpoint_dirs, prune_checkpoints

    for step in (2, 3, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint: never touched
    assert prune_checkpoints(str(tmp_path), limit=2, keep="checkpoint-3") == ["checkpoint-2"]
    assert checkpoint_dirs(str(tmp_path)) == ["checkpoint-3", "checkpoint-5"]
    assert prune_checkpoints(str(tmp_path), limit=1, keep="checkpoint-3") == ["checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-x"]


# ---- 2. which checkpoint a resume uses ------------------------------------------------------------------------


def test_explicit_resume_path_must_exist(base_run, tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    out = copy_run(base_run, tmp_path)
    missing = tmp_path / "elsewhere" / "checkpoint-2"
    line = expect_exit_2(
        base_argv(tiny_sd_path, tiny_dataset_path, out, "--resume_from_checkpoint", str(missing)), capsys
    )
    assert line.startswith(f"train_pogdiff.py: error: --resume_from_checkpoint {missing} does not exist"), (
        line
    )
    line = expect_exit_2(
        base_argv(tiny_sd_path, tiny_dataset_path, out, "--resume_from_checkpoint", "checkpoint-7"), capsys
    )
    assert line.startswith("train_pogdiff.py: error: --resume_from_checkpoint checkpoint-7 does not exist"), (
        line
    )
    assert "checkpoint-1, checkpoint-2" in line


def test_explicit_resume_path_outside_output_dir(base_run, tiny_sd_path, tiny_dataset_path, tmp_path, caplog):
    """A checkpoint folder given by path is used as it is; flags that leave the result alone may change."""
    out = copy_run(base_run, tmp_path)
    elsewhere = tmp_path / "elsewhere" / "checkpoint-1"
    elsewhere.parent.mkdir()
    shutil.move(out / "checkpoint-1", elsewhere)
    # Leave only checkpoint-2, so that the model compared below can only come from this resumed run.
    for p in out.iterdir():
        if p.is_dir() and p.name != "checkpoint-2":
            shutil.rmtree(p)
        elif p.is_file():
            p.unlink()
    caplog.set_level(logging.INFO)
    run_in_process(
        base_argv(
            tiny_sd_path, tiny_dataset_path, out,
            "--resume_from_checkpoint", str(elsewhere),
            "--checkpointing_steps", "5", "--report_to", "tensorboard", "--logging_dir", "other-logs",
        )
    )  # fmt: skip
    assert any(f"Resuming from checkpoint {elsewhere}" in m for m in messages(caplog))
    assert_same_tensors(unet_state(base_run), unet_state(out))


def test_latest_falls_back_past_a_truncated_checkpoint(
    base_run, tiny_sd_path, tiny_dataset_path, tmp_path, caplog
):
    out = copy_run(base_run, tmp_path)
    weights = out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    caplog.set_level(logging.INFO)
    run_in_process(base_argv(tiny_sd_path, tiny_dataset_path, out, "--resume_from_checkpoint", "latest"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "checkpoint-2" in m and "unet/diffusion_pytorch_model.safetensors" in m and "checkpoint-1" in m
        for m in warnings
    ), warnings
    # Step 2 was trained again from checkpoint-1: the same model as the run that never broke.
    assert_same_tensors(unet_state(base_run), unet_state(out))
    assert_same_tensors(unet_state(base_run / "checkpoint-2"), unet_state(out / "checkpoint-2"))


def test_latest_with_no_readable_checkpoint_is_an_error(
    base_run, tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    out = copy_run(base_run, tmp_path)
    for name in ("checkpoint-1", "checkpoint-2"):
        (out / name / "optimizer.bin").write_bytes(b"")
    line = expect_exit_2(
        base_argv(tiny_sd_path, tiny_dataset_path, out, "--resume_from_checkpoint", "latest"), capsys
    )
    assert line.startswith(f"train_pogdiff.py: error: No readable checkpoint in {out}"), line
    assert "checkpoint-2" in line and "optimizer.bin" in line


# ---- 3. a checkpoint knows the run it belongs to --------------------------------------------------------------


def test_checkpoint_records_the_run(base_run):
    record = json.loads((base_run / "checkpoint-2" / "pogdiff_run.json").read_text())
    settings = record["settings"]
    assert record["global_step"] == 2
    assert settings["--seed"] == 0 and settings["--train_batch_size"] == 4
    assert settings["--objective"] == "vanilla" and settings["--psi_a1"] == 1.0
    assert settings["--density_epochs"] == 5  # every flag of add_index_arguments is there
    assert isinstance(settings["data_fingerprint"], str) and settings["data_fingerprint"]
    assert "--output_dir" not in settings and "--max_train_steps" not in settings


def test_resume_refuses_changed_settings(base_run, tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    out = copy_run(base_run, tmp_path)
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, data)
    # Other data: one caption changed (a mere copy of the folder elsewhere is the same data).
    metadata = data / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace('"text": "', '"text": "a ', 1))
    argv = base_argv(tiny_sd_path, str(data), out, "--resume_from_checkpoint", "latest", "--psi_a1", "2")
    argv[argv.index("--train_batch_size") + 1] = "2"
    argv[argv.index("--seed") + 1] = "1"
    line = expect_exit_2(argv, capsys)
    assert line.startswith(
        "train_pogdiff.py: error: Checkpoint checkpoint-2 belongs to a run with other settings:"
    ), line
    for needle in ("--seed: 0 in the checkpoint, 1 now", "--train_batch_size: 4 in the checkpoint, 2 now",
                   "--psi_a1: 1.0 in the checkpoint, 2.0 now", "training data", "--allow_changed_settings"):  # fmt: skip
        assert needle in line, line
    # Nothing was trained or removed.
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]


def test_allow_changed_settings_continues_with_a_warning(
    base_run, tiny_sd_path, tiny_dataset_path, tmp_path, caplog
):
    out = copy_run(base_run, tmp_path)
    argv = base_argv(
        tiny_sd_path, tiny_dataset_path, out,
        "--resume_from_checkpoint", "checkpoint-1", "--allow_changed_settings", "--noise_offset", "0.1",
    )  # fmt: skip
    argv[argv.index("--learning_rate") + 1] = "1e-4"
    run_in_process(argv)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    warning = next(m for m in warnings if "--allow_changed_settings" in m)
    assert "--learning_rate: 0.001 in the checkpoint, 0.0001 now" in warning
    assert "--noise_offset: 0 in the checkpoint, 0.1 now" in warning
    # The optimizer state brings its own learning rate back: the warning says the flag did not take effect.
    assert "--learning_rate keep the checkpoint's values" in warning
    trained = unet_state(out)
    assert any(not torch.equal(trained[k], v) for k, v in unet_state(base_run).items())


def test_resume_without_seed_takes_the_checkpoints_seed(tiny_sd_path, tiny_dataset_path, tmp_path, caplog):
    first = tmp_path / "first"
    run_in_process(without(base_argv(tiny_sd_path, tiny_dataset_path, first), "--seed"))
    seed = json.loads((first / "checkpoint-1" / "pogdiff_run.json").read_text())["settings"]["--seed"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(first / "checkpoint-1", resumed / "checkpoint-1")
    caplog.set_level(logging.INFO)
    run_in_process(
        without(
            base_argv(tiny_sd_path, tiny_dataset_path, resumed, "--resume_from_checkpoint", "latest"),
            "--seed",
        )
    )
    assert any(f"seed {seed}" in m and "checkpoint" in m for m in messages(caplog)), messages(caplog)
    assert_same_tensors(unet_state(first), unet_state(resumed))


def test_checkpoint_without_a_record_resumes_with_a_warning(
    base_run, tiny_sd_path, tiny_dataset_path, tmp_path, caplog
):
    """Checkpoints written before runs were recorded still resume; the unchecked settings are said."""
    out = copy_run(base_run, tmp_path)
    shutil.rmtree(out / "checkpoint-2")
    (out / "checkpoint-1" / "pogdiff_run.json").unlink()
    run_in_process(base_argv(tiny_sd_path, tiny_dataset_path, out, "--resume_from_checkpoint", "latest"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pogdiff_run.json" in m and "cannot be checked" in m for m in warnings), warnings
    assert_same_tensors(unet_state(base_run), unet_state(out))


def test_resuming_a_finished_run_trains_nothing(base_run, tiny_sd_path, tiny_dataset_path, tmp_path, caplog):
    out = copy_run(base_run, tmp_path)
    caplog.set_level(logging.INFO)
    run_in_process(base_argv(tiny_sd_path, tiny_dataset_path, out, "--resume_from_checkpoint", "latest"))
    assert any("nothing left to train" in m for m in messages(caplog))
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1", "checkpoint-2"]
    assert_same_tensors(unet_state(base_run), unet_state(out))


# ---- 5. flag values and data warnings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [("--psi_a1", "nan"), ("--psi_a3", "nan"), ("--learning_rate", "inf"), ("--density_w_max", "nan"),
     ("--snr_gamma", "-inf"), ("--cbdm_tau", "nan"), ("--adam_epsilon", "nan")],
)  # fmt: skip
def test_non_finite_float_flags_are_refused(flag, value, capsys):
    import train_pogdiff

    with pytest.raises(SystemExit) as exit_info:
        train_pogdiff.parse_args(
            ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", f"{flag}={value}"]
        )
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert line.endswith(f"error: {flag} must be a finite number, got {float(value)}."), line


def test_checkpoint_limits_are_positive(capsys):
    import train_pogdiff

    for flag in ("--checkpoints_total_limit", "--checkpointing_steps"):
        with pytest.raises(SystemExit) as exit_info:
            train_pogdiff.parse_args(
                ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", flag, "0"]
            )
        assert exit_info.value.code == 2
        assert f"{flag} must be >= 1, got 0" in error_line(capsys)


def test_empty_captions_warn_once_with_their_count(tiny_sd_path, tiny_dataset_path, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, data)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows[:2]:
        row["text"] = ""
    rows[2]["text"] = "   "
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_in_process(base_argv(tiny_sd_path, str(data), tmp_path / "o", steps=1))
    about_empty = [m for m in messages(caplog) if "captions are empty" in m]
    assert len(about_empty) == 1 and f"3 of {len(rows)}" in about_empty[0], about_empty


def test_single_identity_warns_that_balancing_acts_like_vanilla(tiny_sd_path, tmp_path, caplog):
    data = write_tiny_dataset(tmp_path / "data", counts={"alice": 6})
    run_in_process(base_argv(tiny_sd_path, data, tmp_path / "o", "--sampling", "balanced", steps=1))
    about_single = [m for m in messages(caplog) if "single identity" in m]
    assert len(about_single) == 1, messages(caplog)
    assert "'alice'" in about_single[0] and "vanilla" in about_single[0]
