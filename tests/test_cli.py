"""The elbolab command: smoke tests, reproducibility, and one-line errors."""

import json
import subprocess
import sys

import pytest

from inference.commands.cli import main
from inference.runs import read_metrics

TINY = ["--hidden", "16", "--z-dim", "2", "--epochs", "2", "--batch-size", "256",
        "--num-particles", "2", "--no-progress"]  # fmt: skip


def elbolab(*args, env=None):
    return subprocess.run([sys.executable, "-m", "inference.commands.cli", *args],
                          capture_output=True, text=True, env=env)  # fmt: skip


def test_train_then_evaluate(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "vae", "--data", "digits", "--objective", "iwae",
                 "--seed", "0", "--out", str(run), *TINY]) == 0  # fmt: skip
    assert "trained 2 epochs" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--k", "1,10,100", "--split", "test", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "IWAE-100" in out and "log p(x)" in out
    report = json.loads((run / "eval.json").read_text())
    assert set(report["iwae"]) == {"1", "10", "100"}
    from inference.commands.store import read_arrays

    per_point = read_arrays(run, report)
    assert {"elbo", "iwae100", "khat", "is_ess"} <= set(per_point)
    assert per_point["khat"].shape == (report["num_datapoints"],)
    assert report["name"] == "test-k100" and (run / "evals" / "test-k100.json").is_file()
    assert report["log_px"]["k"] == 100 and report["binarization"].startswith("static")
    ladder = [report["iwae"][k]["mean"] for k in ("1", "10", "100")]
    assert ladder[0] < ladder[1] < ladder[2]
    assert abs(report["elbo"]["mean"] - ladder[0]) < 4 * report["elbo"]["stderr"] + 0.2
    dec = report["decomposition"]
    assert dec["kl"] > 0 and abs(dec["elbo"] - (dec["reconstruction"] - dec["kl"])) < 1e-4

    # same seed, same numbers; another seed, other numbers
    main(["evaluate", str(run), "--k", "1,10", "--seed", "3", "--no-progress"])
    first = json.loads((run / "eval.json").read_text())
    main(["evaluate", str(run), "--k", "1,10", "--seed", "3", "--no-progress"])
    second = json.loads((run / "eval.json").read_text())
    assert first["iwae"] == second["iwae"]
    main(["evaluate", str(run), "--k", "1,10", "--seed", "4", "--no-progress"])
    assert json.loads((run / "eval.json").read_text())["iwae"] != first["iwae"]


def test_evaluate_reports_exact_log_px_for_linear_gaussian(tmp_path, capsys):
    run = tmp_path / "lg"
    main(["train", "--model", "linear-gaussian", "--guide-type", "diagonal", "--data", "synthetic",
          "--objective", "elbo", "--epochs", "5", "--lr", "0.05", "--z-dim", "4",
          "--out", str(run), "--no-progress"])  # fmt: skip
    main(["evaluate", str(run), "--k", "1,100,5000", "--limit", "50", "--no-progress"])
    report = json.loads((run / "eval.json").read_text())
    exact, iwae = report["exact_log_px"], report["log_px"]
    assert report["elbo"]["mean"] < exact
    assert abs(iwae["mean"] - exact) < 4 * iwae["stderr"] + 0.01
    assert "exact log p(x) of this model" in capsys.readouterr().out
    # a subset spread over the split: every 7th datapoint, then the first 20 of those
    main(["evaluate", str(run), "--k", "1,5000", "--every", "7", "--limit", "20", "--no-progress"])
    spread = json.loads((run / "eval.json").read_text())
    assert spread["num_datapoints"] == 20 and spread["every"] == 7
    assert spread["exact_log_px"] != exact  # other datapoints, and still within MC error
    assert (
        abs(spread["log_px"]["mean"] - spread["exact_log_px"])
        < 4 * spread["log_px"]["stderr"] + 0.01
    )
    assert "20 datapoints (every 7th)" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--every", "0", "--no-progress"]) == 1
    assert "--every must be >= 1" in capsys.readouterr().err


