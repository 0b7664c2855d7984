"""The quickstart notebook is stored clean and runs top to bottom without errors.

The notebook checks its own claims with ``assert`` (GNMR recovers the spiked layer, the
perturbation lab's locality and linearity), so executing it is the functional test.
"""

from pathlib import Path

import nbclient
import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
NOTEBOOK = REPO_ROOT / "benchmarks" / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 300
MIN_IMAGES = 3


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=nbformat.NO_CONVERT)


def test_notebook_is_valid_and_stored_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells
    for cell in code_cells:
        assert cell.outputs == [], cell.source[:80]
        assert cell.execution_count is None, cell.source[:80]


@pytest.mark.slow
def test_notebook_executes_without_errors(monkeypatch):
    # The kernel inherits this process's environment.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = read_notebook()
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    )
    client.execute()  # raises CellExecutionError, with the traceback, on the first error

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, [f"{out.ename}: {out.evalue}" for out in errors]
    images = [
        out
        for out in outputs
        if out.output_type in ("display_data", "execute_result") and "image/png" in out.data
    ]
    assert len(images) >= MIN_IMAGES, f"{len(images)} images, expected at least {MIN_IMAGES}"
