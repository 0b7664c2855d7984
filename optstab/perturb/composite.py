"""Composite models of N sequential operators with per-operator perturbation points.

The model of the perturbed forward-backward SGD lab (arXiv 2602.20646, reconstructed;
see :mod:`optstab.perturb.ops`):

    z_0 = x,   z_i = f_i(z_{i-1}; w_i)  (i = 1..N),   loss = l(z_N, y) + R(w).

Each operator owns one parameter *block* ``w_i``. Both perturbation points of operator
``i`` sit on its output ``z_i``: the forward perturbation replaces ``z_i`` by
``z_i + delta_i``; the backward perturbation adds ``xi_i`` to the cotangent arriving at
``z_i``, so it changes the gradients of blocks ``1..i`` and no others. Operator ``i`` has
local Lipschitz constants ``L_i = ||d z_i / d z_{i-1}||`` and ``M_i = ||d z_i / d w_i||``
(spectral norms of the Jacobians over the whole batch), which
:func:`jacobian_norms` computes exactly or by power iteration.

Which of the ``2N`` points exist is static (:class:`Points`, ``Injection.points``): a
point that is not built adds no operation to the computation, while a built point at a
traced size 0 is an exact identity that still costs a ``lax.cond``.
:class:`~optstab.perturb.Perturbation` builds only the points it names, so idle points
cost nothing (``Composite.make_injection`` builds every point unless told otherwise).

Operators: :func:`dense` (affine map with an optional tanh or relu), :func:`linear` (a
square bias-free factor of a deep linear factorisation, initialised as ``gain`` times a
random orthogonal matrix, so its Lipschitz constant starts at ``gain``) and
:func:`logistic_head` (a dense map to one logit). Losses: ``"logistic"`` (binary
labels in {0, 1}, one logit) and ``"softmax"`` (integer labels). Regularisers:
``"l2"``, ``lambda * sum(w**2)`` (convex), and ``"nonconvex"``,
``lambda * sum(w**2 / (1 + w**2))``; they act on every parameter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from optstab import tree as otree
from optstab._checks import check_range
from optstab.perturb import ops

ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    None: lambda z: z,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
}
LOSSES = ("logistic", "softmax")
REGULARIZERS = (None, "l2", "nonconvex")


class Operator(NamedTuple):
    """One operator: ``init(key, in_dim) -> (params, out_dim)``, ``apply(params, z) -> z``."""

    name: str
    init: Callable[[jax.Array, int], tuple[Any, int]]
    apply: Callable[[Any, jax.Array], jax.Array]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Points:
    """Which perturbation points of a :class:`Composite` are built (static, no leaves).

    A point that is not built is not traced at all: it adds no operation to the
    computation, whereas a built point at a traced size 0 is an exact identity that
    still costs a ``lax.cond`` at run time.

    Attributes:
      forward: one bool per operator: is its forward point built.
      backward: one bool per operator: is its backward point built.
    """

    forward: tuple[bool, ...]
    backward: tuple[bool, ...]

    @classmethod
    def every(cls, num_operators: int) -> Points:
        """Every forward and backward point."""
        return cls((True,) * num_operators, (True,) * num_operators)


class Injection(NamedTuple):
    """The perturbations of one forward-backward pass.

    Attributes:
      keys: ``(N, 2)`` PRNG keys; ``keys[i, 0]`` draws operator ``i``'s forward
        perturbation, ``keys[i, 1]`` its backward one.
      forward: ``(N,)`` float32 forward sizes, one per operator.
      backward: ``(N,)`` float32 backward sizes, one per operator.
      points: the :class:`Points` that are built (static); ``None`` builds all ``2N``.
        The size of a point that is not built is ignored.
    """

    keys: jax.Array  # (N, 2) PRNG keys: [:, 0] forward, [:, 1] backward
    forward: jax.Array  # (N,) float32 forward sizes
    backward: jax.Array  # (N,) float32 backward sizes
    points: Points | None = None  # static: which points exist (None: all of them)


def dense(out_dim: int, activation: str | None = None, use_bias: bool = True) -> Operator:
    """``act(z @ W + b)``; ``W`` is LeCun-normal, ``b`` starts at zero."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    act = ACTIVATIONS[activation]

    def init(key, in_dim):
        params = {"w": jax.random.normal(key, (in_dim, out_dim)) / jnp.sqrt(in_dim)}
        if use_bias:
            params["b"] = jnp.zeros((out_dim,))
        return params, out_dim

    def apply(params, z):
        out = z @ params["w"]
        return act(out + params["b"] if use_bias else out)

    return Operator(f"dense{out_dim}" + (f"_{activation}" if activation else ""), init, apply)


