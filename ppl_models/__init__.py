"""Generative models as Pyro model/guide pairs. No objective code lives here."""

from .hierarchical import HierarchicalVAE
from .linear_gaussian import LinearGaussian
from .nets import mlp
from .vae import VAE, default_layout

MODELS = ("vae", "hvae", "linear-gaussian")


def build_model(name: str, *, x_dim: int, likelihood: str = "bernoulli", **options):
    """Construct a model by its command-line name.

    Parameters
    ----------
    name : {"vae", "hvae", "linear-gaussian"}
        The model.
    x_dim : int
        Data dimension.
    likelihood : str
        Observation model, for the VAE.
    **options
        Keyword arguments of the model's constructor (``hidden``, ``z_dim``,
        ``activation``, ``guide_type``, ``layers``, ``corruption``,
        ``word_counts``); ``None`` values take the defaults.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name == "vae":
        for key in ("layers", "corruption", "word_counts"):
            options.pop(key, None)
        return VAE(x_dim, likelihood=likelihood, **options)
    if name == "hvae":
        options.pop("guide_type", None)
        return HierarchicalVAE(x_dim, likelihood=likelihood, **options)
    if name == "linear-gaussian":
        if likelihood != "normal":
            raise ValueError("linear-gaussian is a Normal-likelihood model; use real-valued data")
        for key in ("hidden", "activation", "layers", "corruption", "word_counts"):
            options.pop(key, None)
        return LinearGaussian(x_dim, **options)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


__all__ = [
    "VAE",
    "HierarchicalVAE",
    "LinearGaussian",
    "mlp",
    "default_layout",
    "build_model",
    "MODELS",
]
