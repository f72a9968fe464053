"""A training step captured once and compiled: Pyro's bookkeeping paid at capture, not per step.

For a fixed model/guide pair and a fixed minibatch shape, what Pyro does in
a step (trace the guide, replay it into the model, score every site, sum the
log weights) is the same sequence of tensor operations every time; only the
numbers change. :class:`CompiledStep` records that sequence once, forward
and backward together (``make_fx`` on fake tensors: no real computation, and
a model whose Python control flow depends on the data's values cannot be
captured, so it is never captured wrongly), and hands the graph to
inductor (gcc on CPU). Every later step is one call of compiled code with
the parameters and the minibatch as inputs.

Without inductor (``backend="replay"``) the recorded graph itself is run:
the same aten operations in the same order as the eager step, without
Pyro's tracing, distribution objects and autograd's tape, so the same loss
and gradients bit for bit (checked on the first step) at a fraction of the
Python overhead, for the cost of the capture alone (a fraction of a second).

Random numbers come from torch's own generator, exactly as in eager mode
(``fallback_random``), so a compiled step draws the same noise as the eager
one from the same state: the same loss and gradients to float rounding,
checked on the first step (a mismatch falls back to eager), and the same
exact-resume guarantee. Where capture does not apply (a model the capture
refuses, a minibatch of another shape such as an epoch's last) the step is
the eager one.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

import pyro
import torch

TOLERANCE = 1e-4  # relative, on the loss and on each gradient's norm
_warm_up: threading.Thread | None = None


def warm_up() -> None:
    """Start importing inductor and probing the CPU in the background (once per process).

    Inductor checks which vector instructions the CPU runs by compiling and
    loading small programs with gcc, about 1.5 s of waiting on subprocesses
    that a process pays before its first compiled kernel runs. Called where
    a run starts, this overlaps with loading the data and building the model;
    the first compiled step waits for it.
    """
    global _warm_up
    if _warm_up is None:

        def work():
            from torch._inductor import cpu_vec_isa

            _probe_concurrently(cpu_vec_isa)
            cpu_vec_isa.pick_vec_isa()
            from torch._inductor import compile_fx  # noqa: F401

        _warm_up = threading.Thread(target=work, name="elbolab-inductor-warm-up", daemon=True)
        _warm_up.start()


class _Loss(torch.nn.Module):
    """The objective's loss as a module, so that its parameters can be inputs of the graph."""

    def __init__(self, model: torch.nn.Module, objective, kwargs: dict) -> None:
        super().__init__()
        self.model, self.objective, self.kwargs = model, objective, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.objective.differentiable_loss(self.model.model, self.model.guide, x,
                                                  **self.kwargs)  # fmt: skip


def _probe_concurrently(cpu_vec_isa) -> None:
    """Inductor's checks of the vector instruction sets this CPU reports, run side by side.

    Each check loads a small compiled library in a child Python; inductor runs
    them one after another (about 10 children, 1.5 s on the test machine) and
    caches each result on its instruction set, so running them concurrently
    first leaves ``pick_vec_isa`` nothing to wait for. Anything unexpected in
    inductor's internals leaves the checks to inductor.
    """
    from concurrent.futures import ThreadPoolExecutor

    try:
        reported = cpu_vec_isa.x86_isa_checker()
        isas = [
            isa
            for isa in cpu_vec_isa.supported_vec_isa_list
            if all(flag in reported for flag in str(isa).split())
        ]
    except Exception:  # not x86, or inductor changed: its own sequential checks will run
        return
    if isas:
        with ThreadPoolExecutor(len(isas)) as pool:
            list(pool.map(bool, isas))


BACKENDS = ("inductor", "replay")


