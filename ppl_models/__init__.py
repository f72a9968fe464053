"""Generative models as Pyro model/guide pairs. No objective code lives here."""

from .linear_gaussian import LinearGaussian
from .nets import mlp
from .vae import VAE, default_layout

MODELS = ("vae", "linear-gaussian")


def build_model(name: str, *, x_dim: int, likelihood: str = "bernoulli", **options):
    """Construct a model by its command-line name.

    Parameters
    ----------
    name : {"vae", "linear-gaussian"}
        The model.
    x_dim : int
        Data dimension.
    likelihood : str
        Observation model, for the VAE.
    **options
        Keyword arguments of the model's constructor (``hidden``, ``z_dim``,
        ``activation``, ``guide_type``); ``None`` values take the defaults.
    """
    options = {k: v for k, v in options.items() if v is not None}
    if name == "vae":
        return VAE(x_dim, likelihood=likelihood, **options)
    if name == "linear-gaussian":
        if likelihood != "normal":
            raise ValueError("linear-gaussian is a Normal-likelihood model; use real-valued data")
        options.pop("hidden", None)
        options.pop("activation", None)
        return LinearGaussian(x_dim, **options)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


__all__ = ["VAE", "LinearGaussian", "mlp", "default_layout", "build_model", "MODELS"]
