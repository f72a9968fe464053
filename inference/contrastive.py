r"""Training RBMs by contrastive divergence: CD-k (Hinton 2002) and persistent CD (Tieleman 2008).

The log-likelihood gradient of an RBM is a difference of two expectations,

    d log p(v) / dW = E_data[v p(h|v)^T] - E_model[v p(h|v)^T],

and likewise for the biases. The negative phase is estimated with Gibbs
chains: CD-k starts them at the minibatch and runs k steps; PCD-k keeps one
persistent chain per minibatch row across updates. Updates use momentum and
L2 weight decay on W, as in Hinton's practical guide (2010). Gradients are
written directly (no autograd): the estimator is not the gradient of any
objective.

Three of an update's matrix products have a binary factor: p(h|v) of the
data and of the chains' visibles, and the statistics v^T p(h|v) of both
phases. On sparse data (binarized MNIST: 13% ones) they run over the
nonzeros alone, in compiled kernels (:mod:`inference.kernels`); the fourth,
p(v|h), has the chains' hidden samples as its binary factor, about a third
ones, and stays a dense product.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ppl_models.rbm import RBM, BernoulliStream, sample_bernoulli

from . import distributed, kernels
from .data import load_dataset
from .partition import exact_log_partition
from .runs import (
    RunConfig,
    RunError,
    prepare_run,
    read_checkpoint,
    read_config,
    restore_rng,
    rng_state,
)
from .training import Trainer, check_finite, choose_shards, fit

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["RBMConfig", "train_rbm"]

METHODS = ("cd", "pcd")
SCHEDULES = ("constant", "linear")
EXACT_METRIC_UNITS = 20
BINARY_DATASETS = ("digits", "binarized-mnist")
# Above this fraction of ones the sparse kernels lose to a dense product (crossover about 0.3
# for p(h|v) with 784 x 500 weights on a 2-core AVX2 machine; the statistics cross later).
SPARSE_DENSITY = 0.25


@dataclass
class RBMConfig(RunConfig):
    """Everything that defines an RBM training run (saved as ``config.json``).

    Examples
    --------
    >>> from inference import RBMConfig
    >>> RBMConfig(hidden=20, method="pcd", cd_steps=1).validate().method
    'pcd'
    """

    kind: ClassVar[str] = "rbm"
    data: str = "digits"
    data_path: str | None = None
    hidden: int = 20
    method: str = "pcd"
    cd_steps: int = 1
    epochs: int = 30
    batch_size: int = 20
    lr: float = 0.05
    momentum: float = 0.5
    weight_decay: float = 1e-4
    lr_schedule: str = "linear"
    seed: int = 0
    train_limit: int | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> RBMConfig:
        if self.data not in BINARY_DATASETS:
            raise RunError(
                f"--data {self.data!r}: an RBM needs binary data (digits, binarized-mnist)"
            )
        if self.method not in METHODS:
            raise RunError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        self.check_positive("hidden", "cd_steps", "epochs", "batch_size", "lr", "train_limit")
        if not 0 <= self.momentum < 1:
            raise RunError(f"--momentum must lie in [0, 1), got {self.momentum}")
        if self.lr_schedule not in SCHEDULES:
            raise RunError(
                f"--lr-schedule {self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}"
            )
        if self.weight_decay < 0:
            raise RunError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        return self


@torch.no_grad()
def reconstruction_error(rbm: RBM, v: torch.Tensor, *, hidden: torch.Tensor | None = None) -> float:
    """Mean squared error of p(v | h), h ~ p(h | v): one Gibbs step away from the data.

    ``hidden``: the logits of p(h|v), b_h + v W, where already computed.
    """
    hidden = rbm.hidden_logits(v) if hidden is None else hidden
    h = sample_bernoulli(torch.sigmoid(hidden))
    return float((torch.sigmoid(rbm.visible_logits(h)) - v).pow(2).sum(1).mean())


@torch.no_grad()
def pseudo_log_likelihood(
    rbm: RBM, v: torch.Tensor, *, hidden: torch.Tensor | None = None
) -> float:
    """Stochastic pseudo-log-likelihood per datapoint: one random unit flipped per row.

    n_visible * log sigmoid(F(v_flipped) - F(v)), the estimator scikit-learn's
    BernoulliRBM reports as ``score_samples``. Flipping unit i adds +-W_i to
    the hidden logits, so both free energies come from one product v W
    (``hidden``, b_h + v W, where already computed).
    """
    hidden = rbm.hidden_logits(v) if hidden is None else hidden
    idx = torch.randint(v.shape[1], (v.shape[0],))
    sign = 1 - 2 * v[torch.arange(v.shape[0]), idx]  # +1 where the flip turns the unit on
    flipped = torch.addcmul(hidden, sign[:, None], rbm.W[idx])
    softplus = torch.nn.functional.softplus
    gap = softplus(hidden).sum(-1) - softplus(flipped).sum(-1) - sign * rbm.b_v[idx]
    return float(rbm.n_visible * torch.nn.functional.logsigmoid(gap).mean())


@torch.no_grad()
def exact_log_likelihood(rbm: RBM, v: torch.Tensor) -> float:
    """Mean exact log p(v) = -F(v) - log Z (smaller layer must be enumerable)."""
    return float((-rbm.free_energy(v.double() if rbm.W.dtype == torch.float64 else v)).mean()) - (
        exact_log_partition(rbm)
    )


def contrastive_gradient(
    rbm: RBM,
    v: torch.Tensor,
    v_neg: torch.Tensor,
    *,
    ph_data: torch.Tensor | None = None,
    ph_neg: torch.Tensor | None = None,
) -> dict:
    """Positive minus negative phase: an estimate of d mean log p(v) / d(W, b_v, b_h).

    Unbiased when ``v_neg`` are exact model samples; CD-k's chains started at
    the data make it biased for small k. ``ph_data`` and ``ph_neg``, p(h=1|v)
    of the two phases, are computed when not given.
    """
    if ph_data is None:
        ph_data = torch.sigmoid(rbm.hidden_logits(v))
    if ph_neg is None:
        ph_neg = torch.sigmoid(rbm.hidden_logits(v_neg))
    return {
        "W": v.T @ ph_data / v.shape[0] - v_neg.T @ ph_neg / v_neg.shape[0],
        "b_v": v.mean(0) - v_neg.mean(0),
        "b_h": ph_data.mean(0) - ph_neg.mean(0),
    }


def learning_rate(config: RBMConfig, epoch: int) -> float:
    """The step size in ``epoch`` (0-based): constant, or decaying linearly towards 0."""
    if config.lr_schedule == "linear":
        return config.lr * (1 - epoch / config.epochs)
    return config.lr


def _cd_update(rbm, v, h_chains, config, velocity, lr: float, draw, sparse: bool = False):
    """One CD-k / PCD-k update in place; returns the persistent chains' new hidden states.

    A persistent chain's state is its hidden sample: each update continues it
    with k transitions v ~ p(v|h), h ~ p(h|v) under the current parameters
    (Tieleman 2008), so no product is spent re-deriving h from the chain's
    visibles. CD-k starts every chain at h ~ p(h|v_data). The negative phase
    uses p(h=1|v_neg) (Rao-Blackwellised). ``draw`` makes the binary samples
    (:meth:`~ppl_models.rbm.BernoulliStream.sample`). The update is
    ``contrastive_gradient`` (with weight decay on W) folded into the momentum
    buffers: vel <- momentum vel + lr grad, theta <- theta + vel, accumulated
    in place (the momentum as the statistics' ``beta``) so that the
    (n_visible, n_hidden) matrices are touched as few times as possible;
    without momentum the velocities stay zero and the step goes into the
    parameters directly, the weight decay as the ``beta``. ``sparse``: the
    products with a binary factor run over its nonzeros (:mod:`inference.kernels`).
    """
    ph_data, v_neg, ph, h = _phases(rbm, v, h_chains, config, draw, sparse)
    step_size = lr / v.shape[0]
    grad_b_v, grad_b_h = v.sum(0) - v_neg.sum(0), ph_data.sum(0) - ph.sum(0)
    if config.momentum == 0:  # no velocity: the step (and the decay, as beta) straight into W
        decay = 1 - lr * config.weight_decay
        _add_statistics(rbm.W, v, ph_data, v_neg, ph, beta=decay, alpha=step_size, sparse=sparse)
        rbm.b_v.add_(grad_b_v, alpha=step_size)
        rbm.b_h.add_(grad_b_h, alpha=step_size)
        return h
    _add_statistics(velocity["W"], v, ph_data, v_neg, ph, beta=config.momentum, alpha=step_size,
                    sparse=sparse)  # fmt: skip
    _step(rbm, grad_b_v, grad_b_h, config, velocity, lr, step_size)
    return h


def _hidden_input(rbm, v, sparse: bool) -> torch.Tensor:
    """b_h + v W, the logits of p(h=1|v); over v's nonzeros alone when ``sparse``."""
    if sparse:
        return kernels.sparse_times_dense(v, rbm.W, rbm.b_h)
    return torch.addmm(rbm.b_h, v, rbm.W)


def _add_statistics(target, v, ph_data, v_neg, ph, *, beta: float, alpha: float, sparse: bool):
    """target <- beta target + alpha (v^T p(h|v) - v_neg^T p(h|v_neg)): W's two phases."""
    if sparse:
        kernels.sparse_outer_add(target, v, ph_data, v_neg, ph, beta=beta, alpha1=alpha,
                                 alpha2=-alpha)  # fmt: skip
    else:
        target.addmm_(v.T, ph_data, beta=beta, alpha=alpha).addmm_(v_neg.T, ph, alpha=-alpha)


def _phases(rbm, v, h_chains, config, draw, sparse: bool = False):
    """Data and model phases: p(h|v_data), the negative visibles, p(h|v_neg), the chains' h."""
    ph_data = _hidden_input(rbm, v, sparse).sigmoid_()
    persistent = config.method == "pcd"
    h = h_chains if persistent else draw(ph_data)
    for step in range(config.cd_steps):
        v_neg = draw(torch.addmm(rbm.b_v, h, rbm.W.T).sigmoid_())
        ph = _hidden_input(rbm, v_neg, sparse).sigmoid_()
        if persistent or step + 1 < config.cd_steps:
            h = draw(ph)
    return ph_data, v_neg, ph, h


def _step(rbm, grad_b_v, grad_b_h, config, velocity, lr: float, step_size: float) -> None:
    """Weight decay, the bias velocities and the parameter step (velocity["W"] holds its grad)."""
    if config.weight_decay:
        velocity["W"].add_(rbm.W, alpha=-lr * config.weight_decay)
    velocity["b_v"].mul_(config.momentum).add_(grad_b_v, alpha=step_size)
    velocity["b_h"].mul_(config.momentum).add_(grad_b_h, alpha=step_size)
    for name in ("W", "b_v", "b_h"):
        getattr(rbm, name).add_(velocity[name])


def _cd_update_sharded(rbm, x, chains, pieces, config, velocity, lr: float, *, world, sparse):
    """:func:`_cd_update` on a global batch ``x`` of which this rank computes ``pieces``.

    ``pieces`` are (row positions, seed) of the batch's pieces that this rank
    takes (:func:`~inference.distributed.my_pieces`), each with its data rows,
    its persistent chains and its own seed. Their statistics are summed, over
    the pieces and then over the ranks (one all-reduce, which also brings
    every rank every chain's new state), and every rank takes the same step,
    the one a single process with the same pieces takes.
    """
    batch = len(x)
    grad_w = torch.zeros_like(rbm.W)
    grad_b_v, grad_b_h = torch.zeros_like(rbm.b_v), torch.zeros_like(rbm.b_h)
    new_chains = torch.zeros_like(chains[:batch])
    for piece, seed in pieces:
        v = x[piece]
        draw = BernoulliStream(seed).sample
        ph_data, v_neg, ph, h = _phases(rbm, v, chains[piece], config, draw, sparse)
        _add_statistics(grad_w, v, ph_data, v_neg, ph, beta=1.0, alpha=1.0, sparse=sparse)
        grad_b_v += v.sum(0) - v_neg.sum(0)
        grad_b_h += ph_data.sum(0) - ph.sum(0)
        new_chains[piece] = h
    if world.active:
        distributed.all_reduce_sum([grad_w, grad_b_v, grad_b_h, new_chains])
    step_size = lr / batch
    velocity["W"].mul_(config.momentum).add_(grad_w, alpha=step_size)
    _step(rbm, grad_b_v, grad_b_h, config, velocity, lr, step_size)
    return new_chains


def train_rbm(
    config: RBMConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    shards: int | None = None,
    sparse_kernels: bool | None = None,
) -> RBM:
    """Train an RBM with CD-k or PCD-k, writing a run directory like ``elbolab train``.

    Under torchrun the ranks share each global batch (``shards`` pieces, by
    default one per process, as in :func:`inference.svi.train`): their
    contrastive statistics are summed and every rank takes the same step.

    Per epoch, ``metrics.jsonl`` gets the reconstruction error and the
    pseudo-log-likelihood of the held-out split, and its exact log-likelihood
    when the smaller layer has at most 20 units, and the seconds of the
    epoch's updates alone (``update_seconds``; ``seconds`` counts these
    measurements too); the checkpoint holds the
    parameters, momentum buffers, persistent chains and random states.

    ``sparse_kernels``: run the products with a binary factor over its
    nonzeros (:mod:`inference.kernels`); by default when the training data
    have at most ``SPARSE_DENSITY`` ones and the kernels build, with a
    warning when they do not; True insists (an error where they cannot
    run), False keeps torch's dense products. The two paths agree to float
    rounding, which the Gibbs chains then amplify: same seed, same numbers
    holds within a path, and a resume should keep the path.

    Raises
    ------
    TrainingDiverged
        When a parameter becomes NaN or infinite; the last good checkpoint stays.

    Examples
    --------
    >>> import tempfile
    >>> from inference import RBMConfig, train_rbm
    >>> out = tempfile.mkdtemp() + "/rbm"
    >>> rbm = train_rbm(RBMConfig(hidden=4, epochs=1), out, progress=False)
    >>> rbm.W.shape
    torch.Size([64, 4])
    """
    out = Path(out)
    world = distributed.current()
    shards = choose_shards(out, world, shards, resume)
    if shards < world.size:
        raise ValueError(f"shards={shards} is fewer than the {world.size} processes")
    config.validate()
    config = distributed.on_main(
        world, lambda: prepare_run(config, out, resume, overwrite=overwrite)
    )
    torch.manual_seed(config.seed)
    dataset = load_dataset(config.data, path=config.data_path)
    x_train = dataset.split("train")[: config.train_limit]
    x_heldout = dataset.split(dataset.heldout_split).contiguous()
    rbm = RBM(dataset.x_dim, config.hidden).requires_grad_(False)
    # Filled in place, so that the closures below see what a resume restores.
    run = {
        "velocity": {name: torch.zeros_like(p) for name, p in rbm.named_parameters()},
        "hidden_chains": sample_bernoulli(torch.full((config.batch_size, config.hidden), 0.5)),
    }
    shuffle = torch.Generator().manual_seed(config.seed)
    bernoulli = BernoulliStream(config.seed)  # the Gibbs steps' draws
    num_data = x_train.shape[0]
    exact = min(rbm.n_visible, rbm.n_hidden) <= EXACT_METRIC_UNITS
    sparse = _use_sparse_kernels(sparse_kernels, x_train, rbm)

    def start(state: dict | None) -> None:
        if state is None:
            with torch.no_grad():  # visible biases at the data's log-odds (Hinton 2010, section 8)
                p = x_train.mean(0).clamp(1e-3, 1 - 1e-3)
                rbm.b_v.copy_(torch.log(p) - torch.log1p(-p))
            return
        rbm.load_state_dict(state["model"])
        run["velocity"], run["hidden_chains"] = state["velocity"], state["hidden_chains"]
        restore_rng(state["rng"], shuffle)
        if "bernoulli" in state:  # checkpoints older than the stream continue from the seed's
            bernoulli.set_state(state["bernoulli"])

    @torch.no_grad()
    def epoch(index: int, bar) -> dict:
        chains, lr = run["hidden_chains"], learning_rate(config, index)
        order = torch.randperm(num_data, generator=shuffle)
        velocity = run["velocity"]
        tic = time.perf_counter()
        for step, begin in enumerate(range(0, num_data, config.batch_size)):
            rows = order[begin : begin + config.batch_size]
            x = x_train.index_select(0, rows)
            if shards > 1:  # pieces of the batch, each with its own seed
                pieces = [
                    (piece, distributed.batch_seed(config.seed, index, step, i))
                    for i, piece in distributed.my_pieces(world, len(rows), shards)
                ]
                new = _cd_update_sharded(rbm, x, chains, pieces, config, velocity, lr,
                                         world=world, sparse=sparse)  # fmt: skip
            else:
                new = _cd_update(rbm, x, chains[: len(rows)], config, velocity, lr,
                                 bernoulli.sample, sparse)  # fmt: skip
            if config.method == "pcd":
                chains[: len(rows)] = new
            bar.update(1)
        updates = time.perf_counter() - tic
        for name, param in rbm.named_parameters():
            check_finite(param, out, index, f"the RBM's {name} is not finite")
        if not world.is_main:  # rank 0 alone measures and writes
            return {}
        hidden = _hidden_input(rbm, x_heldout, sparse)  # shared by both metrics
        row = {
            "method": f"{config.method}-{config.cd_steps}",
            "reconstruction_error": reconstruction_error(rbm, x_heldout, hidden=hidden),
            "pseudo_log_likelihood": pseudo_log_likelihood(rbm, x_heldout, hidden=hidden),
            "update_seconds": updates,  # the epoch's updates alone, without these metrics
            "products": "sparse" if sparse else "dense",
        }
        if exact:
            row["exact_log_likelihood"] = exact_log_likelihood(rbm, x_heldout)
        return row

    def state() -> dict:
        rng = rng_state(shuffle, torch.device("cpu"))
        return {"model": rbm.state_dict(), **run, "rng": rng, "bernoulli": bernoulli.state}

    steps = math.ceil(num_data / config.batch_size)
    trainer = Trainer(start, epoch, state, steps, f"rbm/{config.method}-{config.cd_steps}")
    fit(trainer, config, out, resume=resume, progress=progress, world=world, shards=shards)
    return rbm


def _use_sparse_kernels(request: bool | None, x_train: torch.Tensor, rbm: RBM) -> bool:
    """Whether this run's products with a binary factor go through :mod:`inference.kernels`.

    By default (``request`` None) when the data are sparse enough and the RBM
    is float32, with a warning when the kernels cannot be built; True insists.
    """
    if request is False:
        return False
    if request is None:
        sparse = bool(x_train.numel()) and float(x_train.mean()) <= SPARSE_DENSITY
        if not sparse or rbm.W.dtype != torch.float32:
            return False
        if kernels.available():
            return True
        warnings.warn(f"elbolab: sparse kernels unavailable ({kernels.unavailable_reason()}); "
                      "using dense products", RuntimeWarning, stacklevel=3)  # fmt: skip
        return False
    if rbm.W.dtype != torch.float32:
        raise RunError(f"sparse kernels requested, but the RBM is {rbm.W.dtype}, not float32")
    if not kernels.available():
        raise RunError(f"sparse kernels requested, but they could not be built "
                       f"({kernels.unavailable_reason()})")  # fmt: skip
    return True


def load_rbm_run(run_dir: str | Path) -> tuple[RBMConfig, object, RBM]:
    """Configuration, data set and trained RBM of an ``elbolab rbm train`` run."""
    config = read_config(run_dir, RBMConfig)
    dataset = load_dataset(config.data, path=config.data_path)
    rbm = RBM(dataset.x_dim, config.hidden).requires_grad_(False)
    state, identity = read_checkpoint(run_dir)
    rbm.load_state_dict(state["model"])
    rbm.elbolab_checkpoint = identity  # what reports computed from it record
    return config, dataset, rbm
