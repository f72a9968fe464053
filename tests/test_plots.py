"""Every figure renders, and says what it shows: axis labels with units, titles, legends."""

import re

import numpy as np
import pytest
import torch

from inference import plots

UNITS = re.compile(r"nats|%|per image|per datapoint|epoch|latent|temperatures|importance samples")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept open for inspection (and still written)."""
    drawn = []

    def keep(fig, path):
        drawn.append(fig)
        fig.canvas.draw()
        fig.savefig(path, format="png", dpi=40)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield drawn
    for fig in drawn:
        plots._pyplot().close(fig)


def _entry(mean, se=0.05):
    return {"mean": mean, "stderr": se}


def _labelled(ax, *, legend: bool):
    """A data panel: both axes labelled (the y axis with a unit), a title, a legend if asked."""
    assert ax.get_xlabel() and UNITS.search(ax.get_xlabel() + ax.get_ylabel()), ax.get_xlabel()
    assert ax.get_ylabel() or ax.get_yticklabels(), "no y label"
    assert ax.get_title() or ax.figure._suptitle is not None
    if legend:
        assert ax.get_legend() is not None and ax.get_legend().get_texts()


def test_every_figure_says_what_it_shows(tmp_path, figures):
    ladder = {"iwae": {"1": _entry(-20.0), "10": _entry(-19.0), "100": _entry(-18.7)},
              "elbo": _entry(-20.0), "split": "test"}  # fmt: skip
    plots.plot_iwae_ladder(ladder, tmp_path / "ladder.png")
    ax = figures[-1].axes[0]
    _labelled(ax, legend=True)
    assert "nats" in ax.get_ylabel()

    metrics = [{"epoch": e, "train_bound": -20 + e * 0.1, "test_elbo": -21 + e * 0.1}
               for e in range(1, 6)]  # fmt: skip
    plots.plot_training(metrics, tmp_path / "training.png", objective="IWAE-5")
    ax = figures[-1].axes[0]
    _labelled(ax, legend=True)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("IWAE-5" in t for t in texts) and any("ELBO on the test split" in t for t in texts)

    rbm_rows = [{"epoch": e, "method": "pcd-1", "exact_log_likelihood": -30.0 + e,
                 "pseudo_log_likelihood": -32.0 + e, "reconstruction_error": 5.0 - e / 2}
                for e in range(1, 4)]  # fmt: skip
    plots.plot_rbm(rbm_rows, torch.bernoulli(torch.full((8, 64), 0.3)), tmp_path / "rbm.png")
    panels = [ax for ax in figures[-1].axes if ax.axison]
    assert len(panels) == 3
    for ax in panels:
        _labelled(ax, legend=False)
        assert "per image" in ax.get_ylabel()

    nuts, guide = np.random.randn(50, 2, 3), np.random.randn(50, 2, 3)
    plots.plot_posterior_pairs(nuts, guide, [4, 7], tmp_path / "pairs.png", khat=[0.3, 0.9])
    for ax in figures[-1].axes:
        assert "latent" in ax.get_xlabel() and "latent" in ax.get_ylabel()
    assert figures[-1].axes[0].get_legend() is not None

    rows = [{"name": "run-a", "iwae": ladder["iwae"]}, {"name": "run-b", "iwae": ladder["iwae"]}]
    khats = {"run-a": np.random.rand(40), "run-b": np.random.rand(40)}
    paired = [{"run": "run-b", "against": "run-a", "mean": 0.8, "paired_stderr": 0.06}]
    plots.plot_compare(rows, khats, tmp_path / "compare.png", paired=paired)
    left, right, differences = figures[-1].axes
    assert "paired" in differences.get_title() and "nats" in differences.get_xlabel()
    _labelled(left, legend=True)
    _labelled(right, legend=True)
    assert left.get_ylabel() == "% of datapoints"
    legend = " ".join(t.get_text() for t in left.get_legend().get_texts())
    assert "k = 0.5" in legend and "k = 0.7" in legend  # the thresholds are labelled

    gaps = {"model": "hvae", "layers": 2, "log_px_estimator": "AIS-100",
            "bounds": {"log_px": _entry(-18.0), "iwae[1000]": _entry(-18.1),
                       "l_marg[100]": _entry(-18.5), "l_aux": _entry(-18.6), "l_h": _entry(-19.0),
                       "mutual_information[100]": _entry(0.5)},
            "chain": [{"inequality": "log p(x) >= L_marg", "difference": 0.5, "stderr": 0.02,
                       "verdict": "held"},
                      {"inequality": "L_marg >= L_h", "difference": 0.5, "stderr": 0.01,
                       "verdict": "held"}]}  # fmt: skip
    plots.plot_gaps(gaps, tmp_path / "gaps.png")
    bounds_ax, chain_ax = figures[-1].axes
    names = [t.get_text() for t in bounds_ax.get_yticklabels()]
    assert "L_marg, plug-in S = 100" in names and "log p(x) (AIS-100)" in names
    assert not any("[" in n or "_px" in n for n in names)  # no raw JSON keys
    assert "nats" in bounds_ax.get_xlabel() and "paired" in chain_ax.get_xlabel()
    assert [t.get_text() for t in chain_ax.get_yticklabels()] == [
        "log p(x) >= L_marg",
        "L_marg >= L_h",
    ]

    bdmc = {"points": 10, "rows": [{"temperatures": t, "lower": _entry(-20.1), "upper":
                                    _entry(-19.9)} for t in (10, 100)]}  # fmt: skip
    plots.plot_bdmc(bdmc, tmp_path / "bdmc.png")
    _labelled(figures[-1].axes[0], legend=True)

    experiment = {"experiment": "stochastic-layers", "data": "digits", "seeds": [0, 1],
                  "table": {v: {"log_px": _entry(-18.0), "perplexity_log_px": _entry(300.0, 5)}
                            for v in ("one layer", "two layers")}}  # fmt: skip
    plots.plot_experiment(experiment, tmp_path / "experiment.png")
    for ax in [ax for ax in figures[-1].axes if ax.axison]:
        assert ax.get_ylabel() in ("nats", "per word") and ax.get_title()

    plots.plot_images([("data", torch.rand(3, 64))], tmp_path / "images.png")
    assert figures[-1].axes[0].get_title(loc="left") == "data"
    assert all((tmp_path / f).stat().st_size > 0 for f in ("ladder.png", "gaps.png", "rbm.png"))


def test_the_guide_against_nuts_is_drawn_by_arviz_plots(tmp_path, figures):
    from arviz_base import from_dict

    nuts = from_dict({"posterior": {"z": np.random.randn(2, 60, 1, 3)}},
                     dims={"z": ["datapoint", "latent"]}, coords={"datapoint": [5]})  # fmt: skip
    guide = from_dict({"posterior": {"z": np.random.randn(1, 120, 1, 3) * 0.8}},
                      dims={"z": ["datapoint", "latent"]}, coords={"datapoint": [5]})  # fmt: skip
    plots.plot_marginals(nuts, guide, datapoint=5, latents=[0, 2], path=tmp_path / "m.png",
                         khat=0.81)  # fmt: skip
    fig = figures[-1]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["latent z[0]", "latent z[2]"]
    assert "k-hat 0.81" in fig._suptitle.get_text()
    assert all(ax.get_xlabel() for ax in panels)
    legend = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legend and [t.get_text() for t in legend[0].get_texts()] == [
        "NUTS p(z | x)",
        "guide q(z | x)",
    ]
