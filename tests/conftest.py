"""Shared fixtures: the tiny offline Stable Diffusion and the tiny imbalanced dataset (pogdiff/testing.py)."""

import os

# Nothing in the suite may reach the network; set before huggingface_hub / datasets read their constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pogdiff.testing import build_tiny_sd, build_tiny_sdxl, run_process_group, write_tiny_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    """A tiny Stable Diffusion saved in the diffusers layout (random weights, seed 0)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> str:
    """A tiny Stable Diffusion XL saved in the diffusers layout (random weights, seed 0)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory) -> str:
    """An imagefolder with metadata.jsonl: identities alice/bruno (6 images) and chen/dara (2 images)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny-data") / "data")


@dataclass(frozen=True)
class DemoRun:
    """One `examples/demo_digits.py --quick` run: where it wrote, and its exit status and output."""

    output_dir: Path
    process: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def quick_demo_run(tmp_path_factory) -> DemoRun:
    """The demo's `--quick` preset, run once per session through the real `accelerate launch` and
    `evaluate_pogdiff.py` subprocesses (minutes); tests/test_demo.py checks it, tests/test_notebook.py reads it.
    Not checked here, so that the demo's own test reports a failure with its output."""
    out = tmp_path_factory.mktemp("quick-demo") / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_process_group(
        [sys.executable, str(REPO / "examples" / "demo_digits.py"), "--quick", "--output_dir", str(out)],
        cwd=REPO, env=env, timeout=3600,
    )  # fmt: skip
    return DemoRun(out, proc)


@pytest.fixture(scope="session")
def quick_demo_dir(quick_demo_run) -> Path:
    """The output folder of a successful `--quick` demo run (fails the test that needs it otherwise)."""
    proc = quick_demo_run.process
    if proc.returncode != 0:
        pytest.fail(
            f"examples/demo_digits.py --quick failed (exit {proc.returncode}):\n"
            + proc.stdout[-3000:] + proc.stderr[-3000:]
        )  # fmt: skip
    return quick_demo_run.output_dir
