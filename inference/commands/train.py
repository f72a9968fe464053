"""``elbolab train``: a model trained by SVI into a run directory."""

from __future__ import annotations

import argparse

from ppl_models import MODELS

from .. import user_model
from ..data import DATASETS
from ..objectives import OBJECTIVES
from ..runs import TrainConfig
from ..svi import COMPILE_MIN_STEPS, train
from .flags import add_flags, config_from, int_list, train_from_args


def model_name(text: str) -> str:
    """A built-in model's name or a user factory's reference."""
    if text in MODELS or user_model.is_reference(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not one of {', '.join(MODELS)}, nor FILE.py:FACTORY or MODULE:FACTORY"
    )


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a :class:`~inference.runs.TrainConfig`; unset ones keep its defaults."""
    p.add_argument(
        "--model",
        type=model_name,
        help=f"model: {', '.join(MODELS)} (default vae), or your own factory, "
        "path/to/file.py:make_model or package.module:make_model",
    )
    p.add_argument("--data", choices=DATASETS, help="data set (default digits)")
    add_flags(p, "data_path")
    p.add_argument("--objective", choices=OBJECTIVES, help="training objective (default iwae)")
    p.add_argument("--num-particles", type=int, help="K, particles per datapoint (default 5)")
    p.add_argument("--epochs", type=int, help="epochs (default 20)")
    p.add_argument("--batch-size", type=int, help="minibatch size (default 128)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--hidden", type=int_list, help="hidden widths, e.g. 200,200")
    p.add_argument("--z-dim", type=int, help="latent dimension")
    p.add_argument("--activation", help="hidden nonlinearity (default tanh)")
    p.add_argument("--guide-type", choices=("exact", "diagonal"), help="linear-gaussian guide")
    p.add_argument("--layers", type=int, help="hvae: stochastic layers of the encoder (default 2)")
    p.add_argument(
        "--corruption",
        help="hvae: fixed first layer; images: salt-pepper:P, dropout:P or gaussian:S; "
        "text: word-dropout:P (uniform) or word-dropout-freq:ALPHA (rare words more often)",
    )
    p.add_argument("--min-count", type=int, help="text: fewer training occurrences are <unk> (2)")
    p.add_argument("--max-vocab", type=int, help="text: most frequent words kept (10000)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None,
        help="capture the training step once and compile it (inductor); default: compile runs "
        f"of at least {COMPILE_MIN_STEPS} minibatch steps, whose speed-up pays for the compilation",
    )  # fmt: skip
    add_flags(p, "seed", "device", seed=None, seed_shown=0, device=None, device_shown="cpu")
    add_flags(p, "no_progress")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model with SVI into a run directory")
    add_train_flags(p)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    add_flags(p, "overwrite")
    p.set_defaults(func=run, shared=True)


def run(args: argparse.Namespace) -> int:
    config = config_from(args, TrainConfig())
    last = train_from_args(train, config, args)
    if not last:  # another rank than 0 of a torchrun job
        return 0
    heldout = next(k for k in last if k.endswith("_elbo"))
    how = ", step compiled" if last.get("compiled") else ""
    print(
        f"trained {last['epoch']} epochs in {last['elapsed']:.1f} s{how}: training bound "
        f"{last['train_bound']:.3f}, {heldout.replace('_', ' ')} {last[heldout]:.3f} nats; "
        f"run in {args.out}"
    )
    return 0
