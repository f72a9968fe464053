"""elbolab's library: estimators that work on any Pyro model/guide pair.

Where things are (the command line lives apart, in :mod:`inference.commands`):

- :mod:`.tracing`: scoring a model against a guide with vectorised particles;
  ``log_importance_weights`` and the reconstruction/KL decomposition.
- :mod:`.inspection`: what a pair is made of, judged once (``inspect_pair``),
  and the one-line refusals (``PairError``).
- :mod:`.bounds`: pure tensor functions from log weights to ELBO, IWAE-k and
  their standard errors.
- :mod:`.evaluation`: those bounds over a whole data set.
- :mod:`.objectives`: training objectives (ELBO, IWAE, DReG).
- :mod:`.hierarchical`, :mod:`.surgery`, :mod:`.amortization`: the bounds of
  multi-layer encoders, the aggregate posterior, the Cremer split.
- :mod:`.ais`: annealed importance sampling with HMC and the BDMC sandwich.
- :mod:`.partition`, :mod:`.contrastive`: RBM log Z and CD/PCD training.
- :mod:`.reference`, :mod:`.diagnostics`: NUTS references, PSIS k-hat, ArviZ.
- :mod:`.training`, :mod:`.svi`, :mod:`.runs`, :mod:`.data`: the training
  skeleton, SVI on it, run directories, data sets; :mod:`.user_model`, a
  user's own model named on the command line.
- :mod:`.plots`: figures.

The library never parses arguments and never prints (progress bars aside).
Its public names are importable from the package itself, as ``pyro.infer``'s
are: ``from inference import log_importance_weights, iwae_bound, ...`` (see
``__all__``).
"""

__version__ = "0.1.0"

# The public API, by the module that defines each name. Imported on first use
# (PEP 562), so that ``import inference`` and the command's start stay fast;
# ``from inference import iwae_bound`` and ``inference.iwae_bound`` both work,
# and so do the module paths (``inference.bounds.iwae_bound``).
_PUBLIC = {
    "tracing": ("log_importance_weights", "elbo_decomposition"),
    "bounds": ("Bound", "elbo_bound", "iwae_bound"),
    "evaluation": ("evaluate_bounds",),
    "objectives": ("make_objective",),
    "inspection": ("inspect_pair", "PairError"),
    "hierarchical": ("hierarchical_bounds",),
    "amortization": ("amortization_split",),
    "surgery": ("aggregate_posterior_terms", "active_units"),
    "ais": ("annealed_log_marginal", "ais_over_data", "bdmc", "bdmc_joint", "AISEstimate"),
    "evidence": ("log_evidence", "bayes_factors", "Evidence"),
    "partition": ("exact_log_partition", "ais_log_partition"),
    "diagnostics": (
        "psis_khat",
        "importance_ess",
        "weights_to_datatree",
        "from_mcmc",
        "from_guide",
    ),  # fmt: skip
    "reference": ("run_nuts",),
    "data": ("load_dataset", "Dataset", "DataError"),
    "runs": ("TrainConfig", "load_run"),
    "svi": ("train",),
    "contrastive": ("RBMConfig", "train_rbm"),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
