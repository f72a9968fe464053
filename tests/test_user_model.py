"""Your own model on the command line: a VAE written as Pyro's examples write one."""

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from inference.commands.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "my_vae.py"
TINY = ["--data", "digits", "--epochs", "3", "--batch-size", "256", "--num-particles", "2",
        "--no-progress"]  # fmt: skip


def test_user_vae_trains_and_every_command_works_on_it(tmp_path, capsys):
    source = tmp_path / "models" / "my_vae.py"
    source.parent.mkdir()
    shutil.copy(EXAMPLE, source)
    run = tmp_path / "run"
    assert main(["train", "--model", f"{source}:make_model", "--z-dim", "3", "--out", str(run),
                 *TINY]) == 0  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == f"{source.resolve()}:make_model" and len(config["model_sha256"]) == 64
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["test_elbo"] > rows[0]["test_elbo"]  # it learns
    # No num_data in its model(x): the minibatch loss is a sum over B, reported per datapoint.
    assert abs(rows[-1]["train_bound"] - rows[-1]["test_elbo"]) < 5

    assert main(["evaluate", str(run), "--k", "1,10,100", "--no-progress"]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["elbo"]["mean"] <= report["iwae"]["100"]["mean"] + 3 * report["elbo"]["stderr"]
    assert main(["gaps", str(run), "--k", "50", "--limit", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "log p(x) >= L_marg" in out and "not measured for this model" in out
    gaps = json.loads((run / "gaps.json").read_text())
    assert 0 <= gaps["active_units"] <= 3  # the site is "latent", the only one: no "z" needed
    assert main(["diagnose", str(run), "--points", "1", "--chains", "1", "--samples", "50",
                 "--warmup", "50", "--num-particles", "100", "--no-progress"]) == 0  # fmt: skip
    diagnosed = json.loads((run / "diagnose.json").read_text())
    assert diagnosed["site"] == "latent" and diagnosed["points"][0]["index"] >= 0
    from inference.diagnostics import load_datatree

    tree = load_datatree(run / "diagnose.nc")
    for group in ("posterior", "guide"):  # the site is "z" in the tree, as for elbolab's models
        assert tree[group]["z"].dims == ("chain", "draw", "datapoint", "latent")
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert "3" in capsys.readouterr().out

    # Resume works, and a run whose model file changed is refused, naming the file.
    assert main(["train", "--model", f"{source}:make_model", "--z-dim", "3", "--out", str(run),
                 "--resume", *TINY[:2], "--epochs", "4", *TINY[4:]]) == 0  # fmt: skip
    source.write_text(source.read_text() + "\n# edited\n")
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("elbolab: error: the model file") and "has changed" in err
    assert err.count("\n") == 1


def test_module_reference_and_bad_references(tmp_path, capsys, monkeypatch):
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    shutil.copy(EXAMPLE, package / "vae.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--model", "mypkg.vae:make_model", "--out", "run", *TINY]) == 0
    assert main(["evaluate", "run", "--k", "1,5", "--no-progress"]) == 0

    (tmp_path / "broken.py").write_text("def make_model(:\n")
    (tmp_path / "notvae.py").write_text("def make_model(x_dim):\n    return 42\n")
    cases = {
        "nothere.py:make_model": "no such file",
        "broken.py:make_model": "importing",
        "notvae.py:make_model": "returned int, not a torch.nn.Module",
        f"{EXAMPLE}:missing": "defines no callable 'missing'",
    }
    capsys.readouterr()
    for reference, message in cases.items():
        assert main(["train", "--model", reference, "--out", f"r-{len(message)}", *TINY]) == 1
        err = capsys.readouterr().err
        assert err.startswith("elbolab: error:") and message in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["train", "--model", "gpt", "--out", "x"])
    assert "nor FILE.py:FACTORY" in capsys.readouterr().err


def test_a_model_file_inside_the_run_directory_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    source = run / "model.py"
    source.write_text(textwrap.dedent(EXAMPLE.read_text()))
    assert main(["train", "--model", f"{source}:make_model", "--out", str(run / "r"), *TINY]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run / "r"), "--no-progress"]) == 0  # not inside r itself
    config = json.loads((run / "r" / "config.json").read_text())
    # A shared run that names a file of its own is refused before anything is imported.
    inner = run / "r" / "evil.py"
    inner.write_text("raise SystemExit('imported')\n")
    config["model"] = f"{inner}:make_model"
    (run / "r" / "config.json").write_text(json.dumps(config))
    assert main(["evaluate", str(run / "r"), "--no-progress"]) == 1
    assert "lies inside the run directory" in capsys.readouterr().err
