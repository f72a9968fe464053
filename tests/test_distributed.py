"""Two gloo processes on localhost, launched as a user launches them: torchrun."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from inference.commands.cli import main
from inference.runs import TrainConfig
from inference.svi import train

SMALL = ["--hidden", "16", "--z-dim", "3", "--batch-size", "64", "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, nproc=2, timeout=240, env=None, wait=True):
    # --standalone: torchrun picks a free port itself (no race with other processes for one)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(nproc), "-m", "inference.commands.cli", *args]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ELBOLAB_DIST_TIMEOUT": "60",
                   **(env or {})}  # fmt: skip
    if not wait:
        return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
    return subprocess.run(command, env=environment, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _same(a: dict, b: dict, atol=0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


@pytest.mark.parametrize(
    "options",
    [["--objective", "iwae", "--num-particles", "5"],
     ["--model", "hvae", "--layers", "2", "--objective", "dreg", "--num-particles", "3"]],
    ids=["vae-iwae", "hvae-dreg"],
)  # fmt: skip
def test_two_processes_train_the_parameters_of_one_process_and_resume(tmp_path, options):
    both = tmp_path / "torchrun"
    done = _torchrun("train", "--epochs", "3", "--out", str(both), *SMALL, *options)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained 3 epochs") == 1  # rank 0 alone reports
    # One process, the same global batch of 64 in two pieces with the same seeds.
    config = TrainConfig(epochs=3, hidden=[16], z_dim=3, batch_size=64)
    for flag, value in zip(options[::2], options[1::2], strict=True):
        name = flag[2:].replace("-", "_")
        setattr(config, name, type(getattr(config, name) or 1)(value))
    one = tmp_path / "single"
    train(config, one, shards=2, progress=False)
    assert _same(_weights(both), _weights(one), atol=1e-6)
    rows = [json.loads(line) for line in (both / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_bound"] for r in rows] == pytest.approx([r["train_bound"] for r in ref])
    # A distributed run resumes under torchrun and evaluates in one process.
    part = tmp_path / "resumed"
    first = _torchrun("train", "--epochs", "2", "--out", str(part), *SMALL, *options)
    assert first.returncode == 0, first.stderr[-2000:]
    again = _torchrun("train", "--epochs", "3", "--resume", "--out", str(part), *SMALL, *options)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _same(_weights(part), _weights(both), atol=1e-6)
    assert main(["evaluate", str(both), "--k", "1,5", "--limit", "20", "--no-progress"]) == 0


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_rank_that_dies_fails_the_job_without_hanging(tmp_path):
    run = tmp_path / "run"
    job = _torchrun("train", "--epochs", "500", "--out", str(run), *SMALL, wait=False)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = _children(job.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), 9)
    try:
        _, err = job.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job hung after a rank died")
    assert job.returncode != 0
    assert "exitcode  : -9" in err or "Signal 9" in err, err[-2000:]
    # What was written stays whole: the last checkpoint loads and resumes in one process.
    assert main(["evaluate", str(run), "--k", "1,2", "--limit", "5", "--no-progress"]) == 0


def _die_or_train(rank: int, port: int, out: str, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ELBOLAB_DIST_TIMEOUT="30")  # fmt: skip
    from inference import distributed
    from inference.commands.cli import main as cli

    if rank == 1:
        distributed.current()
        os._exit(3)  # a peer that vanishes after joining, with no torchrun to notice it
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli(["train", "--epochs", "50", "--out", out, *SMALL])
    queue.put((code, err.getvalue()))


def test_without_torchrun_a_lost_peer_is_a_one_line_error(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_die_or_train, args=(r, port, str(tmp_path / "r"), queue))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    code, err = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    assert code == 1 and err.startswith("elbolab: error: rank 0:"), err
    assert "a peer process died or did not answer" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("sparse_kernels", [False, True])
def test_rbm_contrastive_updates_are_summed_over_two_processes(tmp_path, sparse_kernels):
    from inference.contrastive import RBMConfig, train_rbm

    args = ["--hidden", "12", "--method", "pcd", "--batch-size", "30", "--no-progress",
            "--sparse-kernels" if sparse_kernels else "--no-sparse-kernels"]  # fmt: skip
    both = tmp_path / "torchrun"
    done = _torchrun("rbm", "train", "--epochs", "2", "--out", str(both), *args)
    assert done.returncode == 0, done.stderr[-2000:]
    one = tmp_path / "single"
    train_rbm(RBMConfig(hidden=12, method="pcd", batch_size=30, epochs=2), one, shards=2,
              progress=False, sparse_kernels=sparse_kernels)  # fmt: skip
    a, b = (torch.load(r / "checkpoint.pt", weights_only=True) for r in (both, one))
    assert _same(a["model"], b["model"], atol=1e-5)
    assert torch.equal(a["hidden_chains"], b["hidden_chains"])  # every chain, gathered
    assert main(["rbm", "evaluate", str(both), "--chains", "20", "--betas", "200"]) == 0


def _json_without(path: Path, *keys: str) -> dict:
    report = json.loads(path.read_text())
    for key in keys:
        report.pop(key, None)
    if isinstance(report.get("ais"), dict):
        report["ais"].pop("seconds", None)
    return report


def _arrays(run: Path) -> dict:
    """The per-datapoint values of the run's latest evaluation."""
    from inference.commands.store import read_arrays

    return read_arrays(run, json.loads((run / "eval.json").read_text()))


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """A one-layer VAE and a two-layer encoder, a few epochs on digits."""
    root = tmp_path_factory.mktemp("runs")
    vae = TrainConfig(epochs=3, hidden=[16], z_dim=3, batch_size=64)
    hvae = TrainConfig(model="hvae", layers=2, epochs=3, hidden=[16], z_dim=3, batch_size=64)
    train(vae, root / "vae", progress=False)
    train(hvae, root / "hvae", progress=False)
    return root


