"""Exact rewrites of a recorded graph: the same function, in operations the compiler runs faster.

A graph recorded by ``make_fx`` (:class:`inference.compiled.Captured`) goes
to inductor as it is. Two of its operations cost far more on a CPU than
what they compute calls for, and each has an equivalent form, equal in real
arithmetic, that costs less:

- **The Bernoulli log-likelihood summed over its event**, sum_i x_i l_i -
  softplus(l_i). ``softplus`` is ``log1p(exp(l))`` per element; for logits
  below about -26 (a decoder's background pixels: a fifth of binarized
  MNIST's) ``exp(l)`` is tiny and the vectorised ``log1p`` goes through
  subnormal intermediates, which x86 CPUs handle in microcode, 10 to 15
  times slower. With softplus(l) = max(l, 0) + log(1 + exp(-|l|)), the
  sum of the logarithms is the logarithm of a product: the factors 1 +
  exp(-|l|) lie in (1, 2], so a product of up to 64 of them is exact to
  float rounding and cannot overflow, and one logarithm serves 64 elements
  (products over groups of 16-wide vectors). ``exp`` is taken of
  max(-|l|, floor) with a floor above the subnormal range: below the floor
  1 + exp(-|l|) is 1 in that precision either way. Above softplus's
  threshold (20), where it returns l itself, the factor is 1, as there.
- **tanh**, whose vectorised form in inductor's C++ is several times slower
  than ``exp``: tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|)
  (floored as above: a saturated unit would otherwise make e subnormal).
  The absolute error stays below 1e-7 in float32 (a few units in the last
  place of values near 1); near 0 the relative error is larger, the
  absolute one is not.

And one that only steers inductor: a product with a bias, ``addmm(b, a, w)``,
is lowered on the CPU as a copy of the bias into the whole output followed
by the product accumulating onto it; as ``mm(a, w) - (-b)`` (exact: the
negation is, and x - (-b) is x + b) the bias is added in the elementwise
kernel that follows the product anyway (inductor would fuse ``mm + b``
back into ``addmm``).

All are matched on the graph's nodes, never on a model's name; a graph
without the pattern is left as it is. The compiled function is checked
against the eager one by its caller, as before.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

LANES = 16  # elements per vector in the product's layout (AVX-512, float32)
GROUP = 64  # vectors per product: 2^64 at most, far from float32's 2^128
_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}  # exp() of these is not subnormal
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def rewrite(graph: fx.GraphModule) -> dict[str, int]:
    """Apply every rewrite to ``graph`` in place; how many places each changed."""
    counts = {
        "bernoulli_sum": bernoulli_sums(graph),
        "tanh": tanh(graph),
        "addmm": addmm(graph),
    }
    graph.graph.eliminate_dead_code()
    graph.recompile()
    return counts


def _call(node: fx.Node, targets) -> bool:
    return node.op == "call_function" and node.target in targets


def _sole_user(node: fx.Node, targets) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and _call(users[0], targets) else None


def _value(node) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _arg(node: fx.Node, index: int, name: str, default):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def bernoulli_sums(graph: fx.GraphModule) -> int:
    """sum_last(addcmul(-softplus(l), x, l)) as sum(x l - max(l, 0)) - log of block products.

    The pattern is ``BernoulliLogits.log_prob`` (``softplus``, negated,
    ``addcmul`` with the value) summed by ``to_event``'s reshape and sum
    over the last dimension; ``softplus`` with its default beta and no
    other use of the intermediate values.
    """
    g, count = graph.graph, 0
    for softplus in [n for n in g.nodes if _call(n, (aten.softplus.default,))]:
        logits = softplus.args[0]
        if _arg(softplus, 1, "beta", 1) != 1:
            continue
        neg = _sole_user(softplus, (aten.neg.default, aten.neg_.default))
        addcmul = neg and _sole_user(neg, (aten.addcmul.default, aten.addcmul_.default))
        if not addcmul or addcmul.args[0] is not neg or addcmul.args[2] is not logits:
            continue
        if _arg(addcmul, 3, "value", 1) != 1:
            continue
        summed, chain = addcmul, [softplus, neg, addcmul]
        while (view := _sole_user(summed, _VIEWS)) is not None:
            summed = view
            chain.append(view)
        total = _sole_user(summed, (aten.sum.dim_IntList,))
        l_val, out, s_val = _value(logits), _value(addcmul), _value(summed)
        if total is None or l_val is None or out is None or s_val is None:
            continue
        dims = _arg(total, 1, "dim", None)
        if (
            l_val.shape != out.shape  # the values must not broadcast the logits up
            or out.dtype not in _FLOOR
            or dims is None
            or [d % s_val.dim() for d in dims] != [s_val.dim() - 1]
            or _arg(total, 2, "keepdim", False)
            or total.kwargs.get("dtype") is not None
        ):
            continue
        threshold = _arg(softplus, 2, "threshold", 20)
        with g.inserting_before(total):
            total.replace_all_uses_with(_bernoulli_sum(
                g, logits, addcmul.args[1], list(s_val.shape), out.dtype, threshold
            ))  # fmt: skip
        for node in [total, *reversed(chain)]:  # each one's only use was the next
            g.erase_node(node)
        count += 1
    return count


def _bernoulli_sum(g: fx.Graph, logits, value, shape: list[int], dtype, threshold) -> fx.Node:
    def call(op, *args):
        return g.call_function(op, tuple(args))

    vectors = -(-shape[-1] // LANES)
    groups = -(-vectors // GROUP)
    per_group = -(-vectors // groups)
    padded = groups * per_group * LANES

    def blocks(node: fx.Node, fill: float) -> fx.Node:  # (..., n) -> (..., groups, per_group, 16)
        node = call(aten.reshape.default, node, shape)
        if padded != shape[-1]:
            node = call(aten.constant_pad_nd.default, node, [0, padded - shape[-1]], fill)
        return call(aten.view.default, node, [*shape[:-1], groups, per_group, LANES])

    # both reduced over the same axis, so that one pass over the logits computes the two
    linear = call(aten.addcmul.default, call(aten.neg.default, call(aten.relu.default, logits)),
                  value, logits)  # fmt: skip
    linear = call(aten.sum.dim_IntList, blocks(linear, 0.0), [-2])
    tail = call(aten.neg.default, call(aten.abs.default, logits))
    factor = call(aten.exp.default, call(aten.clamp_min.default, tail, _FLOOR[dtype]))
    # softplus(l) is l itself above its threshold: the factor 1 there, as in float32 anyway
    above = call(aten.gt.Scalar, logits, threshold)
    factor = call(aten.where.self, above, call(aten.zeros_like.default, factor), factor)
    factor = call(aten.prod.dim_int, blocks(call(aten.add.Tensor, factor, 1.0), 1.0), -2)
    terms = call(aten.sub.Tensor, linear, call(aten.log.default, factor))
    return call(aten.sum.dim_IntList, terms, [-1, -2])


def tanh(graph: fx.GraphModule) -> int:
    """Every floating-point ``tanh(x)`` as sign(x) (1 - e) / (1 + e), e = exp(-2|x|)."""
    g, count = graph.graph, 0
    for node in [n for n in g.nodes if _call(n, (aten.tanh.default,))]:
        x = node.args[0]
        if _value(x) is None or _value(x).dtype not in _FLOOR:
            continue
        with g.inserting_before(node):
            magnitude = g.call_function(aten.abs.default, (x,))
            exponent = g.call_function(aten.mul.Tensor, (magnitude, -2.0))
            floor = _FLOOR[_value(x).dtype]  # below it e is too small to change 1 - e or 1 + e
            e = g.call_function(aten.exp.default, (
                g.call_function(aten.clamp_min.default, (exponent, floor)),
            ))  # fmt: skip
            ratio = g.call_function(aten.div.Tensor, (
                g.call_function(aten.rsub.Scalar, (e, 1.0)),
                g.call_function(aten.add.Tensor, (e, 1.0)),
            ))  # fmt: skip
            node.replace_all_uses_with(g.call_function(aten.copysign.Tensor, (ratio, x)))
        g.erase_node(node)
        count += 1
    return count


def addmm(graph: fx.GraphModule) -> int:
    """Every ``addmm(b, a, w)`` (no scaling) as ``mm(a, w) - (-b)``."""
    g, count = graph.graph, 0
    for node in [n for n in g.nodes if _call(n, (aten.addmm.default,))]:
        if len(node.args) != 3 or node.kwargs:  # alpha or beta given
            continue
        bias, a, w = node.args
        with g.inserting_before(node):
            product = g.call_function(aten.mm.default, (a, w))
            negated = g.call_function(aten.neg.default, (bias,))
            node.replace_all_uses_with(g.call_function(aten.sub.Tensor, (product, negated)))
        g.erase_node(node)
        count += 1
    return count
