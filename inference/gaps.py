"""Bound-gap reports. For now: aggregate-posterior activity of the latent units.

An active unit u has Cov_x(E_q[z_u | x]) > 0.01 (Burda, Grosse &
Salakhutdinov 2016, section 5.2): the encoder's mean of that latent changes
with the datapoint, so the decoder can use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from pyro.infer import Predictive

ACTIVE_THRESHOLD = 0.01


def posterior_means(
    guide: Callable, x: torch.Tensor, *, site: str = "z", num_samples: int = 64, **kwargs
) -> torch.Tensor:
    """Monte Carlo E_q[z | x] per datapoint, shape (N, latent), for any guide."""
    with torch.no_grad():
        draws = Predictive(guide, num_samples=num_samples, parallel=True)(x, **kwargs)
    if site not in draws:
        raise ValueError(f"the guide has no site {site!r}; sites: {', '.join(draws)}")
    return draws[site].mean(0).reshape(x.shape[0], -1)


def active_units(means: torch.Tensor, *, threshold: float = ACTIVE_THRESHOLD) -> int:
    """Number of latent units u with Var_x(E_q[z_u | x]) > ``threshold``.

    ``means`` holds E_q[z | x] per datapoint (rows).
    """
    return int((means.var(0) > threshold).sum())


def hierarchical_log_densities(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    aux_sites: Sequence[str],
    num_particles: int,
    inner_samples: Sequence[int] = (1, 10, 100, 1000),
    plate: str = "data",
    max_rows: int = 5_000,
    **kwargs,
) -> dict[str, torch.Tensor]:
    r"""Per-particle terms of the hierarchical bounds, each of shape (K, N).

    With (h, z) ~ q(h | x) q(z | h) (h: the ``aux_sites``; z: every other
    guide site) and a model p(x, z) r(h | z, x) whose ``aux_sites`` are drawn
    from the reverse model r:

    - ``log_w_aux`` = log p(x, z) + log r(h | z, x) - log q(z | h) - log q(h | x)
    - ``log_w_h`` = log p(x, z) - log q(z | h)
    - ``log_w_marg[S]`` = log p(x, z) - log q^_S(z | x), where
      log q^_S(z | x) = log (1/S) sum_s q(z | h_s) q(h_s | x) / r(h_s | z, x),
      h_s ~ r(h | z, x): an importance estimate of the marginal q(z | x),
      unbiased for q(z | x), so that E[log q^_S] <= log q(z | x) and the
      plug-in overestimates L_marg by a bias that shrinks as S grows.

    Particles, and the inner draws, run in chunks of about ``max_rows`` rows
    (particles x N, and S x particles x N).

    References
    ----------
    Ranganath, Tran & Blei (2016), Hierarchical Variational Models, ICML.
    Maaloe, Sonderby, Sonderby & Winther (2016), Auxiliary Deep Generative Models, ICML.
    """
    from .bounds import Layout, guess_max_plate_nesting

    aux = set(aux_sites)
    args = (x,)
    n = x.shape[0]
    out: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        for start in range(0, num_particles, max(1, max_rows // n)):
            size = min(max(1, max_rows // n), num_particles - start)
            chunk = _hierarchical_chunk(
                model, guide, args, kwargs, Layout(size, nesting, plate), aux, inner_samples,
                max_rows,
            )  # fmt: skip
            for name, value in chunk.items():
                out.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in out.items()}


def _hierarchical_chunk(model, guide, args, kwargs, layout, aux, inner_samples, max_rows):
    """The terms of :func:`hierarchical_log_densities` for one chunk of particles."""
    from .bounds import Layout, latent_values, log_density, logsumexp, trace_guide, trace_model

    num_particles, nesting, plate = layout.num_particles, layout.max_plate_nesting, layout.plate
    out: dict[str, torch.Tensor] = {}
    guide_trace = trace_guide(guide, args, kwargs, layout)
    values = latent_values(guide_trace)
    missing = aux - set(values)
    if missing:
        raise ValueError(f"aux_sites {sorted(missing)} are not sampled by the guide")
    top = {name: v for name, v in values.items() if name not in aux}
    model_trace = trace_model(model, args, kwargs, layout, values=values)
    log_p = log_density(model_trace, layout, exclude=aux)
    log_r = log_density(model_trace, layout, only=aux)
    log_q_top = log_density(guide_trace, layout, exclude=aux)
    log_q_aux = log_density(guide_trace, layout, only=aux)
    out["log_w_aux"] = log_p + log_r - log_q_top - log_q_aux
    out["log_w_h"] = log_p - log_q_top
    n = args[0].shape[0]
    for s in inner_samples:
        chunk = max(1, max_rows // (s * n))
        log_q_hat = []
        for start in range(0, num_particles, chunk):
            c = min(chunk, num_particles - start)
            # S inner draws for each of c particles, flattened s-major into S * c particles.
            inner = Layout(s * c, nesting, plate)
            fixed = {
                name: v[start : start + c].repeat(s, *([1] * (v.dim() - 1)))
                for name, v in top.items()
            }
            r_trace = trace_model(model, args, kwargs, inner, values=fixed, free=aux)
            log_r_s = log_density(r_trace, inner, only=aux)
            h_s = {name: r_trace.nodes[name]["value"] for name in aux}
            q_trace = trace_guide(guide, args, kwargs, inner, values={**fixed, **h_s})
            terms = (log_density(q_trace, inner) - log_r_s).reshape(s, c, -1)
            log_q_hat.append(logsumexp(terms, 0) - math.log(s))
        out[f"log_w_marg[{s}]"] = log_p - torch.cat(log_q_hat)
    return out


def hierarchical_bounds(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    aux_sites: Sequence[str],
    num_particles: int,
    inner_samples: Sequence[int] = (1, 10, 100, 1000),
    marg_particles: int | None = None,
    statistics: dict[str, Callable[[torch.Tensor], object]] | None = None,
    **kwargs,
) -> dict:
    r"""The measurable chain log p(x) >= L_marg >= L_aux and L_marg >= L_h, per datapoint.

    Returns a dict of :class:`~inference.bounds.Bound` (per datapoint, with
    Monte Carlo standard errors): ``log_px`` (IWAE over ``num_particles``
    with the extended target p(x, z) r(h | z, x)), ``l_aux``, ``l_h``, and for
    each S in ``inner_samples``: ``l_marg[S]``, ``mutual_information[S]`` =
    l_marg - l_h = I_q(z; h | x) and ``reverse_slack[S]`` = l_marg - l_aux =
    E KL(q(h | z, x) || r(h | z, x)). Differences are formed per particle, so
    their standard errors are those of paired differences. L_marg uses the
    first ``marg_particles`` particles (default all): its inner estimate costs
    S times more per particle. ``statistics`` maps names to functions of the
    (K, N) log weights (for example the PSIS k-hat), returned under
    ``"statistics"``.
    """
    from .bounds import Bound, elbo_bound, iwae_bound

    marg_particles = marg_particles or num_particles
    terms = hierarchical_log_densities(
        model, guide, x, aux_sites=aux_sites, num_particles=num_particles,
        inner_samples=(), **kwargs,
    )  # fmt: skip
    if inner_samples:
        marg = hierarchical_log_densities(
            model, guide, x, aux_sites=aux_sites, num_particles=marg_particles,
            inner_samples=inner_samples, **kwargs,
        )  # fmt: skip
    out: dict[str, Bound] = {
        "log_px": iwae_bound(terms["log_w_aux"]),
        "l_aux": elbo_bound(terms["log_w_aux"]),
        "l_h": elbo_bound(terms["log_w_h"]),
    }
    for s in inner_samples:
        log_w_marg = marg[f"log_w_marg[{s}]"]
        out[f"l_marg[{s}]"] = elbo_bound(log_w_marg)
        out[f"mutual_information[{s}]"] = elbo_bound(log_w_marg - marg["log_w_h"])
        out[f"reverse_slack[{s}]"] = elbo_bound(log_w_marg - marg["log_w_aux"])
    stats = {name: fn(terms["log_w_aux"]) for name, fn in (statistics or {}).items()}
    return {"bounds": out, "statistics": stats}


def aggregate_posterior_terms(
    posterior: Callable[[torch.Tensor], object],
    prior: object,
    x: torch.Tensor,
    *,
    chunk_size: int = 512,
) -> dict[str, float]:
    r"""ELBO surgery: the average KL term split into I_q(x; z) + KL(q(z) || p(z)).

    With the aggregate posterior q(z) = (1/N) sum_n q(z | x_n) over the rows of
    ``x`` (Hoffman & Johnson 2016),

        (1/N) sum_n KL(q(z | x_n) || p(z)) = I_q(x; z) + KL(q(z) || p(z)),

    where I_q(x; z) = E[log q(z_n | x_n) - log q(z_n)] is estimated with one
    draw z_n ~ q(z | x_n) per datapoint and log q(z_n) = logsumexp_m
    log q(z_n | x_m) - log N (an O(N^2) sum, done in chunks); the average KL is
    analytic where torch knows it, and KL(q(z) || p(z)) is the difference, so
    the identity holds exactly. I_q(x; z) <= log N.

    Parameters
    ----------
    posterior : callable
        ``posterior(x)`` -> a distribution q(z | x) batched over the rows of x
        (for example ``VAE.posterior``), whose ``log_prob`` broadcasts.
    prior : distribution
        p(z), with the same event shape.
    x : torch.Tensor
        The data (N rows).

    Returns
    -------
    dict
        ``average_kl``, ``marginal_kl`` (KL(q(z) || p(z))), ``mutual_information``
        (I_q(x; z)), ``log_n`` (its upper bound), in nats.

    References
    ----------
    Hoffman & Johnson (2016), ELBO surgery: yet another way to carve up the
    variational evidence lower bound, NIPS Workshop on Advances in Approximate
    Bayesian Inference.
    """
    from pyro.distributions.kl import kl_divergence

    from .bounds import logsumexp

    n = x.shape[0]
    with torch.no_grad():
        q = posterior(x)
        z = q.sample()
        try:
            average_kl = float(kl_divergence(q, prior).mean())
        except NotImplementedError:
            average_kl = float((q.log_prob(z) - prior.log_prob(z)).mean())
        log_q_marginal = []
        for start in range(0, n, chunk_size):
            zc = z[start : start + chunk_size]
            log_q = q.log_prob(zc.unsqueeze(1))  # (chunk, N): every draw under every component
            log_q_marginal.append(logsumexp(log_q, 1) - math.log(n))
        log_q_marginal = torch.cat(log_q_marginal)
        mutual_information = float((q.log_prob(z) - log_q_marginal).mean())
    return {
        "average_kl": average_kl,
        "marginal_kl": average_kl - mutual_information,
        "mutual_information": mutual_information,
        "log_n": math.log(n),
    }


def amortization_split(
    model,
    x: torch.Tensor,
    *,
    log_px: torch.Tensor,
    steps: int = 500,
    lr: float = 0.01,
    num_particles: int = 10,
    eval_particles: int = 1000,
) -> dict[str, torch.Tensor]:
    r"""Split log p(x) - ELBO(q) into approximation and amortisation gaps, per datapoint.

    Cremer, Li & Duvenaud (2018): q* is the best member of the guide's family
    for each datapoint, found by optimising local parameters (location and
    scale of the diagonal Normal q(z | x_n)) from the encoder's output, so

        log p(x) - ELBO(q) = [log p(x) - ELBO(q*)] + [ELBO(q*) - ELBO(q)]
                             (approximation gap)     (amortisation gap).

    The two parts add up to the total gap by construction; each ELBO is
    estimated with ``eval_particles`` draws. ``model`` needs ``model.model``
    and ``posterior(x)`` returning an ``Independent(Normal)`` over site "z".

    For an encoder with several stochastic layers (``encoder_dist`` and
    ``h_names``, as :class:`~ppl_models.HierarchicalVAE`) only the first layer
    q(h_1 | x) sees x; its location and scale are the local parameters, the
    upper conditionals and the reverse model stay shared, and "ELBO" is the
    auxiliary bound L_aux that such a pair's log weights give. A fixed first
    layer (a corruption) has no local parameters: that is an error.

    Returns
    -------
    dict
        Per-datapoint ``elbo_amortized``, ``elbo_optimal``, ``approximation_gap``,
        ``amortization_gap``, ``total_gap`` (tensors of shape (N,)).
    """
    import pyro
    import pyro.distributions as dist
    from torch.nn import functional as F

    from .bounds import elbo_bound, log_importance_weights
    from .objectives import make_objective

    names = [*getattr(model, "h_names", []), "z"]
    if getattr(model, "corruption", None):
        raise ValueError("a fixed corruption as first layer leaves no local parameters")
    with torch.no_grad():
        q = model.encoder_dist(0, x, x) if len(names) > 1 else model.posterior(x)
        base = getattr(q, "base_dist", q)
        if not isinstance(base, dist.Normal):
            raise ValueError("the amortisation split needs a diagonal-Normal first layer")
        loc = base.loc.clone().requires_grad_(True)
        # softplus^{-1}(scale): the local guide's scale parameterisation
        raw = torch.log(torch.expm1(base.scale.clamp(min=1e-6))).requires_grad_(True)

    def local_guide(x, *, num_data=None):
        with pyro.plate("data", x.shape[0]):
            inputs = pyro.sample(names[0], dist.Normal(loc, F.softplus(raw) + 1e-6).to_event(1))
            for layer, name in enumerate(names[1:], start=1):
                inputs = pyro.sample(name, model.encoder_dist(layer, inputs, x))

    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        objective = make_objective("elbo", num_particles=num_particles)
        optimizer = torch.optim.Adam([loc, raw], lr=lr)
        with pyro.validation_enabled(False):
            for _ in range(steps):
                optimizer.zero_grad()
                objective.differentiable_loss(model.model, local_guide, x).backward()
                optimizer.step()
    finally:
        for p, flag in zip(params, requires, strict=True):
            p.requires_grad_(flag)
    amortized = elbo_bound(
        log_importance_weights(model.model, model.guide, x, num_particles=eval_particles)
    ).value
    optimal = elbo_bound(
        log_importance_weights(model.model, local_guide, x, num_particles=eval_particles)
    ).value
    return {
        "elbo_amortized": amortized,
        "elbo_optimal": optimal,
        "approximation_gap": log_px - optimal,
        "amortization_gap": optimal - amortized,
        "total_gap": log_px - amortized,
    }


# ---------------------------------------------------------------------------
# elbolab gaps
# ---------------------------------------------------------------------------

GAPS = "gaps.json"


def _concat_bounds(parts: list[dict]) -> dict:
    from .bounds import Bound

    return {
        name: Bound(
            torch.cat([p[name].value for p in parts]), torch.cat([p[name].stderr for p in parts])
        )
        for name in parts[0]
    }


def _inequality(name: str, high: tuple, low: tuple, *, paired: dict | None = None) -> dict:
    """Whether ``high >= low`` held at 3 standard errors.

    ``paired`` is the per-particle difference's summary when there is one
    (same draws on both sides): its mean and smaller standard error are used.
    """
    if paired is not None:
        diff, se = paired["mean"], paired["stderr"]
    else:
        diff, se = high[0] - low[0], math.hypot(high[1], low[1])
    if diff > 3 * se:
        verdict = "held (strictly, > 3 s.e.)"
    elif diff >= -3 * se:
        verdict = "held within 3 s.e. (equality not excluded)"
    else:
        verdict = "VIOLATED by more than 3 s.e."
    return {"inequality": name, "difference": diff, "stderr": se, "verdict": verdict}


def gaps_run(
    run_dir,
    *,
    split: str = "test",
    limit: int | None = None,
    num_particles: int = 1000,
    inner_samples: Sequence[int] = (1, 10, 100),
    marg_particles: int = 10,
    batch_size: int = 100,
    cremer_steps: int = 300,
    cremer_points: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Every bound and gap of a trained run on one split; writes ``gaps.json`` and ``gaps.png``.

    The Cremer split (an optimisation per datapoint) runs on the first
    ``cremer_points`` datapoints, and the multi-layer ELBO surgery (N^2 pairs)
    on the first 500; every other term uses the whole split.
    """
    from pathlib import Path

    import pyro
    from tqdm.auto import tqdm

    from . import diagnostics
    from .plots import plot_gaps
    from .runs import load_run, write_json

    run_dir = Path(run_dir)
    config, dataset, model = load_run(run_dir)
    x_all = dataset.split(split)[:limit]
    aux = list(getattr(model, "h_names", []))
    pyro.set_rng_seed(seed)
    parts, khats, splits = [], [], []
    batches = range(0, x_all.shape[0], batch_size)
    for start in tqdm(batches, desc="gaps", disable=not progress, leave=False):
        x = x_all[start : start + batch_size]
        result = hierarchical_bounds(
            model.model, model.guide, x, aux_sites=aux, num_particles=num_particles,
            inner_samples=inner_samples if aux else (), marg_particles=marg_particles,
            statistics={"khat": diagnostics.psis_khat},
        )  # fmt: skip
        bounds = result["bounds"]
        if not aux:  # one stochastic layer: q(z|x) is exact, L_marg = L_aux = L_h
            for s in inner_samples:
                bounds[f"l_marg[{s}]"] = bounds["l_aux"]
        parts.append(bounds)
        khats.append(torch.as_tensor(result["statistics"]["khat"]).reshape(-1))
        if not getattr(model, "corruption", None) and start < cremer_points:
            splits.append(
                amortization_split(model, x, log_px=bounds["log_px"].value, steps=cremer_steps)
            )
    bounds = _concat_bounds(parts)
    summary = {
        name: dict(zip(("mean", "stderr"), b.mean(), strict=True)) for name, b in bounds.items()
    }
    s_max = max(inner_samples)
    marg = summary[f"l_marg[{s_max}]"]
    chain = [
        _inequality("log p(x) >= L_marg", _pair(summary["log_px"]), _pair(marg)),
        _inequality(
            "L_marg >= L_aux", _pair(marg), _pair(summary["l_aux"]),
            paired=summary.get(f"reverse_slack[{s_max}]"),
        ),
        _inequality(
            "L_marg >= L_h", _pair(marg), _pair(summary["l_h"]),
            paired=summary.get(f"mutual_information[{s_max}]"),
        ),
    ]  # fmt: skip
    # Every one of these is a valid lower bound on log p(x); IWAE-K is only the tightest
    # once it has converged (few particles, or a poor reverse model, leave it loose).
    lower = {name: summary[name]["mean"] for name in ("log_px", "l_aux", "l_h")}
    best = max(lower, key=lower.get)
    if best != "log_px":
        chain[0]["verdict"] += (
            f" (IWAE-{num_particles} lies below {best} = {lower[best]:.2f}, itself a lower "
            "bound: the importance-sampling estimate of log p(x) has not converged)"
        )
    if aux and len(inner_samples) > 1:
        # The plug-in is biased upwards, less so as S grows: has it stopped moving?
        s_prev = sorted(inner_samples)[-2]
        drop = summary[f"l_marg[{s_prev}]"]["mean"] - marg["mean"]
        spread = math.hypot(summary[f"l_marg[{s_prev}]"]["stderr"], marg["stderr"])
        converged = drop < 3 * spread
        if not converged:
            chain[0]["verdict"] += (
                f" (L_marg's plug-in estimate fell by {drop:.2f} from S={s_prev} to S={s_max}: "
                "not converged, biased upwards; raise --inner-samples)"
            )
    else:
        converged = True
    khat = torch.cat(khats).numpy()
    report = {
        "run": str(run_dir),
        "model": config.model,
        "layers": getattr(model, "layers", 1),
        "objective": config.objective,
        "split": split,
        "num_datapoints": int(x_all.shape[0]),
        "num_particles": num_particles,
        "inner_samples": list(inner_samples),
        "marg_particles": marg_particles,
        "seed": seed,
        "bounds": summary,
        "chain": chain,
        "l_marg_converged": converged,
        "best_lower_bound": {"name": best, "value": lower[best]},
        "khat": diagnostics.khat_summary(khat),
        "active_units": active_units(posterior_means(model.guide, x_all[:2000])),
    }
    if splits:
        joined = {k: torch.cat([s[k] for s in splits]) for k in splits[0]}
        report["cremer_points"] = min(cremer_points, int(x_all.shape[0]))
        report["cremer"] = {
            k: {"mean": float(v.mean()), "stderr": float(v.std() / math.sqrt(v.numel()))}
            for k, v in joined.items()
        }
    if not aux:  # one stochastic layer: q(z | x) has a density
        report["surgery"] = aggregate_posterior_terms(
            model.posterior, model.prior(x_all), x_all[:2000]
        )
    else:  # a mixture: plug-in densities over all N^2 pairs, so on fewer datapoints
        report["surgery"] = hierarchical_surgery(
            model.model, model.guide, x_all[:500], aux_sites=aux, prior=model.prior(x_all),
            inner_samples=10,
        )  # fmt: skip
    write_json(run_dir / GAPS, report)
    plot_gaps(report, run_dir / "gaps.png")
    return report


