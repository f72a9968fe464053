"""Figures (the only module that imports matplotlib). Every function writes one PNG."""

from __future__ import annotations

import functools
import math
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from .runs import atomic_write


@functools.cache
def _pyplot():
    """Matplotlib's pyplot on the Agg backend, imported on first use.

    The command line starts without it (a third of a second).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _pyplot().close(fig)
    return Path(path)


def plot_iwae_ladder(report: dict, path: Path) -> Path:
    """IWAE-k against k (log axis) with error bars, the ELBO and any exact log p(x)."""
    ks, means, errs = iwae_ladder(report)
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.8))
    ax.errorbar(ks, means, yerr=errs, marker="o", capsize=3, label="IWAE-k")
    elbo = report["elbo"]
    ax.axhline(elbo["mean"], color="C1", ls="--", label=f"ELBO {elbo['mean']:.2f}")
    if "exact_log_px" in report:
        ax.axhline(report["exact_log_px"], color="k", ls=":", label="exact log p(x)")
    ax.set_xscale("log")
    ax.set_xlabel("k, importance samples per datapoint")
    ax.set_ylabel("bound on log p(x) (nats per datapoint)")
    ax.set_title(f"IWAE-k against the ELBO, {report['split']} split (bars: MC s.e.)", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def _image_side(x_dim: int) -> int | None:
    side = math.isqrt(x_dim)
    return side if side * side == x_dim else None


def plot_images(rows: list[tuple[str, torch.Tensor]], path: Path) -> Path:
    """A grid of images: one labelled row per (label, (n, x_dim) tensor)."""
    side = _image_side(rows[0][1].shape[1])
    if side is None:
        raise ValueError(f"cannot show {rows[0][1].shape[1]}-dim data as square images")
    n = max(r[1].shape[0] for r in rows)
    fig, axes = _pyplot().subplots(len(rows), n, figsize=(n * 0.8, len(rows) * 0.9), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < images.shape[0]:
                ax.imshow(
                    images[j].reshape(side, side).cpu().numpy(), cmap="gray_r", vmin=0, vmax=1
                )
        axes[i][0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    return _save(fig, path)


def objective_label(objective: str, num_particles: int) -> str:
    """A training objective as a bound's name: ``IWAE-5``, ``ELBO``, ``DReG IWAE-5``."""
    names = {"iwae": f"IWAE-{num_particles}", "dreg": f"IWAE-{num_particles} (DReG gradients)",
             "elbo": "ELBO", "meanfield": "ELBO (analytic KL)", "trace-elbo": "ELBO",
             "trace-enum-elbo": "ELBO (enumerated)"}  # fmt: skip
    return names.get(objective, objective)


