"""The notebooks in notebooks/: stored without outputs, and each runs top to bottom in small mode.

Small mode (``BAYES_POLAR_NOTEBOOK_SMALL=1``, read in each notebook's first cell) runs the same
code on a handful of questions, a few steps and adapters on the top block only: about two
minutes per notebook on two cores, so CI executes all of them. Notebooks 03 and 04 end with a
cell asserting their claims; the claims that need real sizes are skipped in small mode and
checked by the full-mode run (marker ``full``: ``make test-full``, not part of ``make test``).
"""
import json

import nbformat
import pytest

from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_priors_and_guides", "03_posterior_inspection", "04_out_of_distribution"]


def test_the_notebooks_users_start_from_are_there():
    assert [path.stem for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs_and_valid(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and nb.cells[0].cell_type == "markdown", "start with a markdown cell that says what and why"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"clear the outputs of {path.name}"
        assert "execution" not in cell.metadata, f"clear the execution metadata of {path.name}"
    assert "BAYES_POLAR_NOTEBOOK_SMALL" in code[0].source, "the first code cell must read the small-mode switch"
    text = json.dumps(nb)
    assert "/work/" not in text and "/home/" not in text and "/tmp/" not in text, "no machine paths"


def _execute(path, tmp_path, data_dir, monkeypatch, small: bool):
    from nbclient import NotebookClient

    if small:
        monkeypatch.setenv("BAYES_POLAR_NOTEBOOK_SMALL", "1")
    else:
        monkeypatch.delenv("BAYES_POLAR_NOTEBOOK_SMALL", raising=False)
    monkeypatch.setenv("BAYES_POLAR_DATA", str(data_dir))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "runs" / "notebooks").is_dir(), "runs go under the working directory"
    return nb


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem[:2] in ("03", "04")], ids=lambda p: p.stem)
def test_claims_are_checked_in_a_final_cell(path):
    last = nbformat.read(path, as_version=4).cells[-1]
    assert last.cell_type == "code" and "assert" in last.source and "if SMALL:" in last.source


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_small_mode(path, tmp_path, data_dir, monkeypatch):
    _execute(path, tmp_path, data_dir, monkeypatch, small=True)


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem[:2] in ("03", "04")], ids=lambda p: p.stem)
def test_notebook_claims_hold_in_full_mode(path, tmp_path, data_dir, monkeypatch):
    """The claims the final cell skips in small mode (OOD confidence, VI against NUTS), at full size."""
    nb = _execute(path, tmp_path, data_dir, monkeypatch, small=False)
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert "all claims hold" in printed and "skipped" not in printed
