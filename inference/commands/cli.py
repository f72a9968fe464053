"""The ``elbolab`` command: one subcommand per module of :mod:`inference.commands`.

User mistakes (bad flags, missing files, bad data, a diverged run) end with a
one-line ``elbolab: error: ...`` message and a non-zero exit status, never a
traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..data import DataError
from ..runs import RunError
from ..user_model import ModelError
from . import compare, demo, diagnose, evaluate, experiment, gaps, rbm, train
from .flags import Parser

# In the order ``elbolab --help`` lists them.
COMMANDS = (train, evaluate, gaps, experiment, diagnose, compare, rbm, demo)
# TrainingDiverged is a RunError.
USER_ERRORS = (DataError, RunError, ModelError)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``elbolab`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"elbolab: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("elbolab: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
