"""Shared fixtures: the tiny offline Stable Diffusion and the tiny imbalanced dataset (pogdiff/testing.py)."""

import os

# Nothing in the suite may reach the network; set before huggingface_hub / datasets read their constants.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`-n` in pyproject.toml) the workers run tests side by side: one intra-op thread per process,
# inherited by every process a test starts. With torch's default of one thread per core, two workers' OpenMP
# threads oversubscribe the cores and wait on each other: measured on 2 cores, the suite took as long with two
# such workers as with one, and single tests up to 16x longer than alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
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


# The determinism test of tests/test_demo.py: when it is selected, its from-scratch second run of the demo starts
# with the first one (see `quick_demo_runs`).
DEMO_RERUN_TEST = "test_quick_demo_gives_the_same_table_when_run_again"


def run_quick_demo(out: Path) -> DemoRun:
    """`examples/demo_digits.py --quick --output_dir out` offline, through the real `accelerate launch` and
    `evaluate_pogdiff.py` subprocesses (minutes)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_process_group(
        [sys.executable, str(REPO / "examples" / "demo_digits.py"), "--quick", "--output_dir", str(out)],
        cwd=REPO, env=env, timeout=3600,
    )  # fmt: skip
    return DemoRun(out, proc)


@pytest.fixture(scope="session")
def quick_demo_runs(request, tmp_path_factory) -> tuple[DemoRun, DemoRun | None]:
    """The demo's `--quick` preset, run once per session; tests/test_demo.py checks it, tests/test_notebook.py
    reads it. Not checked here, so that the demo's own test reports a failure with its output.

    If the determinism test is selected, a second run from scratch in another folder goes side by side with the
    first: most of the demo is one single-threaded process (its pretraining), so on two cores the pair costs
    little more wall time than one run, not twice as much.
    """
    wants_rerun = any(item.originalname == DEMO_RERUN_TEST for item in request.session.items)
    folders = [tmp_path_factory.mktemp("quick-demo") / "demo"]
    if wants_rerun:
        folders.append(tmp_path_factory.mktemp("quick-demo-again") / "demo")
    with ThreadPoolExecutor(len(folders)) as pool:
        runs = list(pool.map(run_quick_demo, folders))
    return runs[0], (runs[1] if wants_rerun else None)


@pytest.fixture(scope="session")
def quick_demo_run(quick_demo_runs) -> DemoRun:
    """The first `--quick` demo run of the session."""
    return quick_demo_runs[0]


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


# ---- scheduling under pytest-xdist (`-n` in pyproject.toml) ---------------------------------------------------

# Tests that must share one worker (`--dist loadgroup`): the demo's runs with the tests that read them (a session
# fixture is per worker, so split across workers the demo would run twice); every multi-process run, because
# torchrun and `accelerate launch` rendezvous on the same default port and two at once would collide.
DEMO_GROUP, MULTI_PROCESS_GROUP = "quick_demo", "multi_process"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Groups as above, and the longest tests first (`@pytest.mark.long(seconds=...)`: about what the test, or
    the group it opens, took in CI): xdist hands out work in this order, so the minutes-long runs start at once
    on different workers instead of one of them starting last while the other worker has nothing left to do."""
    for item in items:
        if "quick_demo_runs" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group(DEMO_GROUP))
        if item.get_closest_marker("multi_process"):
            item.add_marker(pytest.mark.xdist_group(MULTI_PROCESS_GROUP))

    def seconds(item) -> float:
        mark = item.get_closest_marker("long")
        return mark.kwargs["seconds"] if mark else 0.0

    items.sort(key=seconds, reverse=True)  # stable: the rest keep their order
