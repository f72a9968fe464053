"""Every notebook runs, with small settings; a notebook missing from the list fails."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
LISTED = ["bound_gaps.ipynb", "posterior_diagnostics.ipynb", "rbm.ipynb", "text.ipynb"]


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(LISTED)


@pytest.mark.parametrize("name", LISTED)
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ELBOLAB_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore::DeprecationWarning")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={
        "metadata": {"path": str(tmp_path)}
    }).execute()  # fmt: skip
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]  # fmt: skip
    assert not errors
    assert os.environ["ELBOLAB_NOTEBOOK_SMALL"] == "1"
