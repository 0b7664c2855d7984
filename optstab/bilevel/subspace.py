"""Random subspaces for BROS: Rademacher probes and factored evaluation.

Part of BROS (arXiv 2605.10288, reconstructed; see :mod:`optstab.bilevel.bros`).

**Probes.** Every 2-D leaf ``W`` (``m x n``) of the lower variable with more than
``rank`` rows gets two independent Rademacher matrices ``P, Q`` (``m x r``, entries
``+-1/sqrt(r)``), so ``E[P P^T] = I``. Other leaves (biases, small or 1-D tensors)
stay in full space. A leaf's coordinates are ``B`` (``r x n``) for a projected leaf
and a full-shape array otherwise; :func:`lift` maps them back (``P B``).

**Factored evaluation.** Derivatives in the subspace are taken through coordinates,
``G(B1, B2) = g(x, y + P B1 + Q B2)`` at ``B = 0``. Forming ``y + P B1`` and
differentiating a loss through it would cost as much as full space: autodiff keeps
each layer input ``a`` (``batch x m``) and builds the full ``m x n`` gradient
``a^T dh`` before projecting it. :func:`call_factored` instead traces the loss to a
jaxpr and evaluates it with every projected leaf held as ``(W, (P, B1), (Q, B2))``.
Where the leaf is an operand of a matrix product (``dot_general``: ``a @ W``,
``W.T @ a``, ``jnp.einsum('bnd,dh->bnh', a, W)``, ``jnp.einsum('bnh,dh->bnd', a, W)``,
dense layers, attention and MLP projections) contracted on one of its axes, with the
other axis free, it computes ``a @ W + (a @ P) @ B1 + (a @ Q) @ B2`` (contracted on
the rows; ``a @ W^T + (a @ B1^T) @ P^T + ...`` on the columns); autodiff then keeps
``a P`` (``batch x r``) and yields ``P^T grad`` directly as ``(a P)^T dh``. Activations
may carry any number of batch axes; transposes of the leaf stay factored. Any other use
of the leaf (an embedding lookup, an elementwise function, a ``dot_general`` with a
batch axis on the leaf itself) receives the dense sum, so the result is always exact;
only the memory saving is lost there. A full sum of squares of the leaf
(``jnp.sum(W ** 2)``, the usual weight decay) is also evaluated from factors. This
rewriting is our engineering of the "projected-linear VJP" the paper describes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jex

PyTree = Any


class Probes(NamedTuple):
    """Per-leaf probe pair; ``None`` for leaves kept in full space."""

    left: PyTree  # P per leaf: (m, r) float32, or None
    right: PyTree  # Q per leaf: (m, r) float32, or None


def is_projected(leaf: Any, rank: int) -> bool:
    """Whether a leaf of the lower variable lives in a rank-``rank`` subspace.

    2-D leaves with more than ``rank`` rows are projected. Narrow leaves (``n <= r``)
    are projected too: their saving is nil, but on XLA:CPU keeping a wide network's
    narrow output layer in full space measured 0.27x the weights' size *more* peak
    memory (the scheduler then kept an extra copy of a hidden weight).
    """
    return jnp.ndim(leaf) == 2 and jnp.shape(leaf)[0] > rank


def rademacher(key: jax.Array, rows: int, rank: int) -> jax.Array:
    """An ``rows x rank`` matrix with independent entries ``+-1/sqrt(rank)``."""
    signs = jax.random.rademacher(key, (rows, rank), jnp.float32)
    return signs * (1.0 / jnp.sqrt(jnp.float32(rank)))


def draw_probes(key: jax.Array, y: PyTree, rank: int) -> Probes:
    """Independent ``P`` and ``Q`` for every projected leaf of ``y``."""
    leaves, treedef = jax.tree.flatten(y)
    left, right = [], []
    for index, leaf in enumerate(leaves):
        if is_projected(leaf, rank):
            key_p, key_q = jax.random.split(jax.random.fold_in(key, index))
            left.append(rademacher(key_p, jnp.shape(leaf)[0], rank))
            right.append(rademacher(key_q, jnp.shape(leaf)[0], rank))
        else:
            left.append(None)
            right.append(None)
    return Probes(jax.tree.unflatten(treedef, left), jax.tree.unflatten(treedef, right))


def _map(fn: Callable, probes: PyTree, *trees: PyTree) -> PyTree:
    """``fn(probe_or_None, *leaves)`` over the leaves of ``trees``."""
    return jax.tree.map(fn, probes, *trees, is_leaf=lambda p: p is None)


def zero_coordinates(probes: PyTree, y: PyTree) -> PyTree:
    """Float32 zero coordinates: ``r x n`` for projected leaves, full shape otherwise."""

    def zeros(p, leaf):
        shape = jnp.shape(leaf) if p is None else (p.shape[1], jnp.shape(leaf)[1])
        return jnp.zeros(shape, jnp.float32)

    return _map(zeros, probes, y)


def restrict(probes: PyTree, tree: PyTree) -> PyTree:
    """Coordinates ``P^T t`` of ``tree`` (``t`` itself for full-space leaves)."""
    return _map(lambda p, t: t if p is None else p.T @ t.astype(jnp.float32), probes, tree)


def lift(probes: PyTree, coordinates: PyTree) -> PyTree:
    """``P B`` for projected leaves, ``B`` for full-space leaves."""
    return _map(lambda p, b: b if p is None else p @ b, probes, coordinates)


def lift_descend(
    probes: PyTree, tree: PyTree, coordinates: PyTree, lr: jax.Array, scales: PyTree = None
) -> PyTree:
    """``tree - lr * s * P B`` leaf by leaf, in float32, kept in ``tree``'s dtype.

    ``scales`` holds one factor ``s`` per leaf of ``tree``, a Python float or a ``()``
    array (``None``: all 1).
    """
    if scales is None:
        scales = jax.tree.map(lambda _: 1.0, tree)

    def update(p, t, b, s):
        if p is not None and t.dtype == jnp.float32:
            return subtract_low_rank(t, p, b, lr * s)
        step = b if p is None else p @ b
        return (t.astype(jnp.float32) - (lr * s) * step).astype(t.dtype)

    return _map(update, probes, tree, coordinates, scales)


def subtract_low_rank(t: jax.Array, p: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """``t - c * P @ B`` for a float32 ``t``, as ``r`` rank-one updates in a loop.

    Each update is elementwise, so XLA applies it in place to a donated ``t``; the
    product ``P @ B`` would first be materialised as a second ``m x n`` array (16 MiB
    for a 2048 x 2048 leaf). Elementwise, it also keeps ``t``'s sharding (a loop over
    row blocks would gather a row-sharded ``t``).
    """

    def rank_one(k, t):
        column = jax.lax.dynamic_slice_in_dim(p, k, 1, axis=1)  # m x 1
        row = jax.lax.dynamic_slice_in_dim(b, k, 1, axis=0)  # 1 x n
        return t - c * (column * row)

    return jax.lax.fori_loop(0, p.shape[1], rank_one, t)


def second_moment(rows: int, rank: int) -> float:
    """``E||P P^T v||^2 / ||v||^2 = 1 + (rows - 1) / rank`` for an ``rows x rank``
    Rademacher probe ``P`` (entries ``+-1/sqrt(rank)``) and any ``v``: the diagonal of
    ``P P^T`` is 1 and each of its ``rows - 1`` off-diagonal entries per row has
    variance ``1 / rank``."""
    return 1.0 + (rows - 1) / rank


# ----------------------------------------------------------------------- factored evaluation


class Factored:
    """A matrix ``base + sum_k P_k B_k`` kept as its factors (internal to evaluation),
    or its transpose when ``transposed``."""

    __slots__ = ("base", "factors", "transposed")

    def __init__(
        self,
        base: jax.Array,
        factors: tuple[tuple[jax.Array, jax.Array], ...],
        transposed: bool = False,
    ):
        self.base = base
        self.factors = factors
        self.transposed = transposed

    @property
    def shape(self):
        return self.base.shape[::-1] if self.transposed else self.base.shape

    @property
    def dtype(self):
        return self.base.dtype

    def dense(self) -> jax.Array:
        out = self.base
        for p, b in self.factors:
            out = out + (p @ b).astype(out.dtype)
        return out.T if self.transposed else out

    def seen_factors(self) -> tuple[jax.Array, jax.Array]:
        """``(L, R)`` with ``self = base' + L R`` as seen (``base'`` the base, transposed
        if ``self`` is): all factors stacked, ``L = [P_1 .. P_K]`` and ``R = [B_1; ..;
        B_K]``, or ``L = R_plain^T`` and ``R = L_plain^T`` when transposed."""
        dtype = self.base.dtype
        left = jnp.concatenate([p.astype(dtype) for p, _ in self.factors], axis=1)
        right = jnp.concatenate([b.astype(dtype) for _, b in self.factors], axis=0)
        return (right.T, left.T) if self.transposed else (left, right)


class SquaredFactored:
    """The elementwise square of a :class:`Factored` matrix, kept lazy so that a full
    sum of it (a weight-decay term) can be taken without forming the matrix."""

    __slots__ = ("root", "dtype")

    def __init__(self, root: Factored, dtype: Any = None):
        self.root = root
        self.dtype = root.dtype if dtype is None else dtype  # after a cast of the square

    def dense(self) -> jax.Array:
        return jnp.square(self.root.dense()).astype(self.dtype)

    def total(self) -> jax.Array:
        """``sum((W + sum_k P_k B_k)^2)`` from ``r x n`` and ``r x r`` products only."""
        base = self.root.base.astype(self.dtype)
        factors = [(p.astype(self.dtype), b.astype(self.dtype)) for p, b in self.root.factors]
        out = jnp.sum(jnp.square(base))
        for p, b in factors:
            out = out + 2 * jnp.sum((p.T @ base) * b)
            for q, c in factors:
                out = out + jnp.sum(((p.T @ q) @ c) * b)
        return out


_LAZY = (Factored, SquaredFactored)


def shifted(y: PyTree, probes: Probes, first: PyTree, second: PyTree, factored: bool) -> PyTree:
    """``y + P B1 + Q B2`` per leaf; projected leaves as :class:`Factored` if asked."""

    def leaf_fn(p, q, leaf, b1, b2):
        if p is None:
            return leaf + b1.astype(leaf.dtype) + b2.astype(leaf.dtype)
        value = Factored(leaf, ((p, b1), (q, b2)))
        return value if factored else value.dense()

    return jax.tree.map(
        leaf_fn, probes.left, probes.right, y, first, second, is_leaf=lambda p: p is None
    )


def shifted_one(y: PyTree, probes: PyTree, coordinates: PyTree, factored: bool) -> PyTree:
    """``y + P B`` per leaf; projected leaves as :class:`Factored` if asked."""

    def leaf_fn(p, leaf, b):
        if p is None:
            return leaf + b.astype(leaf.dtype)
        value = Factored(leaf, ((p, b),))
        return value if factored else value.dense()

    return _map(leaf_fn, probes, y, coordinates)


def call_factored(fn: Callable[..., jax.Array], *args: Any) -> Any:
    """``fn(*args)`` where leaves of ``args`` may be :class:`Factored` matrices.

    Traces ``fn`` once to a jaxpr on the arguments' shapes and evaluates it with the
    factored leaves kept factored through matrix products (see the module docstring).
    """
    is_factored = lambda leaf: isinstance(leaf, Factored)
    leaves, treedef = jax.tree.flatten(args, is_leaf=is_factored)
    leaves = [leaf if is_factored(leaf) else jnp.asarray(leaf) for leaf in leaves]
    shapes = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]

    def flat_fn(*flat):
        return fn(*jax.tree.unflatten(treedef, flat))

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*shapes)
    outs = _evaluate(closed.jaxpr, closed.consts, leaves)
    outs = [out.dense() if isinstance(out, _LAZY) else out for out in outs]
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


_CALL_PRIMITIVES = ("pjit", "jit", "closed_call", "core_call")


def _evaluate(jaxpr: jex.Jaxpr, consts: list[Any], args: list[Any]) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(var):
        return var.val if isinstance(var, jex.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(var) for var in eqn.invars]
        if any(isinstance(v, _LAZY) for v in invals):
            outvals = _evaluate_factored(eqn, invals)
        else:
            outvals = _bind(eqn, invals)
        for var, val in zip(eqn.outvars, outvals, strict=True):
            if not isinstance(var, jex.DropVar):
                env[var] = val
    return [read(var) for var in jaxpr.outvars]


def _bind(eqn: jex.JaxprEqn, invals: list[Any], **param_updates: Any) -> list[Any]:
    params = eqn.primitive.get_bind_params({**eqn.params, **param_updates})
    subfuns = ()
    if isinstance(params, tuple):  # jax < 0.7 returns (subfuns, params)
        subfuns, params = params
    context = eqn.ctx.manager if hasattr(eqn, "ctx") else contextlib.nullcontext()
    with context:
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _evaluate_factored(eqn: jex.JaxprEqn, invals: list[Any]) -> list[Any]:
    name = eqn.primitive.name
    if name == "dot_general":
        out = _factored_dot(eqn, *invals)
        if out is not None:
            return [out]
    elif name in _CALL_PRIMITIVES and isinstance(eqn.params.get("jaxpr"), jex.ClosedJaxpr):
        sub = eqn.params["jaxpr"]
        return _evaluate(sub.jaxpr, sub.consts, invals)
    elif name == "convert_element_type" and isinstance(invals[0], Factored):
        factored = invals[0]
        base = _bind(eqn, [factored.base])[0]
        return [Factored(base, factored.factors, factored.transposed)]
    elif name == "transpose" and isinstance(invals[0], Factored) and invals[0].base.ndim == 2:
        factored = invals[0]
        return [Factored(factored.base, factored.factors, not factored.transposed)]
    elif name == "convert_element_type" and isinstance(invals[0], SquaredFactored):
        return [SquaredFactored(invals[0].root, eqn.params["new_dtype"])]
    elif _is_square(eqn, invals):
        return [SquaredFactored(invals[0])]
    elif name == "reduce_sum" and isinstance(invals[0], SquaredFactored):
        if sorted(eqn.params["axes"]) == list(range(invals[0].root.base.ndim)):
            return [invals[0].total()]
    dense = [v.dense() if isinstance(v, _LAZY) else v for v in invals]
    return _bind(eqn, dense)


def _is_square(eqn: jex.JaxprEqn, invals: list[Any]) -> bool:
    """``W ** 2``, ``square(W)`` or ``W * W`` of one factored matrix."""
    if not isinstance(invals[0], Factored):
        return False
    name = eqn.primitive.name
    return (
        name == "square"
        or (name == "integer_pow" and eqn.params["y"] == 2)
        or (name == "mul" and invals[1] is invals[0])
    )


def _factored_dot(eqn: jex.JaxprEqn, lhs: Any, rhs: Any) -> jax.Array | None:
    """A matrix product with one factored operand ``W = W0 + L R``, without forming it.

    ``W`` may be either operand and contracted on either axis; its other axis must be
    free (no batch dimensions on ``W``). With ``W``'s axis 0 contracted the product is
    ``op(x, W0) + op(op(x, L), R)``; with axis 1 contracted, ``op(x, W0) +
    op(op(x, R), L)``, where the inner ``op`` is the original product with ``W``
    replaced by a thin factor (its free axis then has the rank's size) and the outer
    one contracts that axis. Returns ``None`` where this does not apply.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
    w_is_lhs = isinstance(lhs, Factored)
    if w_is_lhs == isinstance(rhs, Factored) or lhs_batch or rhs_batch:
        return None
    w, other = (lhs, rhs) if w_is_lhs else (rhs, lhs)
    w_contract = lhs_contract if w_is_lhs else rhs_contract
    if w.base.ndim != 2 or len(w_contract) != 1:
        return None
    left, right = w.seen_factors()
    if w_contract[0] == 0:  # W's rows are summed over: x -> x L (rank-sized) -> (x L) R
        thin, then, then_axis = left, right, 0
    else:  # W's columns are summed over: x -> x R^T (rank-sized) -> (x R^T) L^T
        thin, then, then_axis = right, left, 1
    operands = [thin, other] if w_is_lhs else [other, thin]
    projected = _bind(eqn, operands)[0].astype(w.dtype)
    # The rank-sized axis is where W's free axis was: first of the output if W is the
    # left operand, last if it is the right one.
    if w_is_lhs:
        numbers = (((then_axis,), (0,)), ((), ()))
        part = _bind(eqn, [then, projected], dimension_numbers=numbers)[0]
    else:
        numbers = (((projected.ndim - 1,), (then_axis,)), ((), ()))
        part = _bind(eqn, [projected, then], dimension_numbers=numbers)[0]
    base = w.base.T if w.transposed else w.base
    out = _bind(eqn, [base, other] if w_is_lhs else [other, base])[0]
    return out + part.astype(out.dtype)