def linear(gain: float = 1.0) -> Operator:
    """A square factor ``z @ W`` of a deep linear network, ``W = gain * orthogonal``."""
    check_range("gain", gain, lambda g: g > 0, "> 0")

    def init(key, in_dim):
        return {"w": gain * jax.nn.initializers.orthogonal()(key, (in_dim, in_dim))}, in_dim

    return Operator("linear", init, lambda params, z: z @ params["w"])


def logistic_head(use_bias: bool = True) -> Operator:
    """A dense map to one logit per example."""
    return dense(1, None, use_bias)._replace(name="logistic_head")


class Composite:
    """N sequential operators, a loss and a regulariser, with perturbation points.

    Args:
      operators: the operators ``f_1 .. f_N`` in order.
      loss: ``"logistic"`` (one logit, labels in {0, 1}) or ``"softmax"``.
      regularizer: ``None``, ``"l2"`` or ``"nonconvex"``.
      reg_strength: ``lambda >= 0``.
      forward_mode / backward_mode: perturbation modes of :mod:`optstab.perturb.ops`.
      fmt / rounding: options of the ``"round"`` mode.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from optstab import perturb
      >>> model = perturb.Composite(
      ...     [perturb.dense(4, "tanh"), perturb.logistic_head()], regularizer="l2",
      ...     reg_strength=1e-3)
      >>> params = model.init(jax.random.key(0), in_dim=3)
      >>> x, y = jnp.ones((5, 3)), jnp.array([0, 1, 1, 0, 1])
      >>> loss = model.loss(params, x, y)
      >>> grads = jax.grad(model.loss)(params, x, y)
      >>> len(grads) == model.num_operators == 2
      True
    """

    def __init__(
        self,
        operators: Sequence[Operator],
        loss: str = "logistic",
        regularizer: str | None = None,
        reg_strength: jax.typing.ArrayLike = 0.0,
        forward_mode: str = "relative",
        backward_mode: str = "relative",
        fmt: str = "float8_e4m3",
        rounding: str = "nearest",
    ):
        if not operators:
            raise ValueError("operators must hold at least one operator")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if regularizer not in REGULARIZERS:
            raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}")
        check_range("reg_strength", reg_strength, lambda v: v >= 0, ">= 0")
        self.operators = tuple(operators)
        self.loss_name = loss
        self.regularizer = regularizer
        self.reg_strength = reg_strength
        self.forward_spec = ops.make_spec(forward_mode, fmt, rounding)
        self.backward_spec = ops.make_spec(backward_mode, fmt, rounding)

    @property
    def num_operators(self) -> int:
        return len(self.operators)

    def init(self, key: jax.Array, in_dim: int) -> tuple:
        """Parameters: a tuple with one block (pytree) per operator."""
        blocks = []
        keys = jax.random.split(key, self.num_operators)
        for op, op_key in zip(self.operators, keys, strict=True):
            params, in_dim = op.init(op_key, in_dim)
            blocks.append(params)
        return tuple(blocks)

    def perturb_output(self, i: int, z: jax.Array, injection: Injection | None) -> jax.Array:
        """Applies operator ``i``'s forward then backward perturbation to its output.

        Only the points that ``injection.points`` builds are traced; the others leave
        ``z`` untouched and add nothing to the computation.
        """
        if injection is None:
            return z
        points = Points.every(self.num_operators) if injection.points is None else injection.points
        if points.forward[i]:
            z = ops._forward(z, injection.keys[i, 0], injection.forward[i], self.forward_spec)
        if points.backward[i]:
            z = ops._backward(z, injection.keys[i, 1], injection.backward[i], self.backward_spec)
        return z

    def activations(self, params: tuple, x: jax.Array, injection: Injection | None = None):
        """All outputs ``[z_1, ..., z_N]`` (perturbed when ``injection`` is given)."""
        z, outputs = x, []
        for i, op in enumerate(self.operators):
            z = self.perturb_output(i, op.apply(params[i], z), injection)
            outputs.append(z)
        return outputs

    def apply(self, params: tuple, x: jax.Array, injection: Injection | None = None):
        """The output ``z_N``."""
        return self.activations(params, x, injection)[-1]

    def data_loss_from_output(self, z: jax.Array, y: jax.Array) -> jax.Array:
        """``l(z_N, y)``, a mean over the batch, in float32."""
        z = z.astype(jnp.float32)
        if self.loss_name == "logistic":
            return optax.sigmoid_binary_cross_entropy(z[..., 0], y.astype(jnp.float32)).mean()
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    def regularization(self, params: tuple) -> jax.Array:
        """``R(w)`` summed over every parameter."""
        if self.regularizer is None:
            return jnp.zeros((), jnp.float32)
        leaves = [jnp.asarray(p, jnp.float32) for p in jax.tree.leaves(params)]
        if self.regularizer == "l2":
            total = sum(jnp.sum(p**2) for p in leaves)
        else:
            total = sum(jnp.sum(p**2 / (1.0 + p**2)) for p in leaves)
        return jnp.asarray(self.reg_strength, jnp.float32) * total

    def loss(self, params: tuple, x: jax.Array, y: jax.Array, injection: Injection | None = None):
        """``l(z_N, y) + R(w)``; gradients of this are the (perturbed) block gradients."""
        z = self.apply(params, x, injection)
        return self.data_loss_from_output(z, y) + self.regularization(params)

    def gradient(self, params, x, y, injection: Injection | None = None) -> tuple:
        """Block gradients ``(g_1, ..., g_N)`` of :meth:`loss`."""
        return jax.grad(self.loss)(params, x, y, injection)

    def make_injection(
        self, keys: jax.Array, forward=None, backward=None, points: Points | None = None
    ) -> Injection:
        """An :class:`Injection` from ``(N, 2)`` keys and per-operator sizes (``None`` = 0).

        Every point is built unless ``points`` says otherwise (a size 0 is then an exact
        identity behind a ``lax.cond``); :meth:`Perturbation.injection
        <optstab.perturb.Perturbation.injection>` builds only the points it names.
        """
        n = self.num_operators

        def sizes(values):
            if values is None:
                return jnp.zeros((n,), jnp.float32)
            return jnp.broadcast_to(jnp.asarray(values, jnp.float32), (n,))

        if points is not None and (len(points.forward), len(points.backward)) != (n, n):
            raise ValueError(
                f"points must name {n} operators per direction, got "
                f"{len(points.forward)} forward and {len(points.backward)} backward"
            )
        return Injection(keys, sizes(forward), sizes(backward), points)


