"""The tutorials: stored with the outputs of a real run, written against the public API, and
executed here with small settings, their conclusions checked."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# Each notebook and what its conclusion cell must print (its numbers vary with the settings).
CONCLUSIONS = {
    "bound_gaps.ipynb": [
        r"L_h sits -?\d+\.\d+ \+- \d+\.\d+ nats below L_marg",
        r"two-layer encoder's log p\(x\) is (higher|lower|no different)",
    ],
    "posterior_diagnostics.ipynb": [
        r"IWAE training gives a log p\(x\) (higher|lower|no different)",
        r"cannot be trusted \(k-hat >= 0.7\): ELBO-trained guide \d+",
    ],
    "rbm.ipynb": [
        r"(PCD|CD)-1 ends with the higher exact held-out log-likelihood",
        r"bracket the exact log Z",
    ],
    "text.ipynb": [r"Word dropout (raises|lowers|does not measurably change) the bound"],
}


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _printed(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")  # fmt: skip


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(CONCLUSIONS)


@pytest.mark.parametrize("name", sorted(CONCLUSIONS))
def test_notebook_is_stored_with_the_outputs_of_a_real_run(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = _code(nb)
    assert all(c.get("execution_count") for c in cells), "a cell was never run"
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))  # top to bottom
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"], "warnings in the stored run"
    assert any(o.get("output_type") == "display_data" for o in outputs)  # its figures
    for pattern in CONCLUSIONS[name]:
        assert re.search(pattern, _printed(cells[-1])), pattern
    source = "\n".join(c.source for c in cells)
    assert "inference.commands" not in source  # the library's public API, not the command's
    assert "from inference import" in source
    assert not re.search(r"^(from inference\.\w+ import|import inference\.)", source, re.M)
    assert 'SMALL = os.environ.get("ELBOLAB_NOTEBOOK_SMALL") == "1"' in source


@pytest.mark.parametrize("name", sorted(CONCLUSIONS))
def test_notebook_runs_and_its_conclusion_holds(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ELBOLAB_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # fmt: skip  (each notebook asserts what its mathematics guarantees)
    cells = _code(nb)
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert not [o for o in outputs if o.get("name") == "stderr"], "a warning in the notebook"
    for pattern in CONCLUSIONS[name]:
        assert re.search(pattern, _printed(cells[-1])), pattern
    assert os.environ["ELBOLAB_NOTEBOOK_SMALL"] == "1"