def test_sharded_evaluation_gives_the_numbers_of_one_process_bit_for_bit(small_runs, tmp_path):
    import shutil

    outputs = {}
    for nproc in (1, 2, 3):  # 250 datapoints in 7 batches of 40: uneven shares
        run = tmp_path / f"vae-{nproc}"
        shutil.copytree(small_runs / "vae", run)
        done = _torchrun("evaluate", str(run), "--k", "1,10,50", "--limit", "250", "--batch-size",
                         "40", "--ais", "--ais-temperatures", "10", "--ais-chains", "4",
                         "--seed", "7", "--no-progress", nproc=nproc)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("test split, 250 datapoints") == 1  # rank 0 alone prints
        outputs[nproc] = (_json_without(run / "eval.json", "run", "seconds", "peak_rss_mb",
                                        "provenance"),
                          _arrays(run))  # fmt: skip
    report, arrays = outputs[1]
    assert report["num_datapoints"] == 250 and arrays["iwae50"].shape == (250,)
    for nproc in (2, 3):
        assert outputs[nproc][0] == report  # every number in eval.json, exactly
        assert outputs[nproc][1].keys() == arrays.keys()
        for name, values in arrays.items():  # and every datapoint's, bit for bit
            assert outputs[nproc][1][name].tobytes() == values.tobytes(), name
    # The streams belong to the batches: another seed moves the numbers.
    other = tmp_path / "vae-seed8"
    shutil.copytree(small_runs / "vae", other)
    done = _torchrun("evaluate", str(other), "--k", "1,10,50", "--limit", "250", "--batch-size",
                     "40", "--seed", "8", "--no-progress", nproc=2)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (_arrays(other)["iwae50"] == arrays["iwae50"]).any()


def test_sharded_gaps_and_rbm_evaluate_give_the_numbers_of_one_process(
    small_runs, tmp_path, capsys
):
    import shutil

    from inference.contrastive import RBMConfig, train_rbm

    reports = {}
    for nproc in (1, 2):
        run = tmp_path / f"hvae-{nproc}"
        shutil.copytree(small_runs / "hvae", run)
        done = _torchrun("gaps", str(run), "--k", "50", "--inner-samples", "1,5", "--limit",
                         "90", "--batch-size", "40", "--no-progress", nproc=nproc)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("written") == 1
        reports[nproc] = _json_without(run / "gaps.json", "run", "provenance")
    assert reports[2] == reports[1]
    assert reports[1]["num_datapoints"] == 90 and "cremer" in reports[1]
    rbm = tmp_path / "rbm"
    train_rbm(RBMConfig(hidden=10, epochs=2), rbm, progress=False)
    args = ["--chains", "12", "--betas", "300", "--seed", "3"]
    assert main(["rbm", "evaluate", str(rbm), "--chains", "4", "--pieces", "5"]) == 1
    assert "--pieces must be between 1 and the 4 chains, got 5" in capsys.readouterr().err
    single = evaluate_rbm(rbm, *args, "--pieces", "3")
    assert single["ais_pieces"] == 3 and "exact" in single
    for nproc, pieces in ((2, "3"), (3, "3"), (2, "1")):
        done = _torchrun("rbm", "evaluate", str(rbm), *args, "--pieces", pieces, nproc=nproc)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("bracket") == 1
        report = _json_without(rbm / "rbm_eval.json", "run", "ais_seconds", "provenance")
        expected = single if pieces == "3" else evaluate_rbm(rbm, *args)
        assert report == expected


