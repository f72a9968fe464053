"""Run directories are data, never code: checkpoints and config.json are checked, not trusted."""

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inference.commands.cli import main
from inference.runs import RunError, TrainConfig, read_config, read_metrics

TINY = ["--hidden", "8", "--z-dim", "2", "--epochs", "1", "--batch-size", "512",
        "--num-particles", "2", "--no-progress"]  # fmt: skip


class _Payload:
    """What a hostile checkpoint holds: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _poison(run: Path, marker: Path) -> None:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, run / "checkpoint.pt")


def test_no_command_executes_code_from_a_checkpoint(tmp_path, capsys):
    run, rbm = tmp_path / "vae", tmp_path / "rbm"
    assert main(["train", "--out", str(run), *TINY]) == 0
    assert main(["evaluate", str(run), "--k", "1,5", "--no-progress"]) == 0
    assert main(["rbm", "train", "--hidden", "4", "--epochs", "1", "--out", str(rbm),
                 "--no-progress"]) == 0  # fmt: skip
    marker = tmp_path / "pwned"
    _poison(run, marker)
    _poison(rbm, marker)
    commands = [
        ["evaluate", str(run), "--no-progress"],
        ["gaps", str(run), "--k", "5", "--no-progress"],
        ["diagnose", str(run), "--points", "1", "--no-progress"],
        ["compare", str(run), "--out", str(tmp_path / "cmp")],
        ["train", "--out", str(run), "--resume", *TINY, "--epochs", "2"],
        ["rbm", "evaluate", str(rbm)],
        ["rbm", "train", "--hidden", "4", "--epochs", "2", "--out", str(rbm), "--resume",
         "--no-progress"],
    ]  # fmt: skip
    capsys.readouterr()
    for args in commands:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("elbolab: error: refusing to load") and err.count("\n") == 1, err
        assert "pickled objects" in err
        assert not marker.exists(), args


def test_config_json_is_validated_like_the_command_line(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["kind"] == "svi" and saved["elbolab"]  # marked as elbolab's, with its version
    cases = {
        "hidden": ("many", "'hidden' must be list[int] or None"),
        "lr": ("0.1", "'lr' must be float"),
        "epochs": (True, "'epochs' must be int"),
        "num_particles": (0, "--num-particles must be >= 1"),
        "model": ("gpt", "--model 'gpt' is not one of"),
        "activation": ("swish?", "--activation 'swish?' is not one of"),
        "data_path": (3, "'data_path' must be str or None"),
        "colour": ("blue", "unknown configuration keys: colour"),
    }
    for key, (value, message) in cases.items():
        (run / "config.json").write_text(json.dumps({**saved, key: value}))
        with pytest.raises(RunError, match=re.escape(message)):
            read_config(run)
        assert main(["evaluate", str(run), "--no-progress"]) == 1
    for text in ("[1, 2]", "null", '"svi"', "[" * 5000 + "]" * 5000):
        (run / "config.json").write_text(text)
        with pytest.raises(RunError, match="config.json"):
            read_config(run)
    (run / "config.json").write_text(json.dumps({**saved, "lr": 1}))  # an int where a float goes
    assert read_config(run).lr == 1.0 and isinstance(read_config(run).lr, float)


def test_config_round_trip_keeps_every_field(tmp_path):
    config = TrainConfig(model="hvae", layers=3, hidden=[8, 8], z_dim=2, corruption=None)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


# ---------------------------------------------------------------------------
# Never delete or overwrite what elbolab did not write
# ---------------------------------------------------------------------------


def _foreign_project(root: Path) -> dict[Path, str]:
    """A user's folder that happens to hold a config.json."""
    files = {
        root / "config.json": json.dumps({"name": "my web app"}),
        root / "src" / "main.py": "print('hello')\n",
        root / "metrics.jsonl": '{"users": 3}\n',
    }
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return files


def _untouched(files: dict[Path, str]) -> bool:
    return all(path.read_text() == text for path, text in files.items())