def _pair(summary: dict) -> tuple[float, float]:
    return summary["mean"], summary["stderr"]


def format_gaps(report: dict) -> str:
    """The inequality chain and gap table printed by ``elbolab gaps``."""
    b = report["bounds"]
    lines = [
        f"{report['run']}: {report['model']} with {report['layers']} stochastic layer(s), "
        f"{report['split']} split ({report['num_datapoints']} datapoints), "
        f"K={report['num_particles']}",
        f"{'term':<28}{'nats':>11}{'stderr':>9}",
    ]
    for name, value in b.items():
        lines.append(f"{name:<28}{value['mean']:>11.3f}{value['stderr']:>9.3f}")
    for item in report["chain"]:
        lines.append(
            f"{item['inequality']:<22} difference {item['difference']:8.3f} "
            f"+- {item['stderr']:.3f}: {item['verdict']}"
        )
    if "cremer" in report:
        c = report["cremer"]
        bound = "L_aux" if report["layers"] > 1 else "ELBO"
        lines.append(
            f"Cremer split of log p(x) - {bound} = {c['total_gap']['mean']:.3f} (first "
            f"{report.get('cremer_points', '?')} datapoints): approximation "
            f"{c['approximation_gap']['mean']:.3f} +- {c['approximation_gap']['stderr']:.3f}, "
            f"amortisation {c['amortization_gap']['mean']:.3f} "
            f"+- {c['amortization_gap']['stderr']:.3f}"
        )
    if "surgery" in report:
        s = report["surgery"]
        lines.append(
            f"ELBO surgery: average KL {s['average_kl']:.3f} = I_q(x;z) "
            f"{s['mutual_information']:.3f} (<= log N = {s['log_n']:.2f}) + KL(q(z)||p(z)) "
            f"{s['marginal_kl']:.3f}"
        )
    lines.append(f"active units: {report['active_units']}")
    from .diagnostics import khat_warning

    warning = khat_warning(report["khat"], what=f"the IWAE-{report['num_particles']} estimate")
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def hierarchical_surgery(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *,
    aux_sites: Sequence[str],
    prior,
    inner_samples: int = 10,
    max_rows: int = 50_000,
    plate: str = "data",
    draws: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    r"""ELBO surgery when q(z | x) is a mixture over auxiliary layers h.

    As :func:`aggregate_posterior_terms`, with every density q(z_n | x_m)
    replaced by the plug-in q^_S(z_n | x_m) = (1/S) sum_s q(z_n | h_s)
    q(h_s | x_m) / r(h_s | z_n, x_m), h_s ~ r(h | z_n, x_m) (the estimator of
    L_marg): one draw z_n ~ q(z | x_n) per datapoint, all N x N pairs, in
    chunks. The plug-in is unbiased for each density, so the terms carry the
    small bias of its log; raise S to shrink it. ``draws`` (site -> (N, ...))
    replaces the draws z_n ~ q(z | x_n), for tests.
    """
    from .bounds import (
        Layout,
        guess_max_plate_nesting,
        latent_values,
        log_density,
        logsumexp,
        trace_guide,
        trace_model,
    )

    aux = set(aux_sites)
    n = x.shape[0]
    with torch.no_grad():
        nesting = guess_max_plate_nesting(model, guide, (x,), {})
        if draws is None:
            draw = latent_values(trace_guide(guide, (x,), {}, Layout(1, nesting, plate)))
            draws = {name: v[0] for name, v in draw.items() if name not in aux}  # (N, ...)
        z = draws
        log_q = torch.empty(n, n)  # [draw n, component m]
        rows = max(1, max_rows // (inner_samples * n))
        for start in range(0, n, rows):
            idx = torch.arange(start, min(start + rows, n))
            c = len(idx)
            # pairs (n in idx, m in all): x_m repeated for each draw in the chunk
            x_pairs = x.repeat(c, *([1] * (x.dim() - 1)))
            fixed = {
                name: v[idx].repeat_interleave(n, 0).expand(inner_samples, c * n, *v.shape[1:])
                for name, v in z.items()
            }
            layout = Layout(inner_samples, nesting, plate)
            r_trace = trace_model(model, (x_pairs,), {}, layout, values=fixed, free=aux)
            log_r = log_density(r_trace, layout, only=aux)
            h = {name: r_trace.nodes[name]["value"] for name in aux}
            q_trace = trace_guide(guide, (x_pairs,), {}, layout, values={**fixed, **h})
            terms = log_density(q_trace, layout) - log_r  # (S, c * n)
            log_q[idx] = (logsumexp(terms, 0) - math.log(inner_samples)).reshape(c, n)
        own = log_q.diagonal()
        log_marginal = logsumexp(log_q, 1) - math.log(n)
        top = next(iter(z.values()))
        log_prior = prior.log_prob(top)
        average_kl = float((own - log_prior).mean())
        mutual_information = float((own - log_marginal).mean())
    return {
        "average_kl": average_kl,
        "marginal_kl": average_kl - mutual_information,
        "mutual_information": mutual_information,
        "log_n": math.log(n),
    }
