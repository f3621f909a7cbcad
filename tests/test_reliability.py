"""Nothing lost, nothing silent: checkpoint durability, resume choices, run identity, flag values, data warnings.

SPEC section 7. Training runs are in-process (`test_train.run_in_process`) except the one that must really be
killed, which runs as a subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_train import run_in_process, train_args

from pogdiff.testing import write_tiny_dataset

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
