"""A training step captured once and compiled: Pyro's bookkeeping paid at capture, not per step.

For a fixed model/guide pair and a fixed minibatch shape, what Pyro does in
a step (trace the guide, replay it into the model, score every site, sum the
log weights) is the same sequence of tensor operations every time; only the
numbers change. :class:`CompiledStep` records that sequence once, forward
and backward together (``make_fx`` on fake tensors: no real computation, and
a model whose Python control flow depends on the data's values cannot be
captured, so it is never captured wrongly), and hands the graph to
``torch.compile`` (inductor; gcc on CPU). Every later step is one call of
compiled code with the parameters and the minibatch as inputs.

Random numbers come from torch's own generator, exactly as in eager mode
(``fallback_random``), so a compiled step draws the same noise as the eager
one from the same state: the same loss and gradients to float rounding,
checked on the first step (a mismatch falls back to eager), and the same
exact-resume guarantee. Where capture does not apply (a model the capture
refuses, a minibatch of another shape such as an epoch's last) the step is
the eager one.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import pyro
import torch

TOLERANCE = 1e-4  # relative, on the loss and on each gradient's norm


class _Loss(torch.nn.Module):
    """The objective's loss as a module, so that its parameters can be inputs of the graph."""

    def __init__(self, model: torch.nn.Module, objective, kwargs: dict) -> None:
        super().__init__()
        self.model, self.objective, self.kwargs = model, objective, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.objective.differentiable_loss(self.model.model, self.model.guide, x,
                                                  **self.kwargs)  # fmt: skip


class CompiledStep:
    """Loss and gradients of ``objective`` on ``model``, compiled for one minibatch shape.

    Parameters
    ----------
    model : torch.nn.Module
        With ``model`` and ``guide`` methods (elbolab's models, or yours).
    objective
        An :mod:`inference.objectives` objective.
    kwargs : dict
        Keyword arguments of the model and guide (``num_data``).

    Attributes
    ----------
    compile_seconds : float
        Capture, compilation and the first-step check, once they happened.
    fallback : str or None
        Why the step is eager, when it is.
    """

    def __init__(self, model: torch.nn.Module, objective, kwargs: dict) -> None:
        self.model, self.objective, self.kwargs = model, objective, kwargs
        self.loss_module = _Loss(model, objective, kwargs)
        self.names = [n for n, p in self.loss_module.named_parameters() if p.requires_grad]
        self.params = [p for p in self.loss_module.parameters() if p.requires_grad]
        self.shape: torch.Size | None = None
        self.compiled: Callable | None = None
        self.compile_seconds = 0.0
        self.fallback: str | None = None

    def _step(self, params, x):
        from torch.func import functional_call  # on first use: it imports torch._dynamo

        loss = functional_call(self.loss_module, dict(zip(self.names, params, strict=True)), (x,))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        zero = torch.zeros_like
        return loss, [zero(p) if g is None else g for g, p in zip(grads, params, strict=True)]

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        """The eager step: the loss, with ``.grad`` of every parameter set."""
        loss = self.objective.differentiable_loss(self.model.model, self.model.guide, x,
                                                  **self.kwargs)  # fmt: skip
        loss.backward()
        return loss.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """One step on ``x``: the loss, with ``.grad`` of every parameter set."""
        if self.fallback is None and self.compiled is None:
            return self._first(x)
        if self.compiled is None or x.shape != self.shape:
            return self.eager(x)
        loss, grads = self.compiled([p.detach() for p in self.params], x)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        return loss

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        """Capture and compile on the first minibatch; check against eager on it."""
        from torch._inductor import config as inductor
        from torch.fx.experimental.proxy_tensor import make_fx

        tic = time.perf_counter()
        self.shape = x.shape
        state = torch.get_rng_state()
        loss = self.eager(x)  # also lets the objective settle its plate layout before capture
        eager_grads = [p.grad.clone() for p in self.params]
        try:
            with pyro.validation_enabled(False), warnings.catch_warnings():
                # torch's own deprecation notices while it compiles are no reason to stay eager
                warnings.simplefilter("ignore", DeprecationWarning)
                inputs = [p.detach().requires_grad_() for p in self.params]
                graph = make_fx(lambda params, x: self._step(params, x), tracing_mode="fake")(
                    inputs, x
                )
                graph = _deduplicate(graph)
                with inductor.patch(fallback_random=True):
                    compiled = torch.compile(graph, dynamic=False)
                    torch.set_rng_state(state)
                    c_loss, c_grads = compiled([p.detach() for p in self.params], x)
        except Exception as err:  # any failure of capture or compilation: stay eager
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
            return self._give_up(f"{type(err).__name__}: {first[:200]}", tic, loss)
        mismatch = _mismatch(loss, c_loss, eager_grads, c_grads)
        if mismatch:
            for p, g in zip(self.params, eager_grads, strict=True):
                p.grad = g
            return self._give_up(mismatch, tic, loss)
        self.compiled = _InductorRandom(compiled)
        for p, g in zip(self.params, c_grads, strict=True):
            p.grad = g
        self.compile_seconds = time.perf_counter() - tic
        return c_loss.detach()

    def _give_up(self, why: str, tic: float, loss: torch.Tensor) -> torch.Tensor:
        self.fallback = why
        self.compile_seconds = time.perf_counter() - tic
        warnings.warn(f"training eagerly: the step could not be compiled ({why})", RuntimeWarning,
                      stacklevel=3)  # fmt: skip
        return loss


def _deduplicate(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The graph with repeated computations done once (common subexpressions).

    A step recomputes what it already has: DReG evaluates the guide three
    times on the same data, a plug-in replays it. Random and in-place
    operations are never merged (each draw stays its own).
    """
    from torch.fx.passes.dialect.common.cse_pass import CSEPass, get_CSE_banned_ops

    merged = CSEPass(banned_ops=get_CSE_banned_ops())(graph).graph_module
    merged.graph._codegen = graph.graph._codegen  # the same (params, x) calling convention
    merged.recompile()
    return merged


class _InductorRandom:
    """Calls the compiled graph with torch's generator behind its random numbers."""

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled

    def __call__(self, *args):
        from torch._inductor import config as inductor

        with inductor.patch(fallback_random=True):
            return self.compiled(*args)


def _mismatch(loss, c_loss, grads, c_grads) -> str | None:
    """Why the compiled step differs from the eager one beyond float rounding (None if not)."""
    scale = max(abs(float(loss)), 1.0)
    if not abs(float(loss) - float(c_loss)) <= TOLERANCE * scale:
        return f"the compiled loss {float(c_loss):.6g} differs from the eager {float(loss):.6g}"
    for i, (g, c) in enumerate(zip(grads, c_grads, strict=True)):
        norm = float(g.norm())
        if not float((g - c).norm()) <= TOLERANCE * max(norm, 1e-12) + 1e-12:
            return f"the compiled gradient of parameter {i} differs from the eager one"
    return None