def test_resume_flag(tmp_path):
    run = tmp_path / "run"
    main(["train", "--out", str(run), *TINY])
    assert main(["train", "--out", str(run), "--resume", *TINY, "--epochs", "3"]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    # The run's own configuration is the default of a resume: no flag needs repeating ...
    assert main(["train", "--out", str(run), "--resume", "--epochs", "4", "--no-progress"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    # ... and a flag given that changes it is still refused, naming the field.
    assert main(["train", "--out", str(run), "--resume", "--epochs", "5", "--z-dim", "3"]) == 1


def test_demo_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "IWAE-1000" in text
    for name in ("iwae_ladder", "training", "reconstructions", "samples"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--no-progress"]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--epochs", "1", "--overwrite", "--no-progress"]) == 0
    assert len(read_metrics(out)) == 1
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(other), "--overwrite", "--no-progress"]) == 1
    assert (other / "precious.txt").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "/no/such/run"], "no such run directory"),
        (
            [
                "train",
                "--data",
                "binarized-mnist",
                "--data-path",
                "/no/file.npz",
                "--out",
                "{tmp}/x",
            ],
            "no such file",
        ),
        (["train", "--epochs", "0", "--out", "{tmp}/y"], "--epochs must be >= 1"),
        (["train", "--objective", "bogus", "--out", "{tmp}/z"], "invalid choice"),
        (["evaluate", "{tmp}", "--k", "0,5"], "positive integers"),
        (["evaluate", "{tmp}"], "no config.json"),
        (["train", "--device", "cuda", "--out", "{tmp}/d"], "no CUDA device"),
        (
            ["train", "--model", "hvae", "--corruption", "pepper:0.1", "--out", "{tmp}/f"],
            "kind must be one of",
        ),
        (
            ["train", "--model", "hvae", "--corruption", "dropout:2", "--out", "{tmp}/g"],
            "probability must lie in (0, 1)",
        ),
        (["train", "--corruption", "dropout:0.1", "--out", "{tmp}/h"], "needs --model hvae"),
        (["train", "--device", "gpu9", "--out", "{tmp}/e"], "--device 'gpu9'"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = elbolab(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elbolab") and message in lines[0], lines


def test_diagnose_and_compare(tmp_path, capsys):
    runs = []
    for objective, k in (("elbo", "1"), ("iwae", "4")):
        run = tmp_path / objective
        main(["train", "--objective", objective, "--out", str(run), *TINY, "--num-particles", k])
        main(["evaluate", str(run), "--k", "1,10,100", "--no-progress"])
        runs.append(str(run))
    capsys.readouterr()
    assert main(["diagnose", runs[1], "--points", "2", "--chains", "2", "--samples", "60",
                 "--warmup", "60", "--num-particles", "500", "--jit",
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "NUTS reference for 2 test datapoints" in out and "k-hat" in out
    report = json.loads((tmp_path / "iwae" / "diagnose.json").read_text())
    assert len(report["points"]) == 2 and report["khat"]["num_datapoints"] == 2
    assert report["jit"] is True
    assert (tmp_path / "iwae" / "diagnose.nc").exists()
    assert (tmp_path / "iwae" / "diagnose_pairs.png").exists()

    assert main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "elbo" in table and "iwae" in table and "active" in table
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["objective"] for r in result["runs"]] == ["elbo", "iwae"]
    assert all(0 <= r["active_units"] <= 2 for r in result["runs"])
    assert (tmp_path / "cmp" / "compare.png").exists()


def test_compare_needs_evaluated_runs(tmp_path):
    run = tmp_path / "run"
    main(["train", "--out", str(run), *TINY])
    result = elbolab("compare", str(run), "--out", str(tmp_path / "c"))
    assert result.returncode == 1 and "has no evaluation: run elbolab evaluate" in result.stderr


def test_gaps_and_experiment(tmp_path, capsys):
    run = tmp_path / "hvae"
    main(["train", "--model", "hvae", "--layers", "2", "--out", str(run), *TINY])
    capsys.readouterr()
    assert main(["gaps", str(run), "--k", "50", "--inner-samples", "1,5", "--limit", "20",
                 "--no-progress"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "L_marg >= L_h" in out and "mutual_information[5]" in out
    report = json.loads((run / "gaps.json").read_text())
    assert [c["inequality"] for c in report["chain"]] == [
        "log p(x) >= L_marg", "L_marg >= L_aux", "L_marg >= L_h"
    ]  # fmt: skip
    assert (run / "gaps.png").exists()
    # Two kinds of error in one report, each labelled by what it measures.
    from inference.bounds import ACROSS_DATAPOINTS, MONTE_CARLO

    assert {b["error"] for b in report["bounds"].values()} == {MONTE_CARLO}
    assert {c["error"] for c in report["cremer"].values()} == {ACROSS_DATAPOINTS}
    assert "(s.e. across those datapoints)" in out and "MC s.e." in out

    out_dir = tmp_path / "exp"
    assert main(["experiment", "stochastic-layers", "--epochs", "1", "--seeds", "0", "--k", "20",
                 "--inner-samples", "1,2", "--limit", "10", "--hidden", "8", "--z-dim", "2",
                 "--out", str(out_dir), "--no-progress"]) == 0  # fmt: skip
    result = json.loads((out_dir / "experiment.json").read_text())
    assert list(result["table"]) == ["L=1", "L=2", "L=3", "denoising (L=2)"]
    assert result["table"]["L=1"]["log p(x)"]["error"].startswith("across seeds")
    assert "I(z;h|x)" in capsys.readouterr().out


def test_diagnose_compares_nuts_with_the_guides_marginal_for_hierarchical_encoders(tmp_path):
    """With q(z|x) = E_q(h|x) q(z|h), the guide's draws must spread as the mixture does.

    The z layer is made to lean hard on h, so that the marginal's standard deviation
    (law of total variance over many h ~ q(h|x)) is far above that of q(z | h = mean),
    which the old comparison used.
    """
    import torch

    from inference import diagnostics
    from inference.runs import load_checkpoint, load_run, save_checkpoint

    run = tmp_path / "hvae"
    main(["train", "--model", "hvae", "--layers", "2", "--out", str(run), *TINY])
    state = load_checkpoint(run)
    params = state["model"]
    # q(h | x) twice as wide or more (its raw scales raised), and E[z | h] moving 8 times as
    # far with h (the loc rows of the z layer's output); q(z | h)'s own scale is unchanged.
    h_dim = params["encoder.0.net.2.bias"].shape[0] // 2
    params["encoder.0.net.2.bias"][h_dim:] += 2.0
    params["encoder.1.net.2.weight"][:2] *= 8
    save_checkpoint(run, state)
    assert main(["diagnose", str(run), "--indices", "0,1", "--chains", "1", "--samples", "400",
                 "--warmup", "50", "--num-particles", "100", "--no-progress"]) == 0  # fmt: skip
    guide_z = diagnostics.load_datatree(run / "diagnose.nc")["guide"]["z"].values[0]
    guide_sd = torch.as_tensor(guide_z).std(0)  # (point, latent), 400 draws

    _, dataset, model = load_run(run)
    x = dataset.split("test")[[0, 1]]
    with torch.no_grad():
        h = model.encoder_dist(0, x, x).sample((20_000,))
        q_z_h = model.encoder_dist(1, h, x.expand(20_000, *x.shape)).base_dist
        marginal_sd = (q_z_h.scale.pow(2).mean(0) + q_z_h.loc.var(0)).sqrt()
        at_mean_sd = model.posterior(x).base_dist.scale
    assert (marginal_sd > 1.5 * at_mean_sd).all()  # the two comparisons really differ here
    # 400 draws: a standard deviation to about 3.5% (1 s.e.); allow 5 s.e.
    assert torch.allclose(guide_sd.float(), marginal_sd, rtol=0.18)
    report = json.loads((run / "diagnose.json").read_text())
    assert report["guide_draws"].startswith("marginal q(z|x)")


def test_experiment_reuses_a_run_only_if_its_configuration_matches(tmp_path):
    from inference.commands.experiment import ensure_trained
    from inference.runs import RunError, TrainConfig, load_checkpoint

    def config(**changes):
        options = dict(model="hvae", layers=2, hidden=[8], z_dim=2, epochs=1, batch_size=256,
                       num_particles=2, seed=0)  # fmt: skip
        return TrainConfig(**{**options, **changes})

    run = tmp_path / "L2-seed0"
    ensure_trained(config(), run, progress=False)
    assert load_checkpoint(run)["epoch"] == 1
    before = (run / "checkpoint.pt").stat().st_mtime_ns
    ensure_trained(config(), run, progress=False)  # the same run: reused as it is
    assert (run / "checkpoint.pt").stat().st_mtime_ns == before
    assert len(read_metrics(run)) == 1

    with pytest.raises(RunError, match=r"another configuration \(lr: run has 0.001, asked 0.01"):
        ensure_trained(config(lr=0.01), run, progress=False)
    with pytest.raises(RunError, match="another configuration .*layers"):
        ensure_trained(config(layers=3), run, progress=False)

    ensure_trained(config(epochs=2), run, progress=False)  # fewer epochs: continued
    assert load_checkpoint(run)["epoch"] == 2 and len(read_metrics(run)) == 2
    with pytest.raises(RunError, match="trained for 2 epochs, the experiment asks for 1"):
        ensure_trained(config(), run, progress=False)


def test_an_experiment_table_marks_cells_that_rest_on_a_violated_inequality(tmp_path):
    """A seed whose gaps chain says VIOLATED: its KL gap is no gap, and the table says so."""
    from inference.commands.experiment import _flagged, format_experiment, violations
    from inference.plots import plot_experiment

    checks = {
        "L=1": [{"seed": 0, "log p(x) >= L_marg": "held (strictly, > 3 s.e.)"}],
        "L=2": [{"seed": 0, "log p(x) >= L_marg": "VIOLATED by more than 3 s.e.",
                 "L_marg >= L_h": "held within 3 s.e. (equality not excluded)"}],
    }  # fmt: skip
    cell = {"mean": -8.59, "stderr": 0.1, "error": "across seeds"}
    result = {
        "experiment": "stochastic-layers", "data": "digits", "objective": "iwae",
        "num_particles": 5, "epochs": 1, "seeds": [0], "eval_particles": 20,
        "inner_samples": [1, 2], "seconds": 1.0,
        "table": {v: {"log p(x)": cell, "KL gap": cell, "L_h": cell} for v in checks},
        "violated": violations(checks),
    }  # fmt: skip
    assert result["violated"] == {"L=2": ["log p(x) >= L_marg (seeds [0])"]}
    result["flagged"] = {
        v: [c for c in result["table"][v] if _flagged(result, v, c)] for v in result["violated"]
    }
    assert result["flagged"] == {"L=2": ["log p(x)", "KL gap"]}
    text = format_experiment(result)
    row = next(line for line in text.splitlines() if line.startswith("L=2"))
    assert row.count("!") == 2 and "VIOLATED!" in row  # the KL gap cell: no number
    assert row.count("-8.59") == 2  # log p(x) and L_h shown; the KL gap not
    assert "! L=2: log p(x) >= L_marg (seeds [0]) VIOLATED" in text
    assert "!" not in next(line for line in text.splitlines() if line.startswith("L=1"))
    assert plot_experiment(result, tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