def plot_training(metrics: list[dict], path: Path, *, objective: str | None = None) -> Path:
    """The training objective and the held-out ELBO per epoch: two different bounds.

    ``objective`` names the training bound (e.g. ``"IWAE-5"``); an IWAE
    objective sits above the ELBO of the same model, so the two curves are
    not comparable as one quantity, and the legend says which is which.
    """
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.8))
    epochs = [m["epoch"] for m in metrics]
    name = objective or "training objective"
    ax.plot(epochs, [m["train_bound"] for m in metrics],
            label=f"{name} on training minibatches (the bound trained)")  # fmt: skip
    for key in metrics[0]:
        if key.endswith("_elbo"):
            split = key[: -len("_elbo")]
            ax.plot(epochs, [m[key] for m in metrics], label=f"ELBO on the {split} split")
    ax.set_xlabel("epoch")
    ax.set_ylabel("bound on log p(x) (nats per datapoint)")
    ax.set_title(f"Training: {name} against the held-out ELBO", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


RBM_UNITS = {
    "exact_log_likelihood": "log p(v), nats per image",
    "pseudo_log_likelihood": "pseudo log-likelihood, nats per image",
    "reconstruction_error": "squared error per image (pixels)",
}


def plot_rbm(metrics: list[dict], samples: torch.Tensor | None, path: Path) -> Path:
    """An RBM run: held-out metrics per epoch and, for image data, samples of the model.

    ``samples`` are the forward-AIS chains' final states (approximate draws from
    the RBM), shown when the visible layer is a square image.
    """
    keys = [k for k in ("exact_log_likelihood", "pseudo_log_likelihood", "reconstruction_error")
            if k in metrics[0]]  # fmt: skip
    side = _image_side(samples.shape[1]) if samples is not None else None
    heights = [3.2, 4 * len(keys) / 16 * 2 + 0.5] if side else [3.2]  # tiles as wide as tall
    fig = _pyplot().figure(figsize=(4 * len(keys), sum(heights)))
    grid = fig.add_gridspec(len(heights), len(keys), height_ratios=heights)
    epochs = [m["epoch"] for m in metrics]
    for i, key in enumerate(keys):
        ax = fig.add_subplot(grid[0, i])
        ax.plot(epochs, [m[key] for m in metrics], marker="." if len(epochs) < 30 else None)
        ax.set_title(f"held-out {key.replace('_', ' ')}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(RBM_UNITS[key], fontsize=8)
    if side:
        n = min(samples.shape[0], 32) // 2 * 2 or 1
        tiles = samples[:n].reshape(n, side, side).cpu().numpy()
        strips = [np.concatenate(list(row), axis=1) for row in np.split(tiles, min(n, 2))]
        ax = fig.add_subplot(grid[1, :])
        ax.imshow(np.concatenate(strips, axis=0), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title("model samples (forward AIS chains at beta = 1)", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{metrics[-1]['method']} RBM, {epochs[-1]} epochs", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_posterior_pairs(
    nuts: np.ndarray, guide: np.ndarray, indices, path: Path, *, khat=None, dims: int = 3
) -> Path:
    """NUTS draws of p(z|x) and guide draws of q(z|x) overlaid, one row per datapoint.

    ``nuts`` and ``guide`` are (draw, datapoint, latent). Each row shows the
    pairs among the ``dims`` latents with the largest NUTS variance.
    """
    points = nuts.shape[1]
    top = [np.argsort(-nuts[:, i].var(0))[:dims] for i in range(points)]
    pairs = list(combinations(range(min(dims, nuts.shape[2])), 2)) or [(0, 0)]
    fig, axes = _pyplot().subplots(
        points, len(pairs), figsize=(3 * len(pairs), 2.8 * points), squeeze=False
    )
    for i in range(points):
        for j, (a, b) in enumerate(pairs):
            ax = axes[i][j]
            da, db = top[i][a], top[i][b] if len(top[i]) > b else top[i][a]
            ax.scatter(nuts[:, i, da], nuts[:, i, db], s=3, alpha=0.3, label="NUTS p(z|x)")
            ax.scatter(guide[:, i, da], guide[:, i, db], s=3, alpha=0.3, label="guide q(z|x)")
            ax.set_xlabel(f"latent z[{da}]")
            ax.set_ylabel(f"latent z[{db}]")
            if j == 0:
                title = f"datapoint {indices[i]}"
                if khat is not None:
                    title += f", k-hat {khat[i]:.2f}"
                ax.set_title(title, fontsize=9, loc="left")
    axes[0][0].legend(markerscale=4, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_compare(
    rows: list[dict], khats: dict[str, np.ndarray], path: Path, *, paired: list | None = None
) -> Path:
    """k-hat distributions and IWAE ladders of several runs, and their paired differences.

    ``paired``: ``compare``'s paired differences of log p(x) against the first
    run (mean and paired s.e. over the same datapoints), drawn in a third
    panel with 3 paired s.e.: whether one run beats another is read there,
    not from the ladders' unpaired bars.
    """
    panels = 3 if paired else 2
    fig, axes = _pyplot().subplots(1, panels, figsize=(5.2 * panels, 4))
    left, right = axes[0], axes[1]
    bins = np.linspace(-0.5, 1.5, 41)
    khats = {name: k[~np.isnan(k)] for name, k in khats.items()}  # drop "not estimable"
    for name, k in khats.items():
        if len(k):
            weights = np.full(len(k), 100.0 / len(k))  # percent of the run's datapoints
            left.hist(np.clip(k, bins[0], bins[-1]), bins=bins, weights=weights,
                      histtype="step", label=name)  # fmt: skip
    left.axvline(0.5, color="k", ls=":", lw=1, label="k = 0.5: good below")
    left.axvline(0.7, color="k", ls="--", lw=1, label="k = 0.7: not to be trusted above")
    left.set_xlabel("PSIS k-hat of the guide's importance weights")
    left.set_ylabel("% of datapoints")
    left.set_title("Can the IWAE estimate be trusted? (Yao et al. 2018)", fontsize=9)
    left.legend(fontsize=7)
    for row in rows:
        ks, means, errs = iwae_ladder(row)
        right.errorbar(ks, means, yerr=errs, marker="o", capsize=3, label=row["name"])
    right.set_xscale("log")
    right.set_xlabel("k, importance samples per datapoint")
    right.set_ylabel("IWAE-k (nats per datapoint)")
    right.set_title("IWAE-k bounds (bars: Monte Carlo s.e.)", fontsize=9)
    right.legend(fontsize=8)
    if paired:
        ax = axes[2]
        for i, d in enumerate(paired):
            ax.errorbar([d["mean"]], [i], xerr=[3 * d["paired_stderr"]], fmt="o", capsize=4,
                        color=f"C{i + 1}")  # fmt: skip
        ax.axvline(0.0, color="k", lw=1)
        ax.set_yticks(range(len(paired)), [f"{d['run']}\n- {d['against']}" for d in paired],
                      fontsize=7)  # fmt: skip
        ax.invert_yaxis()
        ax.set_xlabel("difference in log p(x), nats per datapoint")
        ax.set_title("Paired differences (bars: 3 paired s.e.)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def bound_label(name: str, report: dict | None = None) -> str:
    """A gaps.json key in words: ``l_marg[100]`` -> ``L_marg, plug-in S = 100``."""
    stem, _, inner = name.partition("[")
    inner = inner.rstrip("]")
    if name == "log_px":
        estimator = (report or {}).get("log_px_estimator", "")
        return f"log p(x) ({estimator})" if estimator else "log p(x)"
    words = {
        "iwae": f"IWAE-{inner}, extended target",
        "l_marg": f"L_marg, plug-in S = {inner}",
        "l_aux": "L_aux (learned reverse model)",
        "l_h": "L_h (denoising criterion)",
        "elbo": "ELBO",
        "mutual_information": f"I(z; h | x), S = {inner}",
        "reverse_slack": f"reverse slack, S = {inner}",
    }
    return words.get(stem, name.replace("_", " "))


def plot_gaps(report: dict, path: Path) -> Path:
    """The bounds of a ``gaps.json`` report (left) and the chain's paired differences (right).

    The bounds' error bars are unpaired and may overlap where an inequality
    holds clearly; whether it holds is a question about the paired
    difference of the two bounds, drawn on the right with its own 3 s.e.
    """
    names = [n for n in report["bounds"] if not n.startswith(("mutual", "reverse"))]
    means = [report["bounds"][n]["mean"] for n in names]
    errs = [report["bounds"][n]["stderr"] for n in names]
    chain = report.get("chain", [])
    height = 0.45 * max(len(names), len(chain)) + 1.8
    fig, axes = _pyplot().subplots(1, 2 if chain else 1, figsize=(12 if chain else 6.5, height),
                                   squeeze=False)  # fmt: skip
    ax = axes[0][0]
    ax.errorbar(means, range(len(names)), xerr=[3 * e for e in errs], fmt="o", capsize=4)
    ax.set_yticks(range(len(names)), [bound_label(n, report) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("nats per datapoint (bars: 3 Monte Carlo s.e., unpaired)")
    ax.set_title(f"{report['model']}, {report['layers']} layer(s): bounds on log p(x)", fontsize=10)
    if chain:
        ax = axes[0][1]
        diffs = [c["difference"] for c in chain]
        ses = [3 * c["stderr"] for c in chain]
        colours = ["C3" if str(c.get("verdict", "")).startswith("VIOLATED") else "C2"
                   for c in chain]  # fmt: skip
        for i, (d, e, colour) in enumerate(zip(diffs, ses, colours, strict=True)):
            ax.errorbar([d], [i], xerr=[e], fmt="o", capsize=4, color=colour)
        ax.axvline(0.0, color="k", lw=1)
        ax.set_yticks(range(len(chain)), [c["inequality"] for c in chain], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("left side minus right side, nats per datapoint (bars: 3 paired s.e.)")
        ax.set_title("The chain: each inequality holds where its difference is >= 0 "
                     "(green: held, red: violated)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    return _save(fig, path)


def iwae_ladder(report: dict) -> tuple[list[int], list[float], list[float]]:
    """(k, mean, stderr) of the IWAE bounds in an ``eval.json`` report, sorted by k."""
    items = sorted((int(k), v["mean"], v["stderr"]) for k, v in report["iwae"].items())
    ks, means, errs = zip(*items, strict=True) if items else ((), (), ())
    return list(ks), list(means), [e if math.isfinite(e) else 0.0 for e in errs]


def plot_bdmc(report: dict, path: Path) -> Path:
    """The BDMC sandwich against the number of temperatures: lower and upper bounds closing."""
    rows = report["rows"]
    temps = [r["temperatures"] for r in rows]
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.8))
    for key, label, colour in (("lower", "forward AIS (lower)", "C0"),
                               ("upper", "reverse AIS (upper)", "C3")):  # fmt: skip
        means = [r[key]["mean"] for r in rows]
        errs = [r[key]["stderr"] for r in rows]
        ax.errorbar(temps, means, yerr=errs, marker="o", capsize=3, color=colour, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("temperatures")
    ax.set_ylabel("log p(x), nats per datapoint")
    ax.set_title(f"BDMC on {report['points']} simulated datapoints")
    ax.legend(loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_experiment(result: dict, path: Path) -> Path:
    """One panel per column of an experiment's table: each variant's mean +- s.e. across seeds."""
    table = result["table"]
    variants = list(table)
    columns = [c for c in next(iter(table.values())) if not all(
        math.isnan(table[v][c]["mean"]) for v in variants)]  # fmt: skip
    cols = min(4, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    positions = np.arange(len(variants))

    def flag(variant: str, column: str) -> bool:  # its number rests on a violated inequality
        return column in result.get("flagged", {}).get(variant, [])

    for ax, column in zip(axes.flat, columns, strict=False):
        unit = "per word" if column.startswith("perplexity") else "nats"
        means = [table[v][column]["mean"] for v in variants]
        errs = [table[v][column]["stderr"] for v in variants]
        ax.errorbar(positions, means, yerr=errs, fmt="o", capsize=3)
        flagged = [i for i, v in enumerate(variants) if flag(v, column)]
        if flagged:  # a violated inequality: the number is not the gap its name says
            ax.plot(positions[flagged], np.asarray(means)[flagged], "x", color="red", ms=9,
                    label="inequality VIOLATED")  # fmt: skip
            ax.legend(fontsize=6)
        ax.set_title(f"{column} ({unit})", fontsize=9)
        ax.set_ylabel(unit, fontsize=7)
        ax.set_xticks(positions, variants, rotation=45, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    title = (f"{result.get('experiment', '')}: {result['data']}, seeds {result['seeds']} "
             "(mean +- s.e. across seeds)")  # fmt: skip
    for name, violated in result.get("violated", {}).items():
        title += f"\n{name}: {'; '.join(violated)} VIOLATED"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_marginals(nuts_tree, guide_tree, *, datapoint, latents, path: Path, khat=None) -> Path:
    """NUTS's and the guide's marginals of chosen latents of one datapoint, by arviz-plots.

    ``nuts_tree`` and ``guide_tree`` are DataTrees with a variable ``z``
    (dims chain, draw, datapoint, latent), as ``elbolab diagnose`` writes them.
    """
    import warnings

    import arviz_plots as azp

    _pyplot()  # the Agg backend before arviz-plots draws
    coords = {"datapoint": [datapoint], "latent": list(latents)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # xarray's notices inside arviz-plots
        collection = azp.plot_dist(
            {"NUTS p(z | x)": nuts_tree, "guide q(z | x)": guide_tree}, var_names=["z"],
            coords=coords, backend="matplotlib",
        )  # fmt: skip
    fig = collection.viz["figure"].item()
    fig.set_size_inches(3.2 * len(latents), 3.4)
    for ax, latent in zip(fig.axes, latents, strict=False):
        ax.set_title(f"latent z[{latent}]", fontsize=9)
        ax.set_xlabel("value of the latent", fontsize=8)
    title = f"Datapoint {datapoint}: NUTS and the guide on its {len(latents)} widest latents"
    if khat is not None:
        title += f" (PSIS k-hat {khat:.2f})"
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(top=0.78, bottom=0.18)
    if not any(ax.get_legend() for ax in fig.axes):
        fig.axes[0].legend(
            [line for line in fig.axes[0].get_lines()][:2], ["NUTS p(z | x)", "guide q(z | x)"],
            fontsize=7,
        )  # fmt: skip
    return _save(fig, path)
