"""The cost of a trustworthy evidence: AIS + BDMC until the bracket closes, beside Pyro's NUTS.

For eight schools (the hierarchical model of ``docs/examples/eight_schools.py``,
exact evidence by quadrature) and a Bayesian linear regression on 1000
points (normal-inverse-gamma, exact evidence in closed form): ``log_evidence``
from the prior with the adaptive schedule at ever stricter conditional ESS
targets, until the BDMC gap on data simulated from the model at the same
schedule is under 0.1 nats; each row with its seconds, temperatures, error
against the exact evidence and bracket. Beside it, in the same process,
Pyro's NUTS on the same posterior: seconds per 1000 effective samples
(the smallest bulk ESS over the latents, ArviZ).

    python benchmarks/bench_evidence.py [--chains 64] [--targets 0.999,0.9999,0.99999]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import time

import pyro
import pyro.distributions as dist
import torch
from common import ROOT, save
from scipy import integrate

from inference.evidence import log_evidence

Y = [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
SIGMA = [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


def _schools():
    spec = importlib.util.spec_from_file_location(
        "eight_schools", ROOT / "docs" / "examples" / "eight_schools.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hierarchical


def schools_evidence() -> float:
    y, sigma = torch.tensor(Y), torch.tensor(SIGMA)

    def log_f(tau):
        cov = 25 * torch.ones(8, 8) + torch.diag(sigma**2 + tau**2)
        return float(dist.MultivariateNormal(torch.zeros(8), cov).log_prob(y)
                     + dist.HalfCauchy(5.0).log_prob(torch.tensor(tau)))  # fmt: skip

    shift = log_f(3.0)
    value, _ = integrate.quad(lambda t: math.exp(log_f(t) - shift), 0, math.inf, limit=200)
    return shift + math.log(value)


def regression(X, y=None):
    """sigma^2 ~ InverseGamma(3, 2), w | sigma^2 ~ N(0, sigma^2 I), y ~ N(X w, sigma^2)."""
    var = pyro.sample("var", dist.InverseGamma(3.0, 2.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(X.shape[1]), var.sqrt().unsqueeze(-1)).to_event(1))
    with pyro.plate("data", X.shape[0]):
        pyro.sample("y", dist.Normal((X * w).sum(-1), var.sqrt()), obs=y)


def regression_evidence(X, y, a=3.0, b=2.0) -> float:
    n = X.shape[0]
    cov = (b / a) * (torch.eye(n) + X @ X.T)
    return float(dist.MultivariateStudentT(2 * a, torch.zeros(n),
                                           torch.linalg.cholesky(cov)).log_prob(y))  # fmt: skip


def nuts_seconds_per_1000_ess(model, kwargs, *, warmup: int, samples: int, seed: int) -> dict:
    import arviz_stats
    import xarray as xr

    pyro.set_rng_seed(seed)
    mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), warmup_steps=warmup, num_samples=samples,
                           disable_progbar=True)  # fmt: skip
    tic = time.perf_counter()
    mcmc.run(**kwargs)
    seconds = time.perf_counter() - tic
    ess = []
    for draws in mcmc.get_samples().values():
        flat = draws.reshape(samples, -1).numpy()
        for j in range(flat.shape[1]):
            da = xr.DataArray(flat[None, :, j], dims=("chain", "draw"))
            ess.append(float(arviz_stats.ess(da, method="bulk")))
    low = min(ess)
    return {"seconds": seconds, "min_bulk_ess": low, "seconds_per_1000_ess": seconds * 1000 / low,
            "warmup": warmup, "samples": samples}  # fmt: skip


def ladder(name, model, kwargs, exact, targets, chains, seed) -> list[dict]:
    rows = []
    for target in targets:
        pyro.set_rng_seed(seed)
        found = log_evidence(model, None, num_chains=chains, target_ess=target, **kwargs)
        row = {"target_ess": target, **found.as_dict(), "error": found.log_evidence - exact}
        rows.append(row)
        print(f"{name}: target {target}: {found.temperatures} temperatures, log p(D) "
              f"{found.log_evidence:.3f} +- {found.stderr:.3f} (exact {exact:.3f}), BDMC gap "
              f"{found.gap:.3f} +- {found.gap_stderr:.3f}, {found.seconds:.1f} s")  # fmt: skip
        if abs(found.gap) < 0.1:
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=64)
    parser.add_argument("--targets", default="0.999,0.9999,0.99999")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", type=int, default=1000, help="regression datapoints")
    parser.add_argument("--name", default="evidence")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    targets = [float(t) for t in args.targets.split(",")]

    gen = torch.Generator().manual_seed(args.seed)
    X = torch.randn(args.points, 5, generator=gen)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.7 * torch.randn(args.points, generator=gen)
    problems = {
        "eight schools": (_schools(), {"J": 8, "sigma": torch.tensor(SIGMA), "y": torch.tensor(Y)},
                          schools_evidence()),
        f"regression ({args.points} points)": (regression, {"X": X, "y": y},
                                                regression_evidence(X, y)),
    }  # fmt: skip
    result = {"chains": args.chains, "problems": {}}
    for name, (model, kwargs, exact) in problems.items():
        rows = ladder(name, model, kwargs, exact, targets, args.chains, args.seed)
        nuts = nuts_seconds_per_1000_ess(model, kwargs, warmup=500, samples=1000, seed=args.seed)
        last = rows[-1]
        ratio = last["seconds"] / nuts["seconds_per_1000_ess"]
        print(f"{name}: NUTS {nuts['seconds_per_1000_ess']:.1f} s per 1000 ESS (min bulk ESS "
              f"{nuts['min_bulk_ess']:.0f} of 1000 draws); AIS + BDMC at gap "
              f"{last['gap']:.3f}: {last['seconds']:.1f} s = {ratio:.2f} x NUTS")  # fmt: skip
        result["problems"][name] = {"exact": exact, "rows": rows, "nuts": nuts,
                                    "ratio_to_nuts_1000_ess": ratio,
                                    "closed": abs(last["gap"]) < 0.1}  # fmt: skip
    print(f"written {save(args.name, result)}")


if __name__ == "__main__":
    main()
