"""Reports that stay true: provenance, kept-apart evaluations, one atomic unit, both errors.

The cases replay what a researcher does over a week (train, evaluate, train
on, evaluate a subset, compare) and what goes wrong on the way (a kill -9
while writing, damaged files, a user's helper module edited, a diverging run).
"""

import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from inference import provenance
from inference.commands import store
from inference.commands.cli import main

TINY = ["--hidden", "8", "--z-dim", "2", "--batch-size", "512", "--num-particles", "2",
        "--no-progress"]  # fmt: skip
EVAL = ["--k", "1,5", "--no-progress"]


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("elbolab: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


@pytest.fixture
def run(tmp_path):
    path = tmp_path / "run"
    assert main(["train", "--out", str(path), "--epochs", "1", *TINY]) == 0
    return path


def test_a_report_records_where_its_numbers_come_from(run, capsys):
    assert main(["evaluate", str(run), "--limit", "40", "--threads", "1", *EVAL]) == 0
    report = json.loads((run / "eval.json").read_text())
    made = report["provenance"]
    assert made["checkpoint"]["sha256"] == provenance.file_sha256(run / "checkpoint.pt")
    assert made["checkpoint"]["epoch"] == 1
    assert made["threads"] == 1 and made["world_size"] == 1 and made["seed"] == 0
    assert set(made["versions"]) >= {"elbolab", "torch", "pyro"}
    assert made["settings"]["ks"] == [1, 5] and made["settings"]["limit"] == 40
    points = made["datapoints"]
    expected = provenance.tensor_sha256(np.arange(points["count"] + 1000)[:40])
    assert points["count"] == 40 and points["indices_sha256"] == expected
    assert made["wall_seconds"] > 0
    # Both kinds of error, named, and the second is the spread over the datapoints.
    arrays = store.read_arrays(run, report)
    spread = arrays["iwae5"].astype(np.float64).std(ddof=1) / math.sqrt(40)
    assert report["iwae"]["5"]["datapoint_stderr"] == pytest.approx(spread, rel=1e-5)
    assert report["iwae"]["5"]["mc_stderr"] == report["iwae"]["5"]["stderr"]
    assert "data s.e." in capsys.readouterr().out


def test_reports_of_an_earlier_checkpoint_are_marked_stale(run, tmp_path, capsys):
    """evaluate, train on with --resume: compare says the evaluation is of epoch 1's checkpoint."""
    assert main(["evaluate", str(run), *EVAL]) == 0
    assert main(["train", "--out", str(run), "--resume", "--epochs", "3", *TINY]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 3 and config["trained"]["epochs_done"] == 3  # what the run is now
    assert [s["to_epoch"] for s in config["trained"]["stretches"]] == [1, 3]
    capsys.readouterr()
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "! run" in out and "stale: it was computed from epoch 1's checkpoint" in out
    assert main(["evaluate", str(run), *EVAL]) == 0
    capsys.readouterr()
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert "stale" not in capsys.readouterr().out


def test_a_subset_never_replaces_a_full_evaluation_and_compare_pairs_the_same_datapoints(
    tmp_path, capsys
):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a), "--epochs", "1", *TINY]) == 0
    assert main(["train", "--out", str(b), "--epochs", "3", "--seed", "1", *TINY]) == 0
    assert main(["evaluate", str(a), *EVAL]) == 0
    assert main(["evaluate", str(a), "--limit", "20", *EVAL]) == 0
    assert main(["evaluate", str(b), "--limit", "20", "--k", "1,10", "--no-progress"]) == 0
    names = sorted(store.evaluations(a))
    assert names == ["test-first20-k5", "test-k5"]  # both kept
    full = store.evaluations(a)["test-k5"]
    assert full["num_datapoints"] > 20
    capsys.readouterr()
    # a's full evaluation and its subset; b has only the subset: the subset is compared.
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "compared: the same 20 datapoints of the test split" in out
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (paired,) = result["paired_differences"]
    ra, rb = (store.evaluations(r)["test-first20-k5" if r == a else "test-first20-k10"]
              for r in (a, b))  # fmt: skip
    d = store.read_arrays(b, rb)["iwae10"].astype(float) - store.read_arrays(a, ra)["iwae5"]
    assert paired["mean"] == pytest.approx(d.mean(), rel=1e-6)
    assert paired["paired_stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(20), rel=1e-6)
    assert "paired s.e." in out and "MC s.e." in out
    assert "note: log p(x) comes from different K" in out
    # No shared datapoints: refused, unless asked.
    c = tmp_path / "c"
    assert main(["train", "--out", str(c), "--epochs", "1", *TINY]) == 0
    assert main(["evaluate", str(c), "--limit", "30", *EVAL]) == 0
    code = main(["compare", str(b), str(c), "--out", str(tmp_path / "cmp2")])
    _one_line(capsys, code, "share no evaluation over the same datapoints", "--any-datapoints")
    assert main(["compare", str(b), str(c), "--any-datapoints", "--out",
                 str(tmp_path / "cmp2")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "NOT over the same datapoints" in out and "paired" not in out


_KILLER = """
import os, sys
from inference.commands import store
from inference.commands.cli import main
step = sys.argv[1]
store._on_step = lambda name: os.kill(os.getpid(), 9) if name == step else None
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("step", ["arrays", "report", "latest", "collected"])
def test_a_kill_at_each_step_leaves_every_report_with_its_own_arrays(run, step):
    assert main(["evaluate", str(run), "--seed", "1", *EVAL]) == 0
    before = json.loads((run / "eval.json").read_text())
    done = subprocess.run([sys.executable, "-c", _KILLER, step, "evaluate", str(run),
                           "--seed", "2", *EVAL], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == -9, done.stderr[-1000:]
    reports = [run / "eval.json", *sorted((run / "evals").glob("*.json"))]
    assert len(reports) == 2
    seeds = set()
    for path in reports:
        report = store.read_report(path)
        arrays = store.read_arrays(run, report)  # the file it names, hash checked
        assert float(arrays["elbo"].mean()) == pytest.approx(report["elbo"]["mean"], rel=1e-6)
        assert float(arrays["iwae5"].mean()) == pytest.approx(report["iwae"]["5"]["mean"], rel=1e-6)
        seeds.add(report["seed"])
    after = {"arrays": {1}, "report": None, "latest": {2}, "collected": {2}}[step]
    if after is not None:
        assert seeds == after
    if step == "arrays":
        assert json.loads((run / "eval.json").read_text()) == before
    # The next evaluation cleans up what the kill left, and works.
    assert main(["evaluate", str(run), "--seed", "3", *EVAL]) == 0
    assert store.evaluations(run)["test-k5"]["seed"] == 3


def test_damaged_reports_are_one_line_each(run, tmp_path, capsys):
    assert main(["evaluate", str(run), *EVAL]) == 0
    report = json.loads((run / "eval.json").read_text())
    named = run / "evals" / "test-k5.json"
    arrays = run / report["datapoints_file"]
    good_report, good_arrays = named.read_bytes(), arrays.read_bytes()
    cmp = ["compare", str(run), "--out", str(tmp_path / "cmp")]

    def damage(path, data):
        named.write_bytes(good_report)
        arrays.write_bytes(good_arrays)
        path.write_bytes(data)

    damage(named, good_report[: len(good_report) // 2])
    _one_line(capsys, main(cmp), "test-k5.json is damaged", "evaluate the run again")
    damage(named, json.dumps({**report, "elbo": "high"}).encode())
    _one_line(capsys, main(cmp), "'elbo' is not a bound")
    damage(named, b"[1, 2]")
    _one_line(capsys, main(cmp), "a JSON list, not an evaluation report")
    damage(arrays, good_arrays[:100])
    _one_line(capsys, main(cmp), "is not the file its report names")
    # Arrays that match their recorded hash but are not one number per datapoint.
    buffer = store._npz_bytes({"elbo": np.zeros(3), "khat": np.zeros(3)})
    digest = provenance.bytes_sha256(buffer)
    damage(arrays, buffer)
    named.write_text(json.dumps({**report, "datapoints_file_sha256": digest}))
    _one_line(capsys, main(cmp), "'elbo' is not one number per datapoint")
    with zipfile.ZipFile(arrays, "w") as archive:  # an object array: never unpickled
        with archive.open("elbo.npy", "w") as member:
            np.lib.format.write_array(member, np.array([{}], dtype=object), allow_pickle=True)
    named.write_text(json.dumps({**report, "datapoints_file_sha256": None}))
    _one_line(capsys, main(cmp), "is damaged", "evaluate the run again")
    damage(named, good_report)
    assert main(cmp) == 0


def test_a_data_file_whose_header_claims_a_huge_array_is_refused_before_allocating(
    tmp_path, capsys
):
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 784)}
    with zipfile.ZipFile(tmp_path / "bad.npz", "w") as archive:
        for split in ("train", "valid", "test"):
            with archive.open(f"{split}.npy", "w") as member:
                np.lib.format.write_array_header_1_0(member, header)
                member.write(bytes(784 * 3))
    code = main(["train", "--data", "binarized-mnist", "--data-path", str(tmp_path / "bad.npz"),
                 "--out", str(tmp_path / "r"), *TINY])  # fmt: skip
    _one_line(capsys, code, "train claims shape (1000000000, 784)", "the file is damaged")


def test_a_fifo_in_a_text_folder_is_skipped_not_read_for_ever(tmp_path):
    from inference.data import read_text_folder

    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text("the cat sat on the mat with the dog " * (i + 1))
    os.mkfifo(folder / "pipe.txt")
    *_, documents = read_text_folder(folder)  # returns instead of waiting on the pipe
    assert documents == 3


def _factory_file(folder: Path, body: str) -> Path:
    path = folder / "factory.py"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("def make_model(**kw):\n    raise RuntimeError('no GPU here')\n",
         "the factory raised RuntimeError: no GPU here"),
        ("def make_model(**kw):\n    return make_model(**kw)\n",
         "the factory raised RecursionError"),
        ("def make_model(x_dim, vocabulary):\n    pass\n",
         "the factory needs vocabulary, which elbolab cannot give"),
    ],
    ids=["raises", "recurses", "needs-an-argument"],
)  # fmt: skip
def test_a_factorys_own_error_is_one_line_and_debug_shows_its_traceback(
    tmp_path, capsys, body, needle
):
    source = _factory_file(tmp_path, body)
    args = ["train", "--model", f"{source}:make_model", "--out", str(tmp_path / "r"), *TINY]
    _one_line(capsys, main(args), needle)
    if "raise" in body:
        assert main([*args, "--debug"]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "no GPU here" in err and str(source) in err


HELPER = """
import torch
WIDTH = 8
"""
MODEL = """
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .helpers import WIDTH


class Model(nn.Module):
    def __init__(self, x_dim):
        super().__init__()
        self.decoder = nn.Linear(2, x_dim)
        self.encoder = nn.Linear(x_dim, 2 * WIDTH // WIDTH)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def make_model(x_dim):
    return Model(x_dim)
"""


def test_a_helper_module_the_factory_imports_is_covered_by_the_runs_hash(
    tmp_path, capsys, monkeypatch
):
    package = tmp_path / "mymodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text(HELPER)
    (package / "vae.py").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    args = ["--data", "digits", "--epochs", "1", "--batch-size", "512", "--no-progress"]
    assert main(["train", "--model", "mymodels.vae:make_model", "--out", str(run), *args]) == 0
    files = json.loads((run / "config.json").read_text())["model_files"]
    assert sorted(Path(f).name for f in files) == ["helpers.py", "vae.py"]  # torch, pyro: not
    assert main(["evaluate", str(run), *EVAL]) == 0
    recorded = json.loads((run / "eval.json").read_text())["provenance"]["model_files"]
    assert recorded == files
    (package / "helpers.py").write_text(HELPER.replace("WIDTH = 8", "WIDTH = 4"))
    capsys.readouterr()
    _one_line(capsys, main(["evaluate", str(run), *EVAL]), "the model's code has changed",
              "helpers.py")  # fmt: skip


def test_divergence_to_absurd_values_stops_training_with_the_last_good_checkpoint(tmp_path, capsys):
    from inference.training import absurd

    run = tmp_path / "run"
    _one_line(capsys, main(["train", "--out", str(run), "--epochs", "3", "--lr", "1e8", *TINY]),
              "training diverged at epoch 1", "beyond any model's")  # fmt: skip
    assert not (run / "checkpoint.pt").exists()
    # Absurd beside the first epoch, though finite and under the absolute limit.
    assert absurd("train_bound", -5.2e9, -120.0) and absurd("train_bound", -5.2e16, None)
    assert absurd("test_elbo", math.nan, None) and not absurd("train_bound", -150.0, -120.0)
    assert not absurd("test_elbo", -2e5, -180.0)  # a large model's bound can be large


def test_a_run_stopped_before_its_first_checkpoint_gives_advice_that_can_be_followed(
    tmp_path, capsys
):
    run = tmp_path / "run"
    main(["train", "--out", str(run), "--epochs", "3", "--lr", "1e8", *TINY])  # config.json only
    capsys.readouterr()
    _one_line(capsys, main(["evaluate", str(run), *EVAL]), "train first")
    _one_line(capsys, main(["train", "--out", str(run), "--resume", "--epochs", "1", *TINY]),
              "never completed an epoch", "without --resume")  # fmt: skip
    assert main(["train", "--out", str(run), "--epochs", "1", *TINY]) == 0  # as advised
    _one_line(capsys, main(["train", "--out", str(run), "--resume", "--epochs", "1", *TINY]),
              "has trained 1 epochs already", "--epochs 11")  # fmt: skip


def test_version_and_threads_and_rbm_evaluate_no_progress(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("elbolab 0.")
    rbm = tmp_path / "rbm"
    assert main(["rbm", "train", "--hidden", "4", "--epochs", "1", "--out", str(rbm),
                 "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    assert json.loads((rbm / "config.json").read_text())["trained"]["stretches"][0]["threads"] == 1
    assert main(["rbm", "evaluate", str(rbm), "--chains", "5", "--betas", "20",
                 "--no-progress", "--threads", "1"]) == 0  # fmt: skip
    made = json.loads((rbm / "rbm_eval.json").read_text())["provenance"]
    assert made["threads"] == 1 and made["checkpoint"]["epoch"] == 1
    with pytest.raises(SystemExit):
        main(["evaluate", str(rbm), "--threads", "0"])
    assert "expected at least 1 thread" in capsys.readouterr().err


def test_a_damaged_evaluation_is_left_out_with_a_warning_while_the_others_compare(run, tmp_path):
    assert main(["evaluate", str(run), *EVAL]) == 0
    assert main(["evaluate", str(run), "--limit", "20", *EVAL]) == 0
    (run / "evals" / "test-first20-k5.json").write_text("{ truncated")
    with pytest.warns(UserWarning, match="test-first20-k5.json is damaged.*left out"):
        assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["runs"][0]["evaluation"] == "test-k5"
