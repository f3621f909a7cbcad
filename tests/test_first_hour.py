"""The first hour of a new user (issue 26): the README's commands as written, offline, on the tiny model.

Each tool's mistake is one line naming that tool's own flag, exit 2; sizes follow the model or the run; every
CLI reads a folder the same way.
"""

from __future__ import annotations

import pytest

import evaluate_pogdiff
from pogdiff import features
from pogdiff import index as index_cli
from pogdiff.errors import report_user_errors
from tests.test_train import run_in_process, train_args

DEFAULT_ENCODER = "facebook/dinov2-base"


def one_error_line(capsys, prog: str, fn, *args) -> str:
    """Run `fn(*args)` the way the CLI does; it must exit 2 with one `<prog>: error:` line and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(prog, fn, *args) if prog else fn(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Retrying" not in err
    (line,) = [line for line in err.splitlines() if ": error: " in line]
    return line


def without(argv: list[str], flag: str) -> list[str]:
    """`argv` without `flag` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2 :]


# ---------------------------------------------------------------------------------------------------------------
# 1. The default neighbour encoder offline: one line naming the tool's own flag, exit 2, no retries


def test_trainer_default_encoder_offline_names_neighbor_encoder(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    argv = without(train_args(tiny_sd_path, tiny_dataset_path, tmp_path / "o"), "--neighbor_encoder")
    line = one_error_line(capsys, None, run_in_process, argv)
    assert line.startswith(
        f"train_pogdiff.py: error: --neighbor_encoder '{DEFAULT_ENCODER}' is not a local folder"
    )
    assert "HF_HUB_OFFLINE is set" in line and "--neighbor_encoder vae" in line
    assert "--feature_extractor" not in line


def test_index_cli_default_encoder_offline_names_neighbor_encoder(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    argv = [
        "--pretrained_model_name_or_path", tiny_sd_path,
        "--train_data_dir", tiny_dataset_path,
        "--num_neighbors", "3",
        "--output_dir", str(tmp_path / "index"),
    ]  # fmt: skip
    line = one_error_line(capsys, "python -m pogdiff.index", index_cli.main, argv)
    assert line.startswith(
        f"python -m pogdiff.index: error: --neighbor_encoder '{DEFAULT_ENCODER}' is not a local"
    )
    assert "--neighbor_encoder vae" in line and "--feature_extractor" not in line


def test_evaluate_default_extractor_offline_names_feature_extractor(
    tiny_sd_path, tiny_dataset_path, tmp_path, capsys
):
    argv = [
        "--model", f"m={tiny_sd_path}",
        "--train_data_dir", tiny_dataset_path,
        "--images_per_identity", "1",
        "--output_dir", str(tmp_path / "eval"),
    ]  # fmt: skip
    line = one_error_line(capsys, "evaluate_pogdiff.py", evaluate_pogdiff.main, argv)
    assert line.startswith(
        f"evaluate_pogdiff.py: error: --feature_extractor '{DEFAULT_ENCODER}' is not a local"
    )
    assert "--feature_extractor pixels" in line and "--neighbor_encoder" not in line
    assert not (tmp_path / "eval" / "m").exists()  # decided before generating anything


def test_unreachable_hub_without_offline_mode_is_one_request(monkeypatch):
    """No network and no HF_HUB_OFFLINE: one HEAD request fails, no retries, one message."""
    import huggingface_hub.constants
    import huggingface_hub.utils

    requests = []

    class DeadSession:
        def head(self, url, **kwargs):
            requests.append(url)
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", DeadSession)
    with pytest.raises(features.HubModelUnavailableError) as error:
        features.check_hub_model_available(
            "pogdiff-tests/not-cached", "--neighbor_encoder", features.NEIGHBOR_ENCODER_OFFLINE_CHOICES
        )
    assert len(requests) == 1 and requests[0].endswith("/pogdiff-tests/not-cached/resolve/main/config.json")
    message = str(error.value)
    assert "the Hub cannot be reached (Name or service not known)" in message
    assert "--neighbor_encoder vae" in message and "\n" not in message


def test_local_folder_or_cached_model_passes_the_check(tmp_path):
    features.check_hub_model_available(str(tmp_path), "--feature_extractor", "x")  # no exception
    with pytest.raises(
        features.HubModelUnavailableError, match=r"--feature_extractor '\./missing': no such folder"
    ):
        features.check_hub_model_available("./missing", "--feature_extractor", "x")
