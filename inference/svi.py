"""The training loop: minibatch SVI with any objective, atomic checkpoints and exact resume.

Each epoch shuffles the training split with a dedicated generator, takes one
Adam step per minibatch on ``objective.differentiable_loss(model.model,
model.guide, x_batch, num_data=N)``, evaluates the held-out ELBO, appends a
line to ``metrics.jsonl`` and writes a checkpoint that holds the parameters,
the optimiser state and both random states. Resuming from it therefore
reproduces an uninterrupted run with the same seed exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from . import distributed, user_model
from .bounds import elbo_bound
from .compiled import CompiledStep, warm_up
from .objectives import make_objective
from .runs import (
    TrainConfig,
    build,
    check_device,
    load_weights,
    prepare_run,
    restore_rng,
    rng_state,
)
from .tracing import guess_max_plate_nesting, log_importance_weights
from .training import Trainer, TrainingDiverged, check_finite, choose_shards, fit

__all__ = [
    "TrainingDiverged", "heldout_elbo", "make_optimizer", "train", "worth_compiling",
    "worth_replaying",
]  # fmt: skip

COMPILE_MIN_STEPS = 3000  # full minibatches in a run from which compiling is the default
REPLAY_MIN_STEPS = 500  # ... from which an eager run replays its captured step
REPLAY_MAX_PARTICLES = 10  # ... up to this K


@torch.no_grad()
def heldout_elbo(model, x: torch.Tensor, *, batch_size: int = 1000) -> float:
    """Single-sample ELBO averaged over ``x`` (nats per datapoint)."""
    total, nesting = 0.0, None
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        if nesting is None:  # one dry run for the model's plates, not one per batch
            nesting = guess_max_plate_nesting(model.model, model.guide, (xb,), {})
        log_w = log_importance_weights(model.model, model.guide, xb, num_particles=1,
                                       max_plate_nesting=nesting)  # fmt: skip
        total += float(elbo_bound(log_w).value.sum())
    return total / x.shape[0]


def worth_compiling(config: TrainConfig, num_data: int) -> bool:
    """Whether a run compiles its step when ``--compile``/``--no-compile`` is not given.

    Compilation costs about 2.5 s with inductor's on-disk cache warm and 8-14 s
    when cold (the first run on a machine), and saves 2-4 ms per step at
    K = 1-5 and about 35 ms at K = 50 on the 784-200-200-50 VAE at batch 128
    (``benchmarks/bench_train_step.py``): it pays from a few thousand steps.
    Runs of at least :data:`COMPILE_MIN_STEPS` full minibatches compile; the
    shorter ones (tests, the digits demo) stay eager.
    """
    return _full_steps(config, num_data) >= COMPILE_MIN_STEPS


def worth_replaying(config: TrainConfig, num_data: int) -> bool:
    """Whether an eager run replays its captured step (:class:`~inference.compiled.CompiledStep`).

    The replay computes the eager step's numbers bit for bit, without Pyro's
    per-step Python work (``benchmarks/bench_train_step.py``, 784-200-200-50
    VAE: 15-20% of the step at K = 1, 3-23% at K = 5); the capture costs a
    fraction of a second once, so runs of at least :data:`REPLAY_MIN_STEPS`
    full minibatches use it. At K = 50 the step is the arithmetic and the
    replay measured 4-8% slower than eager, so above
    :data:`REPLAY_MAX_PARTICLES` particles the step stays eager.
    """
    steps = _full_steps(config, num_data)
    return steps >= REPLAY_MIN_STEPS and config.num_particles <= REPLAY_MAX_PARTICLES


def _full_steps(config: TrainConfig, num_data: int) -> int:
    """The run's steps on full minibatches (an epoch's last, smaller one runs eagerly)."""
    return config.epochs * (num_data // config.batch_size)


def make_optimizer(model: torch.nn.Module, *, lr: float) -> torch.optim.Optimizer:
    """Adam; the fused implementation where the device has one (same update, fewer kernels)."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(model.parameters(), lr=lr)


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
    shards: int | None = None,
) -> torch.nn.Module:
    """Train ``config``'s model on its data, writing the run directory ``out``.

    Parameters
    ----------
    config : TrainConfig
        What to train; validated here.
    out : path-like
        Run directory (created).
    resume : bool
        Continue the run in ``out`` from its checkpoint up to ``config.epochs``.
    overwrite : bool
        Replace an earlier run in ``out``: the files elbolab wrote there are
        removed, nothing else (see :func:`~inference.runs.prepare_run`).
    progress : bool
        Show a progress bar.
    on_step : callable, optional
        Called as ``on_step(epoch, step, loss)`` after every step (for tests).
    shards : int, optional
        Pieces each global minibatch is split into (default: the number of
        processes, see :mod:`inference.distributed`). With more than one,
        piece s of step t draws its random numbers from a seed of (seed,
        epoch, t, s), its loss is weighted by its share of the batch, and the
        gradients of all pieces are summed before the step: the gradient of
        the whole batch, whichever process computes which piece. So a run of
        2 processes equals a single process with ``shards=2``.

    Returns
    -------
    torch.nn.Module
        The trained model.

    Raises
    ------
    TrainingDiverged
        When a loss is NaN or infinite. Parameters from the last completed
        epoch stay in ``out/checkpoint.pt``.

    Examples
    --------
    >>> import tempfile
    >>> from inference import TrainConfig, train
    >>> out = tempfile.mkdtemp() + "/run"
    >>> config = TrainConfig(epochs=1, hidden=[8], z_dim=2, batch_size=512)
    >>> model = train(config, out, progress=False)
    >>> sorted(p.name for p in __import__("pathlib").Path(out).iterdir())[:3]
    ['checkpoint.pt', 'config.json', 'metrics.jsonl']
    """
    out = Path(out)
    config.validate()
    world = distributed.current(config.device)
    shards = choose_shards(out, world, shards, resume)
    if shards < world.size:
        raise ValueError(f"shards={shards} is fewer than the {world.size} processes")
    if user_model.is_reference(config.model):
        config.model = user_model.resolve(config.model)
    config = distributed.on_main(world, lambda: prepare_run(
        config, out, resume, overwrite=overwrite, changeable=("epochs", "device", "compile")
    ))  # fmt: skip
    if user_model.is_reference(config.model):
        if resume:
            user_model.check_unchanged(config.model, config.model_sha256, run_dir=out,
                                       recorded_files=config.model_files)  # fmt: skip
        else:
            config.model_sha256 = user_model.digest(config.model)
            config.model_files = user_model.file_digests(config.model)
    if config.compile and shards == 1:
        warm_up()  # given or resumed: while the data loads and the model is built
    elif config.compile and world.is_main:
        warnings.warn(
            "the step is eager when the batch is split into pieces (torchrun): "
            "--compile applies to a single process",
            RuntimeWarning,
            stacklevel=2,
        )
    check_device(config.device)
    device = torch.device(config.device)
    pyro.set_rng_seed(config.seed)  # before the model's initialisation
    dataset, model = build(config)
    model.to(device)
    x_train = dataset.split("train").to(device)
    x_heldout = dataset.split(dataset.heldout_split).to(device)
    num_data = x_train.shape[0]
    optimizer = make_optimizer(model, lr=config.lr)
    objective = make_objective(config.objective, num_particles=config.num_particles)
    shuffle = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(num_data / config.batch_size)
    if config.compile is None:  # decided once, for a new run; config.json records it
        config.compile = shards == 1 and worth_compiling(config, num_data)
        if config.compile:
            warm_up()
    # Pyro's own examples write model(x) and guide(x): N/B scaling only where they take it.
    takes_num_data = all(user_model.accepts(f, "num_data") for f in (model.model, model.guide))
    scale_kwargs = {"num_data": num_data} if takes_num_data else {}

    def start(state: dict | None) -> None:
        if state is None:
            if hasattr(model, "init_from_data"):
                model.init_from_data(x_train)
            if world.active:
                distributed.broadcast_parameters(model)
            return
        load_weights(model, state["model"], out)
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"], shuffle)
        if world.active:  # the same start on every rank, whatever each one read
            distributed.broadcast_parameters(model)

    # One process: the step captured for the full minibatch's shape, compiled or replayed.
    stepper = None
    if shards == 1 and (config.compile or worth_replaying(config, num_data)):
        backend = "inductor" if config.compile else "replay"
        stepper = CompiledStep(model, objective, scale_kwargs, backend=backend)

    def sharded_loss(index: int, step: int, rows: torch.Tensor) -> torch.Tensor:
        """The batch's loss with the gradient of the whole batch, from this rank's pieces."""
        total = torch.zeros((), device=device)
        for s, piece in distributed.my_pieces(world, len(rows), shards):
            torch.manual_seed(distributed.batch_seed(config.seed, index, step, s))
            xb = x_train[rows[piece]]
            loss = objective.differentiable_loss(model.model, model.guide, xb, **scale_kwargs)
            if takes_num_data:  # scaled by N/b for the piece: N/B for the batch
                loss = loss * (len(piece) / len(rows))
            loss.backward()
            total += loss.detach()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world.active:
            distributed.all_reduce_sum([*(p.grad for p in params), total])
        return total

    def epoch(index: int, bar) -> dict:
        order = torch.randperm(num_data, generator=shuffle).to(device)
        total = 0.0
        for step, begin in enumerate(range(0, num_data, config.batch_size)):
            rows = order[begin : begin + config.batch_size]
            optimizer.zero_grad(set_to_none=True)
            if shards > 1:
                loss = sharded_loss(index, step, rows)
            elif stepper is not None:  # loss and gradients in one compiled call
                loss = stepper(x_train[rows])
            else:
                xb = x_train[rows]
                loss = objective.differentiable_loss(model.model, model.guide, xb, **scale_kwargs)
            value = float(loss.detach())
            check_finite(value, out, index, f"the {config.objective} loss is {value}", step=step)
            if shards == 1 and stepper is None:
                loss.backward()
            optimizer.step()
            # per datapoint: the loss estimates N times it when scaled, B times it when not
            total += value / (num_data if takes_num_data else len(rows))
            if on_step is not None:
                on_step(index, step, loss)
            bar.update(1)
        if not world.is_main:  # rank 0 alone measures and writes
            return {}
        model.eval()
        if shards > 1:  # the held-out draws too belong to the epoch, not to the process
            torch.manual_seed(distributed.batch_seed(config.seed, index, steps_per_epoch))
        heldout = heldout_elbo(model, x_heldout)
        model.train()
        bound = -total / steps_per_epoch
        bar.set_postfix(bound=f"{bound:.2f}", heldout=f"{heldout:.2f}")
        row = {
            "objective": config.objective,
            "num_particles": config.num_particles,
            "train_bound": bound,
            f"{dataset.heldout_split}_elbo": heldout,
        }
        if stepper is not None:
            row["compiled" if stepper.backend == "inductor" else "replayed"] = (
                stepper.fallback is None
            )
            row["compile_seconds"] = stepper.compile_seconds
            stepper.compile_seconds = 0.0  # reported in the epoch that paid it
        return row

    def state() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_state(shuffle, device),
        }

    trainer = Trainer(start, epoch, state, steps_per_epoch, f"{config.model}/{config.objective}")
    model.train()
    with pyro.validation_enabled(False):
        fit(trainer, config, out, resume=resume, progress=progress, world=world, shards=shards)
    return model.eval()
