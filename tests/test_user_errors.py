"""User mistakes that used to crash with a traceback: one line naming what to fix, exit code 2.

Each case asserts the exit code and the error line itself (not just that something failed).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.test_train import run_in_process, train_args


def error_line(argv: list[str], capsys) -> str:
    """Run the trainer in-process; it must exit 2 without a traceback. Returns its `error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("train_pogdiff.py: error:")]
    return line.removeprefix("train_pogdiff.py: error: ")


def copy_data(tiny_dataset_path: str, tmp_path) -> tuple:
    folder = tmp_path / "data"
    shutil.copytree(tiny_dataset_path, folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return folder, rows


def test_non_utf8_metadata_names_file_and_line(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    folder, rows = copy_data(tiny_dataset_path, tmp_path)
    rows[3]["text"] = "An image of Zoë."
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    (folder / "metadata.jsonl").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    line = error_line(train_args(tiny_sd_path, str(folder), tmp_path / "o"), capsys)
    assert line.startswith(f"{folder / 'metadata.jsonl'} line 4 is not UTF-8 text (byte b'\\xeb'")
    assert line.endswith("save the file as UTF-8.")


def test_a_row_without_caption_names_row_and_column(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    folder, rows = copy_data(tiny_dataset_path, tmp_path)
    del rows[5]["text"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = error_line(train_args(tiny_sd_path, str(folder), tmp_path / "o"), capsys)
    assert line.startswith("Row 5 of the training set has no caption: its 'text' value is missing or null.")


def test_empty_model_folder(tiny_dataset_path, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = error_line(train_args(str(tmp_path / "empty"), tiny_dataset_path, tmp_path / "o"), capsys)
    assert line.startswith(
        f"--pretrained_model_name_or_path {str(tmp_path / 'empty')!r} is a folder but not a diffusers"
    )
    assert "it holds nothing." in line


def test_unknown_hub_id_offline(tiny_dataset_path, tmp_path, capsys):
    line = error_line(train_args("someone/not-a-cached-model", tiny_dataset_path, tmp_path / "o"), capsys)
    assert line.startswith(
        "--pretrained_model_name_or_path 'someone/not-a-cached-model' is not a local folder and not in the "
        "Hugging Face cache, and HF_HUB_OFFLINE is set"
    )


def test_output_dir_that_is_a_file(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    line = error_line(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "a-file"), capsys)
    assert line == f"--output_dir {str(tmp_path / 'a-file')!r} is a file, not a folder: give a folder path."


def test_fp16_on_cpu_points_at_bf16(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    argv = train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "o", "--mixed_precision", "fp16")
    assert error_line(argv, capsys).startswith(
        "--mixed_precision fp16 is for GPUs: on the CPU, use --mixed_precision bf16 (or no)."
    )


def test_evaluate_and_builder_report_user_errors_in_one_line(tiny_dataset_path, tmp_path):
    """The other two CLIs: exit 2 and one `error:` line, no traceback."""
    import sys

    from pogdiff.testing import run_process_group

    cases = [
        (
            [sys.executable, "evaluate_pogdiff.py", "--model", f"a={tmp_path / 'missing'}", "--train_data_dir",
             tiny_dataset_path, "--output_dir", str(tmp_path / "ev"), "--feature_extractor", "pixels"],
            f"evaluate_pogdiff.py: error: --model a: {str(tmp_path / 'missing')!r}: no such folder.",
        ),
        (
            [sys.executable, "-m", "pogdiff.data", "build", "--image_dir", str(tmp_path / "nothing"),
             "--output_dir", str(tmp_path / "built"), "--preset", "S"],
            f"python -m pogdiff.data: error: --image_dir {str(tmp_path / 'nothing')!r} is not a directory.",
        ),
    ]  # fmt: skip
    for command, expected in cases:
        done = run_process_group(command, timeout=300, cwd=str(Path(__file__).resolve().parents[1]))
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert expected in done.stderr.splitlines(), done.stderr[-2000:]


def test_a_second_run_in_the_same_output_dir_is_refused(tiny_sd_path, tiny_dataset_path, tmp_path, capsys):
    """Two writers in one output_dir would prune and overwrite each other's checkpoints: the second refuses."""
    from filelock import FileLock

    out = tmp_path / "o"
    out.mkdir()
    held = FileLock(str(out / ".pogdiff-train.lock"))
    held.acquire()  # what a first run in progress holds
    try:
        line = error_line(train_args(tiny_sd_path, tiny_dataset_path, out), capsys)
    finally:
        held.release()
    assert line.startswith(f"Another train_pogdiff.py run is using --output_dir {str(out)!r}")
    # Once the first run is gone, the same command runs.
    run_in_process(train_args(tiny_sd_path, tiny_dataset_path, out))
    assert (out / "model_index.json").is_file()