def _one_line(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("elbolab: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and all(n in err for n in needles), err


def test_foreign_folder_survives_overwrite_and_every_writing_command(tmp_path, capsys):
    proj = tmp_path / "proj"
    files = _foreign_project(proj)
    _one_line(capsys, main(["demo", "--out", str(proj), "--overwrite", "--epochs", "1",
                            "--no-progress"]), "not empty and not elbolab's")  # fmt: skip
    _one_line(capsys, main(["train", "--out", str(proj), *TINY]), "not empty and not elbolab's")
    _one_line(capsys, main(["rbm", "train", "--hidden", "4", "--epochs", "1", "--out",
                            str(proj), "--no-progress"]), "not elbolab's")  # fmt: skip
    _one_line(capsys, main(["evaluate", str(proj), "--no-progress"]), "unknown configuration")
    _one_line(capsys, main(["gaps", str(proj), "--no-progress"]), "unknown configuration")
    _one_line(capsys, main(["diagnose", str(proj), "--no-progress"]), "unknown configuration")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    assert main(["evaluate", str(run), "--k", "1,5", "--no-progress"]) == 0
    capsys.readouterr()
    _one_line(capsys, main(["compare", str(run), "--out", str(proj)]), "not elbolab's")
    _one_line(capsys, main(["experiment", "stochastic-layers", "--out", str(proj), "--epochs",
                            "1", "--seeds", "0", "--no-progress"]), "not elbolab's")  # fmt: skip
    assert _untouched(files) and sorted(p.name for p in proj.iterdir()) == [
        "config.json", "metrics.jsonl", "src"
    ]  # fmt: skip


@pytest.mark.parametrize("where", ["root", "home", "checkout", "file"])
def test_dangerous_out_is_refused_without_writing(tmp_path, capsys, where):
    target = {
        "root": Path("/"),
        "home": Path.home(),
        "checkout": Path(__file__).resolve().parents[1],
        "file": tmp_path / "notes.txt",
    }[where]
    if where == "file":
        target.write_text("mine\n")
    before = sorted(p.name for p in target.iterdir()) if target.is_dir() else None
    for args in (
        ["train", "--out", str(target), *TINY],
        ["demo", "--out", str(target), "--overwrite", "--epochs", "1", "--no-progress"],
        ["rbm", "train", "--hidden", "4", "--epochs", "1", "--out", str(target), "--no-progress"],
        ["compare", str(tmp_path), "--out", str(target)],
        ["experiment", "stochastic-layers", "--out", str(target), "--no-progress"],
    ):
        _one_line(capsys, main(args), f"--out {target} is")
    if where == "file":
        assert target.read_text() == "mine\n"
    else:
        assert sorted(p.name for p in target.iterdir()) == before


def test_overwrite_removes_only_elbolabs_files(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--out", str(run), "--epochs", "2", "--no-progress"]) == 0
    written = sorted(p.name for p in run.iterdir() if p.is_file())
    written += sorted(f"evals/{p.name}" for p in (run / "evals").iterdir())
    assert any(name.endswith(".npz") for name in written)  # the evaluation's arrays
    (run / "my_notes.txt").write_text("keep me\n")
    (run / "analysis").mkdir()
    (run / "analysis" / "plot.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main(["demo", "--out", str(run), "--overwrite", "--epochs", "2", "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"--overwrite: removed {', '.join(written)} from {run}\n" in said
    assert (run / "my_notes.txt").read_text() == "keep me\n"
    assert (run / "analysis" / "plot.png").read_bytes() == b"mine"
    assert len(list((run / "evals").iterdir())) == 2  # the new demo's evaluation alone


def test_run_files_lists_everything_elbolab_writes(tmp_path):
    """The list --overwrite trusts must name every file the commands write into a run."""
    from inference.runs import RUN_FILES

    run, rbm = tmp_path / "hvae", tmp_path / "rbm"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1", "--no-progress"]) == 0
    assert main(["train", "--model", "hvae", "--out", str(run), *TINY]) == 0
    assert main(["evaluate", str(run), "--k", "1,5", "--no-progress"]) == 0
    assert main(["gaps", str(run), "--k", "5", "--inner-samples", "1,2", "--limit", "5",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["diagnose", str(run), "--points", "1", "--chains", "1", "--samples", "20",
                 "--warmup", "20", "--num-particles", "20", "--no-progress"]) == 0  # fmt: skip
    assert main(["rbm", "train", "--hidden", "4", "--epochs", "1", "--out", str(rbm),
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["rbm", "evaluate", str(rbm), "--chains", "5", "--betas", "20"]) == 0
    written = {p.name for d in (tmp_path / "demo", run, rbm) for p in d.iterdir()}
    assert written <= RUN_FILES, written - RUN_FILES


def test_output_folders_are_marked_and_reusable(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    assert main(["evaluate", str(run), "--k", "1,5", "--no-progress"]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(run), "--out", str(out)]) == 0
    assert main(["compare", str(run), "--out", str(out)]) == 0  # its own folder: fine
    assert json.loads((out / "elbolab.json").read_text())["kind"] == "compare"
    capsys.readouterr()
    # a run is not a compare folder, and a compare folder is not a run
    _one_line(capsys, main(["train", "--out", str(out), *TINY]), "elbolab directory of another")


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_command_works_for_small_k(tmp_path, capsys, k):
    """K = 1, 2, 3: k-hat cannot be fitted (NaN in JSON, said in the table), nothing crashes."""
    run = tmp_path / "run"
    assert main(["train", "--model", "hvae", "--out", str(run), *TINY]) == 0
    ks = "1" if k == 1 else f"1,{k}"
    assert main(["evaluate", str(run), "--k", ks, "--limit", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / "eval.json").read_text())
    if k > 1:
        assert report["khat"]["not_estimable"] == 10 and "not estimable for 10" in out
        assert math.isnan(report["khat"]["median"])
    assert main(["gaps", str(run), "--k", str(k), "--inner-samples", "1,2", "--limit", "10",
                 "--no-progress"]) == 0  # fmt: skip
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert main(["diagnose", str(run), "--points", "1", "--chains", "1", "--samples", "20",
                 "--warmup", "20", "--num-particles", str(k), "--no-progress"]) == 0  # fmt: skip
    diagnosed = json.loads((run / "diagnose.json").read_text())
    assert diagnosed["khat"]["num_datapoints"] == 1


# ---------------------------------------------------------------------------
# Signals, full disks, two writers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_train_keeps_a_consistent_checkpoint_and_says_how_to_resume(tmp_path, sig):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--hidden", "8", "--z-dim", "2", "--batch-size", "256",
            "--num-particles", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "inference.commands.cli", *args, "--epochs", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere inside a later epoch, or inside a checkpoint write
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.startswith("elbolab: interrupted in epoch") and err.count("\n") == 1, err
    assert "--resume" in err and "Traceback" not in err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert f"the checkpoint of epoch {state['epoch']} is kept" in err
    assert not (run / "train.lock").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no half-written file
    assert main([*args, "--resume", "--epochs", str(state["epoch"] + 1)]) == 0
    assert len(read_metrics(run)) == state["epoch"] + 1


def test_a_signal_inside_a_writer_whose_cleanup_fails_is_still_an_interruption(tmp_path):
    """torch.save interrupted mid-record fails again closing its zip file (seen in CI as a
    RuntimeError with a traceback); the interruption must come out, the old file intact."""
    from inference.runs import atomic_write

    path = tmp_path / "checkpoint.pt"
    path.write_text("previous")

    def write(tmp):
        tmp.write_text("partial")
        try:
            raise KeyboardInterrupt  # the signal
        finally:
            raise RuntimeError("unexpected pos 9728 vs 9620")  # the writer's own cleanup

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_full_disk_leaves_the_previous_files_intact(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    assert main(["evaluate", str(run), "--k", "1,5", "--no-progress"]) == 0
    checkpoint, report = (run / "checkpoint.pt").read_bytes(), (run / "eval.json").read_text()
    capsys.readouterr()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    code = main(["train", "--out", str(run), "--resume", *TINY, "--epochs", "2"])
    _one_line(capsys, code, "cannot write", "checkpoint.pt: No space left on device",
              "the previous checkpoint.pt is intact")  # fmt: skip
    monkeypatch.undo()
    assert (run / "checkpoint.pt").read_bytes() == checkpoint
    monkeypatch.setattr(Path, "write_text", full)
    code = main(["evaluate", str(run), "--k", "1,10", "--no-progress"])
    _one_line(capsys, code, "evals/test-k10.json: No space left on device", "nothing was written")
    monkeypatch.undo()
    assert (run / "eval.json").read_text() == report
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert not (run / "train.lock").exists()


def test_two_trainers_cannot_write_one_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    other = subprocess.Popen(["sleep", "60"])  # a live process holding the lock
    try:
        (run / "train.lock").write_text(str(other.pid))
        capsys.readouterr()
        for args in (["train", "--out", str(run), "--resume", *TINY, "--epochs", "2"],
                     ["demo", "--out", str(run), "--overwrite", "--no-progress"]):  # fmt: skip
            _one_line(capsys, main(args), f"another elbolab process (pid {other.pid})")
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "train.lock"} == before
    finally:
        other.kill()
        other.wait()
    # the holder is gone: its stale lock is taken over
    assert main(["train", "--out", str(run), "--resume", *TINY, "--epochs", "2"]) == 0
    assert not (run / "train.lock").exists()


# name -> (change to config.json, or a callable on the run directory; what the line must say)
BAD_RUNS = {
    "hidden 10^9": ({"hidden": [10**9]}, "--hidden must be at most"),
    "z-dim 10^9": ({"z_dim": 10**9}, "--z-dim must be at most"),
    "negative width": ({"hidden": [-1]}, "--hidden must be >= 1"),
    "empty hidden": ({"hidden": []}, "at least one layer size"),
    "string K": ({"num_particles": "5"}, "'num_particles' must be int"),
    "string lr": ({"lr": "fast"}, "'lr' must be float"),
    "infinite lr": ({"lr": float("inf")}, "--lr must be finite"),
    "string seed": ({"seed": "x"}, "'seed' must be int"),
    "zero batch": ({"batch_size": 0}, "--batch-size must be >= 1"),
    "negative epochs": ({"epochs": -3}, "--epochs must be >= 1"),
    "unknown model": ({"model": "gpt"}, "--model 'gpt' is not one of"),
    "vocabulary on images": ({"min_count": 3}, "--min-count shapes a vocabulary"),
    "word dropout on images": (
        {"model": "hvae", "layers": 2, "corruption": "word-dropout:0.2"}, "needs text data"
    ),
    "unknown activation": ({"activation": "swish?"}, "--activation 'swish?' is not one of"),
    "unknown objective": ({"objective": "magic"}, "--objective 'magic' is not one of"),
    "unknown data": ({"data": "imagenet"}, "--data 'imagenet' is not one of"),
    "guide type on a vae": ({"guide_type": "exact"}, "--guide-type needs --model linear-gau"),
    "layers on a vae": ({"layers": 3}, "--layers needs --model hvae"),
    "corruption on a vae": ({"corruption": "dropout:0.1"}, "--corruption needs --model hvae"),
    "numeric data path": ({"data_path": 3}, "'data_path' must be str or None"),
    "numeric device": ({"device": 5}, "'device' must be str"),
    "extra not a dict": ({"extra": [1]}, "'extra' must be dict"),
    "numeric model hash": ({"model_sha256": 123}, "'model_sha256' must be str or None"),
    "unknown key": ({"colour": "blue"}, "unknown configuration keys: colour"),
    "rbm kind": ({"kind": "rbm"}, "is a rbm run; use elbolab rbm evaluate"),
    "missing data file": ({"data": "binarized-mnist", "data_path": "/nonexistent/m.npz"},
                          "no such file"),
    "wider than the checkpoint": ({"hidden": [16]}, "checkpoint does not match the configured"),
    "other latent size": ({"z_dim": 3}, "checkpoint does not match the configured model"),
    "another model": ({"model": "hvae"}, "checkpoint does not match the configured model"),
    "defaults only": ("{}", "checkpoint does not match the configured model"),
    "top-level list": ("[1, 2]", "expected a JSON object, got list"),
    "top-level null": ("null", "expected a JSON object, got NoneType"),
    "top-level string": ('"svi"', "expected a JSON object, got str"),
    "deeply nested": ("[" * 100_000 + "]" * 100_000, "config.json"),
    "invalid JSON": ('{"model": ', "is not valid JSON"),
    "not UTF-8": (b"\xff\xfe\x00", "is not valid JSON"),
    "truncated checkpoint": (lambda run: (run / "checkpoint.pt").write_bytes(b"PK\x03"),
                             "cannot read"),
    "no checkpoint": (lambda run: (run / "checkpoint.pt").unlink(), "has no checkpoint.pt"),
    "no config": (lambda run: (run / "config.json").unlink(), "it has no config.json"),
}  # fmt: skip


def test_bad_run_directories_get_one_line_and_change_nothing(tmp_path, capsys):
    """Every case: exit 1, one `elbolab: error:` line, no traceback, no file of the run changed."""
    good = tmp_path / "good"
    assert main(["train", "--out", str(good), *TINY]) == 0
    saved = json.loads((good / "config.json").read_text())
    capsys.readouterr()
    for name, (change, message) in BAD_RUNS.items():
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(good, run)
        if callable(change):
            change(run)
        elif isinstance(change, dict):
            (run / "config.json").write_text(json.dumps({**saved, **change}))
        else:
            data = change if isinstance(change, bytes) else change.encode()
            (run / "config.json").write_bytes(data)
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        code = main(["evaluate", str(run), "--k", "1,2", "--limit", "10", "--no-progress"])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("elbolab: error:"), (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert message in err, (name, err)
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before, name
    assert len(BAD_RUNS) >= 35