class CompiledStep:
    """Loss and gradients of ``objective`` on ``model``, captured for one minibatch shape.

    Parameters
    ----------
    model : torch.nn.Module
        With ``model`` and ``guide`` methods (elbolab's models, or yours).
    objective
        An :mod:`inference.objectives` objective.
    kwargs : dict
        Keyword arguments of the model and guide (``num_data``).
    backend : {"inductor", "replay"}
        Compile the captured graph, or run it as recorded (the eager step's
        numbers bit for bit).

    Attributes
    ----------
    compile_seconds : float
        Capture, compilation and the first-step check, once they happened.
    fallback : str or None
        Why the step is eager, when it is.
    """

    def __init__(
        self, model: torch.nn.Module, objective, kwargs: dict, *, backend: str = "inductor"
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.backend = backend
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
        from torch.fx.experimental.proxy_tensor import make_fx

        tic = time.perf_counter()
        if _warm_up is not None and self.backend == "inductor":
            _warm_up.join()  # whatever failed there fails again below, with its message
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
                inputs = [[p.detach() for p in self.params], x]
                if self.backend == "replay":
                    compiled = graph
                else:  # straight to inductor: the graph is traced, Dynamo would trace it again
                    compiled = _inductor(graph, inputs)
                torch.set_rng_state(state)
                c_loss, c_grads = compiled(*inputs)
        except Exception as err:  # any failure of capture or compilation: stay eager
            return self._give_up(why_not(err), tic, loss)
        exact = self.backend == "replay"
        mismatch = _mismatch(loss, c_loss, eager_grads, c_grads, exact=exact)
        if mismatch:
            for p, g in zip(self.params, eager_grads, strict=True):
                p.grad = g
            return self._give_up(mismatch, tic, loss)
        self.compiled = compiled
        for p, g in zip(self.params, c_grads, strict=True):
            p.grad = g
        self.compile_seconds = time.perf_counter() - tic
        return c_loss.detach()

    def _give_up(self, why: str, tic: float, loss: torch.Tensor) -> torch.Tensor:
        """Eager from now on; a compilation that was asked for says why (a replay is recorded)."""
        self.fallback = why
        self.compile_seconds = time.perf_counter() - tic
        if self.backend == "inductor":
            warnings.warn(f"training eagerly: the step could not be compiled ({why})",
                          RuntimeWarning, stacklevel=3)  # fmt: skip
        return loss


def why_not(err: Exception) -> str:
    """Why a capture or compilation failed, in one line: the error's type and first line."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first[:200]}"


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


def _inductor(graph: torch.fx.GraphModule, inputs: list) -> Callable:
    """``graph`` compiled by inductor, which looks it up in its on-disk cache first.

    The graph is already traced, so it goes to inductor directly (through
    Dynamo it would be traced again: seconds for a step's few thousand
    operations). Inductor's cache wants a shape environment, which a
    static-shape fake-tensor context provides.
    """
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with tracing(TracingContext(FakeTensorMode(shape_env=ShapeEnv()))):
        return torch._inductor.compile(graph, inputs, {"fallback_random": True})


def _mismatch(loss, c_loss, grads, c_grads, *, exact: bool = False) -> str | None:
    """Why the compiled step differs from the eager one beyond float rounding (None if not).

    ``exact``: any difference at all (a replay runs the eager step's operations).
    """
    if exact:
        same = torch.equal(loss, c_loss) and all(
            torch.equal(g, c) for g, c in zip(grads, c_grads, strict=True)
        )
        return None if same else "the replayed step differs from the eager one"
    scale = max(abs(float(loss)), 1.0)
    if not abs(float(loss) - float(c_loss)) <= TOLERANCE * scale:
        return f"the compiled loss {float(c_loss):.6g} differs from the eager {float(loss):.6g}"
    for i, (g, c) in enumerate(zip(grads, c_grads, strict=True)):
        norm = float(g.norm())
        if not float((g - c).norm()) <= TOLERANCE * max(norm, 1e-12) + 1e-12:
            return f"the compiled gradient of parameter {i} differs from the eager one"
    return None


class Captured:
    """``fn(*inputs)``, a tuple of tensors, recorded once for these input shapes.

    Every tensor ``fn`` reads besides its inputs (network weights, the data it
    closes over) is a constant of the recording, and what depends on
    constants alone (an encoder run on the fixed data, the weights'
    transposes) is computed once, here, instead of at every call: for an
    annealing run that evaluates one model thousands of times on the same
    data, that is the guide's whole network. :meth:`function` compiles the
    rest, or a part of it that computes only some of the outputs (dead code
    dropped: a gradient without the log density it comes from, for example).

    Inputs numbered in ``fixed`` change seldom (the data of an evaluation,
    many calls per batch): what depends on them and on constants alone (the
    guide's network on the batch) is computed once per new value, not at
    every call; a value is new when it is another tensor or was written to.

    Random draws stay where they are, one per call, from torch's generator
    as in eager mode (the same numbers from the same state); without
    ``random`` a function that draws is refused (``ValueError``). Raises
    whatever the recording raises (a function whose Python control flow
    depends on its inputs' values).
    """

    def __init__(
        self,
        fn: Callable,
        inputs: list[torch.Tensor],
        *,
        random: bool = False,
        fixed: tuple[int, ...] = (),
    ) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        self.inputs = [t.detach() for t in inputs]
        self.fixed = tuple(sorted(set(fixed)))
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            graph = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*self.inputs)
        if not random and any(_random(node) for node in graph.graph.nodes):
            raise ValueError("the function draws random numbers: it is not captured")
        self._pre, self.graph = _split_invariant(graph, self.fixed)
        self._bound: list[tuple[torch.Tensor, int]] | None = None
        self.rewrites: dict[str, int] = {}  # what the last compiled function's rewrites changed
        self.invariants = self._invariants(self.inputs)

    def _invariants(self, inputs) -> list[torch.Tensor]:
        """``pre`` on the fixed inputs among ``inputs``, computed again only for new values."""
        fixed = [inputs[i] for i in self.fixed]
        same = self._bound is not None and all(
            a is b and a._version == version
            for a, (b, version) in zip(fixed, self._bound, strict=True)
        )
        if not same:
            with torch.no_grad():
                self.invariants = [t.detach() for t in self._pre(*fixed)]
            self._bound = [(t, t._version) for t in fixed]
        return self.invariants

    def function(self, outputs: list[int], *, backend: str = "inductor") -> Callable:
        """A function of the inputs returning the outputs numbered ``outputs``, in that order."""
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        graph = _restrict(self.graph, outputs)
        if backend == "inductor":
            from .rewrites import rewrite

            self.rewrites = rewrite(graph)
            if _warm_up is not None:
                _warm_up.join()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                graph = _inductor(graph, [*self.inputs, *self.invariants])

        def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(graph(*inputs, *self._invariants(inputs)))

        return run


def _random(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in getattr(
        node.target, "tags", ()
    )


def _written(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes whose tensors ``node``'s operation writes into (in-place, ``out=``)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None or not schema.is_mutable:
        return []
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, torch.fx.Node):
            written.append(value)
    return written


def _view(node: torch.fx.Node) -> bool:
    """Whether ``node``'s result is a view of its first argument (it shares the storage)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None
                and not schema.returns[0].alias_info.is_write)  # fmt: skip


def _split_invariant(
    graph: torch.fx.GraphModule, fixed: tuple[int, ...] = ()
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """``(pre, main)``: ``pre`` computes what ``main`` needs from fixed inputs and constants.

    ``pre(*fixed_inputs)`` takes the inputs numbered ``fixed``;
    ``main(*inputs, *pre(*fixed_inputs))`` returns the graph's outputs as a flat list.
    """
    from torch import fx

    # what depends on an input or on a random draw (one per call), and any tensor that an
    # operation writes into (a buffer filled in place must be a new one at every call)
    written = {arg for node in graph.graph.nodes for arg in _written(node)}
    views = [n for n in written if _view(n)]
    while views:  # writing into a view writes into the tensor it views
        base = views.pop().args[0]
        if isinstance(base, torch.fx.Node) and base not in written:
            written.add(base)
            views += [base] if _view(base) else []
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    held = [placeholders[i] for i in fixed]
    varying = set()
    for node in graph.graph.nodes:
        if (
            (node.op == "placeholder" and node not in held)
            or _random(node)
            or node in written
            or any(a in varying for a in node.all_input_nodes)
        ):
            varying.add(node)
    nodes = list(graph.graph.nodes)
    output = nodes[-1]
    needed = {u for n in varying for u in n.all_input_nodes} | set(output.all_input_nodes)
    boundary = [n for n in nodes if n not in varying and n.op != "output" and n in needed]
    pre, env = fx.Graph(), {}
    for node in held:  # pre's inputs, in the order of ``fixed``
        env[node] = pre.placeholder(node.name)
    for node in nodes:
        if node not in varying and node.op not in ("output", "placeholder"):
            env[node] = pre.node_copy(node, env.__getitem__)
    pre.output(tuple(env[n] for n in boundary))
    pre.eliminate_dead_code()
    main, env = fx.Graph(), {}
    for node in nodes:
        if node.op == "placeholder":
            env[node] = main.placeholder(node.name)
    for i, node in enumerate(boundary):
        env[node] = main.placeholder(f"invariant_{i}")
    for node in nodes:
        if node in varying and node.op not in ("placeholder", "output"):
            env[node] = main.node_copy(node, env.__getitem__)
    main.output(fx.node.map_arg(list(output.args[0]), env.__getitem__))
    return fx.GraphModule(graph, pre), fx.GraphModule(torch.nn.Module(), main)


def _restrict(graph: torch.fx.GraphModule, outputs: list[int]) -> torch.fx.GraphModule:
    """A copy of ``graph`` returning only the outputs numbered ``outputs``, dead code dropped."""
    import copy

    restricted = copy.deepcopy(graph.graph)
    output = next(n for n in reversed(restricted.nodes) if n.op == "output")
    every = output.args[0]
    output.args = ([every[i] for i in outputs],)
    restricted.eliminate_dead_code()
    return torch.fx.GraphModule(graph, restricted)
