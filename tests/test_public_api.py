"""The public API: importable from ``inference`` itself, each name documented with an example
that runs, the module paths unchanged, one result convention (Bound with both errors)."""

import doctest
import importlib
import inspect
import math
import warnings

import pyro
import pytest
import torch

import inference

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_the_public_names_are_the_modules_own_objects():
    assert len(inference.__all__) == len(set(inference.__all__)) >= 30
    for module, names in inference._PUBLIC.items():
        defined = importlib.import_module(f"inference.{module}")
        for name in names:
            assert getattr(inference, name) is getattr(defined, name), name  # paths still work
    from inference import iwae_bound, log_importance_weights  # noqa: F401

    with pytest.raises(AttributeError, match="no attribute 'tracing_internals'"):
        inference.tracing_internals  # noqa: B018
    assert set(inference.__all__) <= set(dir(inference))


@pytest.mark.parametrize("name", inference.__all__)
def test_every_public_name_has_an_example_that_runs(name):
    obj = getattr(inference, name)
    doc = inspect.getdoc(obj) or ""
    assert "\nExamples\n--------\n" in doc, f"{name} has no Examples section"
    (test,) = [t for t in doctest.DocTestFinder(recurse=False).find(obj, name) if t.examples]
    pyro.set_rng_seed(0)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a library's notices inside an example are not ours
        result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)


def test_a_bound_carries_both_errors_and_converts_to_xarray():
    from inference import Bound, weights_to_datatree

    values = torch.tensor([-1.0, -2.0, -4.0, -3.0])
    bound = Bound(values, torch.full((4,), 0.2))
    assert bound.mc_stderr == pytest.approx(math.sqrt(4 * 0.04) / 4)
    assert bound.datapoint_stderr == pytest.approx(float(values.std()) / 2)
    summary = bound.summary()
    assert summary["mc_stderr"] == summary["stderr"] == pytest.approx(bound.mc_stderr)
    assert summary["datapoint_stderr"] == pytest.approx(bound.datapoint_stderr)
    data = bound.to_xarray("iwae")
    assert data["iwae"].dims == ("datapoint",) and data.attrs["units"] == "nats"
    assert data.attrs["mean"] == pytest.approx(-2.5)
    tree = weights_to_datatree(torch.randn(30, 4), bounds={"iwae": bound})
    assert list(tree["bounds"]["iwae_mc_stderr"].values) == pytest.approx([0.2] * 4)
