"""pogdiff.testing helpers that the rest of the suite relies on."""

import subprocess
import sys
import time

import pytest

from pogdiff.testing import run_process_group

# A launcher-like parent whose child inherits stdout and outlives it (what a hung torchrun rank does).
_PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); time.sleep(600)'])\n"
    "time.sleep(600)\n"
)


def test_run_process_group_kills_the_whole_group_on_timeout():
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_process_group([sys.executable, "-c", _PARENT], timeout=3)
    assert time.monotonic() - start < 30  # plain subprocess.run would wait on the child's pipe for 600 s
    child_pid = int(caught.value.output.split()[0])
    time.sleep(0.5)
    assert _gone_or_zombie(child_pid)


def _gone_or_zombie(pid: int) -> bool:
    """True once `pid` no longer runs (killed: absent, or a zombie awaiting its new parent's reaping)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_run_process_group_returns_like_subprocess_run():
    done = run_process_group(
        [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
