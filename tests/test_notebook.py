"""examples/quickstart.ipynb, executed in a real Jupyter kernel (nbclient + ipykernel) on the `--quick` demo's output.

The demo runs once per session (the `quick_demo_dir` fixture of tests/conftest.py, shared with tests/test_demo.py),
so these tests are marked e2e like the demo's. The notebook is executed once, with every cell run even after an
error, and each test reads the executed copy.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
# What the notebook writes into OUT_DIR (the validation figure is tested separately: it needs the trainer's grids).
FIGURES = ("majority_vs_few_shot.png", "psi_per_identity.png")
VALIDATION_FIGURE = "validation_over_training.png"
VALIDATION_TAG = "validation-grids"
# Prepended to the executed copy only: which interpreter the kernel runs.
PROBE = "import json, sys\nprint('KERNEL', json.dumps({'prefix': sys.prefix, 'executable': sys.executable}))"


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def tagged(nb: nbformat.NotebookNode, tag: str) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if tag in cell.get("metadata", {}).get("tags", [])]


def errors(cell: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [output for output in cell.get("outputs", []) if output.output_type == "error"]


def embedded_pngs(cell: nbformat.NotebookNode) -> list[Image.Image]:
    return [
        Image.open(io.BytesIO(base64.b64decode(output.data["image/png"])))
        for output in cell.get("outputs", [])
        if output.output_type in ("display_data", "execute_result") and "image/png" in output.get("data", {})
    ]


def assert_real_image(image: Image.Image, name: str, min_width: int = 500, min_height: int = 300) -> None:
    """A figure someone could look at: big enough, and not a blank canvas."""
    image.load()
    assert image.width >= min_width and image.height >= min_height, (name, image.size)
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, (name, pixels.std())


# ---- the committed notebook (fast) ------------------------------------------------------------------------------


def test_notebook_is_valid_and_committed_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell must be tagged 'parameters'"
    assert "POGDIFF_DEMO_DIR" in code[0].source and "POGDIFF_NOTEBOOK_OUT" in code[0].source
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "strip the outputs"
    assert len(tagged(nb, VALIDATION_TAG)) == 1
    assert nb.metadata.kernelspec.name == "python3"


# ---- executed on the quick demo (e2e) -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executed(quick_demo_dir, tmp_path_factory) -> dict:
    """The notebook run top to bottom in a `python3` kernel, with the demo's output and an OUT_DIR of its own."""
    out = tmp_path_factory.mktemp("notebook") / "figures"
    nb = read_notebook()
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    env = {
        **os.environ,
        "POGDIFF_DEMO_DIR": str(quick_demo_dir),
        "POGDIFF_NOTEBOOK_OUT": str(out),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    # kernel_name "python3" is ipykernel's own kernelspec; jupyter_client starts it with this interpreter.
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=300,  # per cell
        startup_timeout=120,
        allow_errors=True,  # run every cell; the tests below say which may fail
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    started = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - started
    print(f"quickstart.ipynb executed in {seconds:.1f} s")
    return {"nb": nb, "out": out, "seconds": seconds, "demo": quick_demo_dir}


@pytest.mark.e2e
def test_notebook_runs_in_the_test_interpreter_on_the_demo_output(executed):
    nb = executed["nb"]
    probe = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.output_type == "stream")
    kernel = json.loads(probe.split("KERNEL ", 1)[1])
    # The kernel runs this venv's Python, not whichever `python3` kernelspec a machine happens to have.
    assert Path(kernel["prefix"]).resolve() == Path(sys.prefix).resolve(), kernel
    failed = {
        i: errors(cell)[0].ename + ": " + errors(cell)[0].evalue
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and errors(cell) and VALIDATION_TAG not in cell.metadata.get("tags", [])
    }
    assert not failed, failed
    text = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if "text" in o)
    assert str(executed["demo"]) in text  # POGDIFF_DEMO_DIR was read


@pytest.mark.e2e
def test_notebook_saves_and_shows_its_figures(executed):
    out = executed["out"]
    for name in FIGURES:
        assert (out / name).is_file(), sorted(p.name for p in out.iterdir()) if out.is_dir() else out
        assert_real_image(Image.open(out / name), name)
    shown = [image for cell in executed["nb"].cells for image in embedded_pngs(cell)]
    assert len(shown) >= len(FIGURES)
    for image in shown:
        assert_real_image(image, "inline figure", min_width=300, min_height=200)


@pytest.mark.e2e
def test_notebook_shows_validation_grids_over_training(executed):
    (cell,) = tagged(executed["nb"], VALIDATION_TAG)
    if errors(cell):
        error = errors(cell)[0]
        pytest.fail(f"the validation cell failed: {error.ename}: {error.evalue}")
    assert_real_image(Image.open(executed["out"] / VALIDATION_FIGURE), VALIDATION_FIGURE)
    assert embedded_pngs(cell), "the validation figure is not shown inline"
