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
    return parser


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
        code = args.func(args)
        distributed.shutdown(wait=True)
        return code
    except USER_ERRORS as err:
        print(f"elbolab: error: {err}", file=sys.stderr)
        return 1
    except PairError as err:  # a model the command cannot give a right number for
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


if __name__ == "__main__":
    sys.exit(main())
