"""Bounds against the closed-form log p(x) of a linear-Gaussian model.

1. Exact-posterior guide: every log weight equals log p(x); the largest error
   of ELBO and IWAE-K over datapoints, in float64 and float32.
2. Diagonal (mean-field) guide: the ELBO gap and IWAE-K for growing K, each
   against the exact log p(x), with Monte Carlo standard errors.

    python benchmarks/exactness.py
"""

from __future__ import annotations

import pyro
import torch
from common import save

from inference.bounds import elbo_bound, iwae_bound
from inference.tracing import log_importance_weights
from ppl_models import LinearGaussian


def model_pair(dtype):
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)
    exact = LinearGaussian(10, 3)
    exact.set_params(weight=torch.randn(10, 3), loc=torch.randn(10), scale=0.5)
    diag = LinearGaussian(10, 3, guide_type="diagonal")
    diag.load_state_dict(exact.state_dict(), strict=False)
    with torch.no_grad():  # the exact posterior mean, with its covariance made diagonal
        s2 = exact.scale**2
        cov = torch.linalg.inv(torch.eye(3) + exact.weight.T @ exact.weight / s2)
        a = cov @ exact.weight.T / s2
        diag.enc_weight.copy_(a)
        diag.enc_bias.copy_(-a @ exact.loc)
        diag.enc_scale_raw.copy_(torch.log(torch.expm1(cov.diagonal().sqrt() - 1e-4)))
    return exact, diag


def main() -> None:
    result = {"exact_guide": {}, "diagonal_guide": {}}
    for dtype in (torch.float64, torch.float32):
        pyro.set_rng_seed(0)
        exact, _ = model_pair(dtype)
        x = exact.sample(200)
        with torch.no_grad():
            log_px = exact.log_marginal(x)
        log_w = log_importance_weights(exact.model, exact.guide, x, num_particles=100)
        errors = {
            "elbo": float((elbo_bound(log_w).value - log_px).abs().max()),
            "iwae100": float((iwae_bound(log_w).value - log_px).abs().max()),
        }
        result["exact_guide"][str(dtype).split(".")[1]] = errors
        print(f"exact guide, {dtype}: max |ELBO - log p(x)| = {errors['elbo']:.1e}, "
              f"max |IWAE-100 - log p(x)| = {errors['iwae100']:.1e} (200 datapoints)")  # fmt: skip

    pyro.set_rng_seed(0)
    exact, diag = model_pair(torch.float64)
    x = exact.sample(50)
    with torch.no_grad():
        log_px = float(exact.log_marginal(x).mean())
    log_w = log_importance_weights(
        diag.model, diag.guide, x, num_particles=100_000, chunk_size=10_000
    )
    elbo_mean, elbo_se = elbo_bound(log_w).mean()
    print(f"diagonal guide, 50 datapoints, exact log p(x) = {log_px:.4f}")
    print(f"  ELBO      {elbo_mean - log_px:+.4f} +- {elbo_se:.4f} nats from log p(x)")
    result["diagonal_guide"]["elbo_minus_log_px"] = [elbo_mean - log_px, elbo_se]
    for k in (1, 10, 100, 1000, 10_000, 100_000):
        mean, se = iwae_bound(log_w, k=k).mean()
        result["diagonal_guide"][f"iwae{k}_minus_log_px"] = [mean - log_px, se]
        print(f"  IWAE-{k:<6}{mean - log_px:+.4f} +- {se:.4f}")
    print(f"written {save('exactness', result)}")


if __name__ == "__main__":
    main()
