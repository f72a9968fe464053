"""The argparse pieces every command shares.

One-line errors, list types, the common and AIS flags, and running a
trainer from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from .. import distributed
from ..ais import SCHEDULES
from ..runs import RunError, is_elbolab_run, read_config, read_metrics, run_files_in


class Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other user mistake."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_list(text: str, *, minimum: int = 1) -> list[int]:
    """``"1,10,100"`` -> ``[1, 10, 100]``; every value at least ``minimum``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise argparse.ArgumentTypeError(f"expected {kind} integers, got {text!r}")
    return values


def nonnegative_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: non-negative integers (seeds, datapoint indices)."""
    return int_list(text, minimum=0)


# name -> (flag, argparse keywords); ``add_flags`` may override the default.
_COMMON = {
    "seed": ("--seed", dict(type=int, default=0, help="random seed (default {default})")),
    "split": ("--split", dict(default="test", help="data split (default {default})")),
    "limit": ("--limit", dict(type=int, help="only the first N datapoints of the split")),
    "every": (
        "--every",
        dict(
            type=int,
            default=1,
            help="every K-th datapoint of the split, from the first (before --limit): a "
            "subset spread over a split stored in order, e.g. MNIST's test set, by digit",
        ),
    ),
    "batch_size": (
        "--batch-size",
        dict(type=int, default=100, help="datapoints per pass (default {default})"),
    ),
    "data_path": (
        "--data-path",
        dict(
            help="binarized MNIST .npz or .amat folder (or ELBOLAB_DATA); uci-bow: a "
            "docword file or its folder; text-folder: a folder of .txt files"
        ),
    ),
    "device": ("--device", dict(default="cpu", help="torch device (default {default})")),
    "no_progress": ("--no-progress", dict(action="store_true", help="hide the progress bars")),
    "overwrite": (
        "--overwrite",
        dict(
            action="store_true",
            help="replace an earlier run in --out: only the files elbolab wrote are removed",
        ),
    ),
}


def add_flags(parser: argparse.ArgumentParser, *names: str, **defaults) -> None:
    """Add the common flags ``names`` (keys of ``_COMMON``), with ``defaults`` overriding.

    A default of ``None`` leaves the value to the run's configuration; the
    help text then names ``shown`` (the configuration's default).
    """
    for name in names:
        flag, options = _COMMON[name]
        options = dict(options)
        if name in defaults:
            options["default"] = defaults[name]
        shown = defaults.get(f"{name}_shown", options.get("default"))
        options["help"] = options["help"].format(default=shown)
        parser.add_argument(flag, **options)


def datapoints(data: torch.Tensor, *, limit: int | None, every: int = 1) -> torch.Tensor:
    """Every ``every``-th datapoint of ``data`` from the first, then the first ``limit``."""
    if limit is not None and limit < 1:
        raise RunError(f"--limit must be >= 1, got {limit}")
    if every < 1:
        raise RunError(f"--every must be >= 1, got {every}")
    return data[::every][:limit]


def spread(num: int, every: int) -> str:
    """A report's datapoints in words: ``"100 datapoints"``, ``"100 datapoints (every 10th)"``."""
    if every == 1:
        return f"{num} datapoints"
    last = every % 10 if every % 100 not in (11, 12, 13) else 0
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(last, "th")
    return f"{num} datapoints (every {every}{suffix})"


def add_ais_flags(parser: argparse.ArgumentParser) -> None:
    """The settings of annealed importance sampling (see :mod:`inference.ais`)."""
    group = parser.add_argument_group("AIS (annealed importance sampling with HMC)")
    group.add_argument("--ais-chains", type=int, default=16, help="chains per datapoint (16)")
    group.add_argument("--ais-temperatures", type=int, default=1000,
                       help="temperatures from the guide to the posterior (1000)")  # fmt: skip
    group.add_argument("--ais-leapfrog", type=int, default=10, help="leapfrog steps per HMC (10)")
    group.add_argument("--ais-schedule", choices=SCHEDULES, default="sigmoid",
                       help="spacing of the temperatures (sigmoid)")  # fmt: skip
    group.add_argument("--ais-compile", action=argparse.BooleanOptionalAction, default=None,
                       help=AIS_COMPILE_HELP)  # fmt: skip


AIS_COMPILE_HELP = (
    "record the model's evaluation once and compile it (inductor); default: compile when "
    "temperatures x leapfrog steps >= 5000"
)


def ais_settings(args: argparse.Namespace) -> dict:
    """The AIS flags as keyword arguments of :func:`inference.ais.annealed_log_marginal`."""
    for flag in ("ais_chains", "ais_temperatures", "ais_leapfrog"):
        if getattr(args, flag) < 1:
            raise RunError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return {
        "num_chains": args.ais_chains,
        "num_temperatures": args.ais_temperatures,
        "leapfrog_steps": args.ais_leapfrog,
        "schedule": args.ais_schedule,
        "compile": args.ais_compile,
    }


def train_from_args(trainer: Callable, config, args: argparse.Namespace) -> dict:
    """``trainer(config, --out)`` with --resume, --overwrite and progress from ``args``.

    Says which files --overwrite removed; returns the last line of metrics.jsonl.
    """
    out, overwrite = Path(args.out), getattr(args, "overwrite", False)
    main = distributed.current(getattr(config, "device", "cpu")).is_main
    removed = (
        [str(p.relative_to(out)) for p in run_files_in(out)]
        if overwrite and is_elbolab_run(out)
        else []
    )
    trainer(config, out, resume=getattr(args, "resume", False), overwrite=overwrite,
            progress=not args.no_progress)  # fmt: skip
    if not main:  # under torchrun rank 0 alone reports
        return {}
    if removed:
        print(f"--overwrite: removed {', '.join(removed)} from {out}")
    return read_metrics(out)[-1]


def config_from(args: argparse.Namespace, config):
    """``config`` with every field that was given on the command line replaced.

    With ``--resume`` the run's own configuration stands in for ``config``'s
    defaults, so that ``--resume --out RUN`` continues RUN as it was trained
    (a flag given changes its field, and ``prepare_run`` refuses any change
    but those a resume allows).
    """
    saved = Path(getattr(args, "out", None) or ".") / "config.json"
    if getattr(args, "resume", False) and saved.is_file():
        try:
            config = read_config(saved.parent, type(config))
        except RunError:
            pass  # reported, with its reason, when the run is prepared
    for field in dataclasses.fields(config):
        value = getattr(args, field.name, None)
        if value is not None:
            setattr(config, field.name, value)
    return config