def evaluate_rbm(run: Path, *args: str) -> dict:
    """``rbm evaluate`` in one process (one thread, as the torchrun workers), its report."""
    done = _torchrun("rbm", "evaluate", str(run), *args, nproc=1)
    assert done.returncode == 0, done.stderr[-2000:]
    return _json_without(run / "rbm_eval.json", "run", "ais_seconds", "provenance")


def test_commands_that_run_in_one_process_refuse_torchrun_in_one_line(small_runs, capsys):
    os.environ["WORLD_SIZE"] = "2"  # what torchrun sets; no process group is joined
    try:
        code = main(["bdmc", str(small_runs / "vae"), "--points", "2", "--temperatures", "3"])
    finally:
        del os.environ["WORLD_SIZE"]
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("elbolab: error: bdmc runs in one process; launch it without torchrun")
    assert not (small_runs / "vae" / "bdmc.json").exists()


def test_resuming_with_another_number_of_processes_reproduces_or_says_it_will_not(tmp_path):
    """Trained by 2 processes, resumed by 1: the run's 2 pieces per batch are kept, and the
    parameters are those of an uninterrupted run. By 3: a warning, and config.json says so."""
    both = tmp_path / "uninterrupted"
    done = _torchrun("train", "--epochs", "3", "--out", str(both), *SMALL)
    assert done.returncode == 0, done.stderr[-2000:]
    for name, resume in (("one", None), ("three", 3)):
        part = tmp_path / name
        first = _torchrun("train", "--epochs", "2", "--out", str(part), *SMALL)
        assert first.returncode == 0, first.stderr[-2000:]
        if resume is None:
            assert main(["train", "--epochs", "3", "--resume", "--out", str(part), *SMALL]) == 0
            assert _same(_weights(part), _weights(both), atol=1e-6)
        else:
            again = _torchrun("train", "--epochs", "3", "--resume", "--out", str(part), *SMALL,
                              nproc=resume)  # fmt: skip
            assert again.returncode == 0, again.stderr[-2000:]
            assert again.stderr.count("will not equal an uninterrupted run") == 1
        status = json.loads((part / "config.json").read_text())["trained"]
        stretches = [(s["from_epoch"], s["to_epoch"], s["processes"], s["shards"])
                     for s in status["stretches"]]  # fmt: skip
        assert stretches == [(0, 2, 2, 2), (2, 3, resume or 1, resume or 2)]


def _launch(rank: int, port: int, args: list[str], queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ELBOLAB_DIST_TIMEOUT="30")  # fmt: skip
    import contextlib
    import io

    from inference.commands.cli import main as cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli(args)
    queue.put((rank, code, err.getvalue()))


@pytest.mark.parametrize(
    "differ", [("--k", "1,5", "1,10"), ("--seed", "0", "7"), ("--limit", "20", "30")]
)
def test_hand_launched_ranks_with_different_settings_stop_in_one_line(small_runs, differ):
    flag, mine, theirs = differ
    base = ["evaluate", str(small_runs / "vae"), "--no-progress"]
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_launch, args=(r, port, [*base, flag, (mine, theirs)[r]], queue))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, code, err in results:
        assert code == 1 and err.count("\n") == 1, (rank, err)
        shown = [v.split(",")[-1] for v in (mine, theirs)]  # --k 1,5 is shown as [1, 5]
        assert f"{flag}: rank 0 has" in err and all(v in err for v in shown), err
        assert "launch every rank with the same command" in err