def block_norms(blocks: tuple) -> jax.Array:
    """``(N,)`` float32 L2 norm of each block."""
    return jnp.stack([otree.global_norm(block) for block in blocks])


def block_errors(perturbed: tuple, clean: tuple) -> jax.Array:
    """``(N,)`` per-block gradient error ``||g_hat_j - g_j||``."""
    return block_norms(jax.tree.map(lambda a, b: a - b, perturbed, clean))


def _spectral_norm_exact(fn: Callable, primal) -> jax.Array:
    flat, unravel = ravel_pytree(primal)
    jac = jax.jacfwd(lambda v: fn(unravel(v)).ravel())(flat)
    return jnp.linalg.norm(jac, ord=2)


def _spectral_norm_power(fn: Callable, primal, key: jax.Array, iters: int) -> jax.Array:
    _, jvp_fn = jax.linearize(fn, primal)
    _, vjp_fn = jax.vjp(fn, primal)
    flat, unravel = ravel_pytree(primal)
    v0 = jax.random.normal(key, flat.shape, jnp.float32)

    def body(_, v):
        w = ravel_pytree(vjp_fn(jvp_fn(unravel(v)))[0])[0]
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(jnp.float32).tiny)

    v = jax.lax.fori_loop(0, iters, body, v0 / jnp.linalg.norm(v0))
    return jnp.linalg.norm(jvp_fn(unravel(v)))


def jacobian_norms(
    model: Composite,
    params: tuple,
    x: jax.Array,
    method: str = "exact",
    key: jax.Array | None = None,
    iters: int = 20,
) -> tuple[jax.Array, jax.Array]:
    """Local Lipschitz constants ``(L, M)`` of every operator at ``(params, x)``.

    ``L_i = ||d z_i / d z_{i-1}||_2`` and ``M_i = ||d z_i / d w_i||_2``, spectral norms of
    the Jacobians of the unperturbed forward pass over the whole batch (``z_0 = x``).
    ``method="exact"`` forms each Jacobian (small models only); ``"power"`` runs
    ``iters`` steps of power iteration on ``J^T J`` (a lower estimate that converges
    from below), seeded by ``key``.
    """
    if method not in ("exact", "power"):
        raise ValueError(f"method must be 'exact' or 'power', got {method!r}")
    if method == "power" and key is None:
        key = jax.random.key(0)
    inputs = [x, *model.activations(params, x)[:-1]]
    lipschitz, block = [], []
    for i, op in enumerate(model.operators):
        wrt_input = lambda z, i=i, op=op: op.apply(params[i], z)  # noqa: E731
        wrt_params = lambda w, i=i, op=op: op.apply(w, inputs[i])  # noqa: E731
        if method == "exact":
            lipschitz.append(_spectral_norm_exact(wrt_input, inputs[i]))
            block.append(_spectral_norm_exact(wrt_params, params[i]))
        else:
            k1, k2 = jax.random.split(jax.random.fold_in(key, i))
            lipschitz.append(_spectral_norm_power(wrt_input, inputs[i], k1, iters))
            block.append(_spectral_norm_power(wrt_params, params[i], k2, iters))
    return jnp.stack(lipschitz), jnp.stack(block)
