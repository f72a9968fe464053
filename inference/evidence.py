r"""Model evidence log p(D) by AIS, bracketed by BDMC, and Bayes factors between models.

For a Bayesian model whose latents are global (``plate=None``), AIS from the
prior (or a guide) to the posterior gives an unbiased estimate of p(D), so
the log of its mean over chains is a stochastic lower bound on the log
evidence (:func:`inference.ais.annealed_log_marginal`). How far it may be
from the truth is measured where the truth is reachable: on a data set
simulated from the model at the same arguments, reverse AIS from the latents
that generated it gives a stochastic upper bound (BDMC, Grosse et al. 2015);
the bracket's width at the same schedule is the trust measure printed beside
the evidence.

The log Bayes factor of model a against model b on the same data is
log p(D | a) - log p(D | b); the two estimates are independent, so its
standard error is the root sum of their squares. A bracket wider than the
difference says that the comparison is not yet decided by the computation.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .ais import MIN_ACCEPTANCE, TARGET_CESS, annealed_log_marginal, bdmc_joint
from .data import DataError, check_npz

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["log_evidence", "bayes_factors", "Evidence"]


@dataclass(frozen=True)
class Evidence:
    """The log evidence of one model on one data set, with how far it can be trusted.

    ``log_evidence``/``stderr``: AIS (delta method over chains);
    ``temperatures`` the schedule's length, ``acceptance`` HMC's mean rate;
    ``lower``/``upper`` (with their s.e.) and ``gap``/``gap_stderr`` the BDMC
    bracket on data simulated from the model at the same schedule (None
    without BDMC); ``seconds`` the time of both; ``tolerance`` the gap (nats)
    below which the bracket counts as closed.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def coin(flips):
    ...     p = pyro.sample("p", dist.Beta(2.0, 3.0))
    ...     with pyro.plate("data", len(flips)):
    ...         pyro.sample("flips", dist.Bernoulli(p), obs=flips)
    >>> flips = torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0])
    >>> from inference import Evidence, log_evidence
    >>> found = log_evidence(coin, None, flips, num_chains=8, num_temperatures=50,
    ...                      schedule="sigmoid", bdmc=False)
    >>> isinstance(found, Evidence), found.temperatures
    (True, 50)
    """

    log_evidence: float
    stderr: float
    temperatures: int
    acceptance: float
    seconds: float
    lower: float | None = None
    lower_stderr: float | None = None
    upper: float | None = None
    upper_stderr: float | None = None
    gap: float | None = None
    gap_stderr: float | None = None

    tolerance: float = 0.1

    @property
    def converged(self) -> bool:
        """Whether the chains moved and, with BDMC, the bracket is surely within ``tolerance``.

        Surely: the gap plus two of its standard errors (a bracket too noisy
        to tell is not a closed one), and the gap not below zero beyond its
        error (an upper bound under the lower one). With one temperature
        (nothing to anneal: the model has no latents, or the initial
        distribution is the posterior) HMC never ran.
        """
        if self.temperatures > 1 and self.acceptance < MIN_ACCEPTANCE:
            return False
        if self.gap is None:
            return True
        low, high = self.gap + 3 * self.gap_stderr, self.gap + 2 * self.gap_stderr
        return low >= -self.tolerance and high <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "converged": self.converged}


def log_evidence(
    model: Callable,
    guide: Callable | None = None,
    *args,
    num_chains: int = 64,
    num_temperatures: int | None = None,
    schedule: str = "adaptive",
    target_ess: float = TARGET_CESS,
    leapfrog_steps: int = 10,
    step_size: float = 0.1,
    bdmc: bool = True,
    progress: bool = False,
    compile: bool | None = False,
    **kwargs,
) -> Evidence:
    """log p(D) of ``model`` on the data in ``args``/``kwargs``, with its BDMC bracket.

    AIS anneals from the prior (``guide=None``) or from ``guide``'s density
    to the posterior of every latent (``plate=None``: one joint estimate);
    the adaptive schedule is placed by a pilot run (see
    :func:`~inference.ais.annealed_log_marginal`). With ``bdmc``, a data set
    is simulated from the model at the same arguments and forward and
    reverse AIS along the same temperatures bracket its evidence.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def coin(flips):
    ...     p = pyro.sample("p", dist.Beta(2.0, 3.0))
    ...     with pyro.plate("data", len(flips)):
    ...         pyro.sample("flips", dist.Bernoulli(p), obs=flips)
    >>> flips = torch.tensor([1.0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1, 0])
    >>> from inference import log_evidence
    >>> found = log_evidence(coin, None, flips, num_chains=16, num_temperatures=100,
    ...                      schedule="sigmoid", bdmc=False)
    >>> abs(found.log_evidence - (-8.295)) < 0.5    # exact: log B(11, 6) - log B(2, 3)
    True
    """
    initial = "prior" if guide is None else "guide"
    settings = dict(
        num_chains=num_chains, leapfrog_steps=leapfrog_steps, step_size=step_size,
        initial=initial, progress=progress, compile=compile,
    )  # fmt: skip
    tic = time.perf_counter()
    est = annealed_log_marginal(
        model, guide, *args, plate=None, num_temperatures=num_temperatures, schedule=schedule,
        target_ess=target_ess, **settings, **kwargs,
    )  # fmt: skip
    found = dict(
        log_evidence=float(est.value), stderr=float(est.stderr),
        temperatures=est.num_temperatures, acceptance=float(est.acceptance.mean()),
    )  # fmt: skip
    if bdmc:
        # the same schedule on data simulated from the model; its step sizes learnt anew there
        sandwich = bdmc_joint(model, guide, *args, betas=est.betas, **settings, **kwargs)
        lower, upper = sandwich["lower"], sandwich["upper"]
        found.update(
            lower=float(lower.value), lower_stderr=float(lower.stderr),
            upper=float(upper.value), upper_stderr=float(upper.stderr),
            gap=float(sandwich["gap"]),
            gap_stderr=math.hypot(float(lower.stderr), float(upper.stderr)),
        )  # fmt: skip
    return Evidence(**found, seconds=time.perf_counter() - tic)


def bayes_factors(evidence: dict[str, Evidence]) -> list[dict]:
    """log Bayes factors of every pair of models (in the order given), with standard errors.

    Each entry: ``numerator``, ``denominator``, ``log_bf`` =
    log p(D | numerator) - log p(D | denominator), ``stderr`` (the two runs
    are independent) and ``decided``: whether ``abs(log_bf)`` exceeds both its
    3 s.e. and the wider BDMC gap (plus two of its s.e.) of the two models.

    Examples
    --------
    >>> from inference import Evidence, bayes_factors
    >>> a = Evidence(log_evidence=-31.28, stderr=0.10, temperatures=676, acceptance=0.8,
    ...              seconds=75.0)
    >>> b = Evidence(log_evidence=-30.85, stderr=0.02, temperatures=410, acceptance=0.8,
    ...              seconds=40.0)
    >>> (row,) = bayes_factors({"hierarchical": a, "pooled": b})
    >>> round(row["log_bf"], 2), row["decided"]
    (-0.43, True)
    """
    names = list(evidence)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ea, eb = evidence[a], evidence[b]
            log_bf = ea.log_evidence - eb.log_evidence
            se = math.hypot(ea.stderr, eb.stderr)
            gaps = [abs(e.gap) + 2 * e.gap_stderr for e in (ea, eb) if e.gap is not None]
            margin = max([3 * se, *gaps])
            out.append({"numerator": a, "denominator": b, "log_bf": log_bf, "stderr": se,
                        "decided": abs(log_bf) > margin})  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# data files and model references
# ---------------------------------------------------------------------------


def read_named_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Named arrays from a ``.npz``, ``.csv`` or ``.json`` file.

    ``.npz``: its arrays; ``.csv``: a header row of names, one column each;
    ``.json``: an object of numbers and nested lists of numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data: no such file {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            check_npz(path, "--data")
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: np.asarray(f[name]) for name in f.files}
        elif suffix == ".csv":
            arrays = _read_csv(path)
        elif suffix == ".json":
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise DataError(f"--data {path}: expected a JSON object of named arrays")
            arrays = {name: np.asarray(value) for name, value in raw.items()}
        else:
            raise DataError(f"--data {path}: expected a .npz, .csv or .json file")
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"--data {path}: cannot be read ({type(err).__name__}: {err})") from None
    for name, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise DataError(
                f"--data {path}: {name!r} is not numeric ({array.dtype}); arrays of numbers only"
            )
    if not arrays:
        raise DataError(f"--data {path}: holds no arrays")
    return arrays


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DataError(f"--data {path}: expected a header row and at least one row of numbers")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    columns = {}
    for j, name in enumerate(header):
        try:
            columns[name] = np.array([float(row[j]) for row in body if row])
        except (ValueError, IndexError):
            raise DataError(
                f"--data {path}: column {name!r} holds a value that is not a number"
            ) from None
    return columns


def model_kwargs(model: Callable, arrays: dict[str, np.ndarray], *, source: str) -> dict:
    """The arrays the model's signature names, as tensors (0-d: Python numbers).

    Floating and integer arrays alike become tensors of the default dtype
    (what Pyro's count and label distributions score); a 0-d integer stays
    a Python ``int`` (a size, as eight schools' ``J``).
    """
    params = inspect.signature(model).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n in arrays if takes_all or n in params]
    if not names:
        raise DataError(
            f"--data: the model {source} takes none of the arrays "
            f"{', '.join(sorted(arrays))} (its arguments: {', '.join(params) or 'none'})"
        )
    out = {}
    for name in names:
        array = arrays[name]
        if array.ndim == 0:
            out[name] = int(array) if array.dtype.kind in "biu" else float(array)
        else:
            out[name] = torch.as_tensor(array.astype(np.float64), dtype=torch.get_default_dtype())
    return out


def model_pair(obj: Callable, *, source: str) -> tuple[Callable, Callable | None]:
    """A Pyro model (and guide, or None) from what a ``FILE.py:NAME`` reference names.

    ``NAME`` is a model (a callable with parameters: the data's names) or a
    factory without parameters returning a model, a ``(model, guide)`` pair
    or an object with ``model`` (and ``guide``) methods.
    """
    from .user_model import ModelError

    if not callable(obj):
        raise ModelError(f"--model {source} is not callable")
    if inspect.signature(obj).parameters:
        return obj, None
    made = obj()
    if isinstance(made, tuple) and len(made) == 2 and all(callable(m) for m in made):
        return made
    if callable(getattr(made, "model", None)):
        return made.model, getattr(made, "guide", None)
    if callable(made):
        return made, None
    raise ModelError(
        f"--model {source}: the factory returned {type(made).__name__}, not a model, a "
        "(model, guide) pair or an object with a model method"
    )
