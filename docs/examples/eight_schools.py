"""Eight schools (Rubin 1981), two ways: a hierarchical model and complete pooling.

For ``elbolab evidence --model docs/examples/eight_schools.py:hierarchical
--model docs/examples/eight_schools.py:pooled --data docs/examples/eight_schools.json``:
each model takes the data's named arrays (``J``, ``sigma``, ``y``) as Pyro's
eight-schools example does.
"""

import pyro
import pyro.distributions as dist


def hierarchical(J, sigma, y=None):
    """Each school's effect theta_j ~ N(mu, tau), the spread tau unknown (half-Cauchy)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", J):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def pooled(J, sigma, y=None):
    """Complete pooling: one effect mu for every school (tau = 0)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("schools", J):
        pyro.sample("obs", dist.Normal(mu, sigma), obs=y)
