"""The ``elbolab`` command: one subcommand per module of :mod:`inference.commands`.

User mistakes (bad flags, missing files, bad data, a diverged run) end with a
one-line ``elbolab: error: ...`` message and a non-zero exit status, never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

from .. import distributed
from ..data import DataError
from ..distributed import DistributedError
from ..inspection import PairError
from ..runs import RunError
from ..user_model import ModelError
from . import bdmc, compare, demo, diagnose, evaluate, evidence, experiment, gaps, rbm, train
from .flags import Parser

# In the order ``elbolab --help`` lists them.
COMMANDS = (train, evaluate, gaps, bdmc, evidence, experiment, diagnose, compare, rbm, demo)
# TrainingDiverged is a RunError.
USER_ERRORS = (DataError, RunError, ModelError, DistributedError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="elbolab",
        description="Train Pyro models and measure their bounds: ELBO, IWAE-K, log p(x).",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )
    for command in COMMANDS:
        command.add_parser(sub)
    parser.add_argument("--version", action="version", version=version())
    for command in _leaf_parsers(sub):
        command.add_argument(
            "--threads", type=_threads, default=None,
            help="torch threads in this process (default: torch's; under torchrun the cores "
            "divided among the processes of the machine)",
        )  # fmt: skip
        command.add_argument("--debug", action="store_true",
                             help="on an error, also print its traceback")  # fmt: skip
    return parser


def version() -> str:
    """elbolab's version and the versions it runs on."""
    import pyro
    import torch

    from .. import __version__

    return f"elbolab {__version__} (torch {torch.__version__}, pyro {pyro.__version__})"


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of threads, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 thread, got {value}")
    return value


def _leaf_parsers(sub) -> list[argparse.ArgumentParser]:
    """The parsers of every command and nested command (``rbm train``)."""
    found = []
    for parser in dict.fromkeys(sub.choices.values()):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        found += _leaf_parsers(nested[0]) if nested else [parser]
    return found


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads``, else under torchrun the machine's cores shared among its processes."""
    import torch

    threads = getattr(args, "threads", None)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if threads is None and local > 1:
        threads = max(1, (os.cpu_count() or 1) // local)
    if threads is not None:
        torch.set_num_threads(threads)


def _same_command(args: argparse.Namespace) -> None:
    """Under torchrun: every rank checks that all were launched with the same arguments."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    world = distributed.current(getattr(args, "device", None) or "cpu")
    settings = {k: repr(v) for k, v in sorted(vars(args).items()) if k not in ("func", "debug")}
    distributed.agree(world, settings)


def _check_launch(args: argparse.Namespace) -> None:
    """Under torchrun, only the commands that share their work among processes run."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not getattr(args, "shared", False):
        name = " ".join(filter(None, (args.command, getattr(args, "rbm_command", None))))
        raise RunError(
            f"{name} runs in one process; launch it without torchrun (WORLD_SIZE={size}). "
            "train, evaluate, gaps, rbm train and rbm evaluate share their work among processes"
        )


def _terminated(signum, frame):
    raise KeyboardInterrupt


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """elbolab's own warnings as the command's one line; others (a library's) say where."""
    if filename.startswith(str(Path(__file__).resolve().parents[1])):
        return f"elbolab: warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``elbolab`` console script.

    SIGTERM stops a command as Ctrl-C does: files are written atomically, so
    what was written stays whole, and training says how to resume.
    """
    args = build_parser().parse_args(argv)
    previous_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
    try:
        _check_launch(args)
        _set_threads(args)
        _same_command(args)
        code = args.func(args)
        distributed.shutdown(wait=True)
        return code
    except USER_ERRORS as err:
        _traceback_if(args, err)
        print(f"elbolab: error: {err}", file=sys.stderr)
        return 1
    except PairError as err:  # a model the command cannot give a right number for
        _traceback_if(args, err)
        print(f"elbolab: error: {err.for_command()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        detail = str(err) or "interrupted; files already written are kept"
        print(f"elbolab: {detail}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = previous_format
        distributed.shutdown()  # under torchrun: leave the process group
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _traceback_if(args: argparse.Namespace, err: BaseException) -> None:
    """With ``--debug``, the error's traceback (and its cause's: a user factory's own)."""
    if getattr(args, "debug", False):
        traceback.print_exception(err, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
