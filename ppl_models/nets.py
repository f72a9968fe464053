"""The one multilayer-perceptron builder every elbolab model uses."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
}


def mlp(sizes: Sequence[int], *, activation: str = "tanh") -> nn.Sequential:
    """Build a fully connected network ``sizes[0] -> ... -> sizes[-1]``.

    The activation follows every layer but the last, whose output is linear
    (logits, locations or unconstrained scales, as the caller decides).

    Parameters
    ----------
    sizes : sequence of int
        Layer widths, input first; at least two entries, all positive.
    activation : str
        One of ``ACTIVATIONS``.

    Returns
    -------
    torch.nn.Sequential
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"mlp needs at least two positive layer sizes, got {sizes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
