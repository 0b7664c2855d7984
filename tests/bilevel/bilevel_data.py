"""Small bilevel problems shared by the tests of optstab.bilevel.

* ``QUAD``: a quadratic with a closed-form solution. ``y`` is one ``8 x 2`` leaf, so
  BROS with ``rank < 8`` projects it; ``x`` has 3 entries. ``QUAD20`` is the same
  construction with 20 rows.

      g(x, y) = 0.5 <Y, A Y> - <Y, B x>          (A: 8 x 8 SPD, acts on rows of Y)
      f(x, y) = 0.5 ||Y - C||^2 + 0.5 mu ||x||^2

  so ``y*(x) = A^{-1} B x`` and ``z*(x) = A^{-1} (y*(x) - C)`` (the auxiliary variable
  tracks ``H^{-1} grad_y f``), and ``x*`` solves a 3 x 3 linear system.
* ``MLP``: a one-layer regression with a weight leaf ``w`` (6 x 3) and a bias ``b``
  (3,), inner loss ``log cosh`` (not quadratic: the Hessian depends on ``y``) plus an
  ``x``-controlled weight decay written as ``jnp.sum(w ** 2)``, outer loss a squared
  error on other data. Minibatches are ``(a, t)`` pairs.

Everything is built with numpy from fixed seeds, so module import is cheap.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from optstab import bilevel

# --------------------------------------------------------------- closed-form quadratic

QUAD_COLS, QUAD_X = 2, 3
QUAD_MU = 0.1


class Quadratic:
    """The closed-form quadratic with ``rows`` rows (see the module docstring).

    ``B`` is scaled by ``sqrt(8 / rows)`` so that the upper problem's curvature does not
    grow with ``rows``; ``rows = 8`` is ``QUAD``.
    """

    def __init__(self, rows: int):
        rng = np.random.default_rng(0)
        basis, _ = np.linalg.qr(rng.standard_normal((rows, rows)))
        a = basis @ np.diag(np.linspace(1.0, 3.0, rows)) @ basis.T
        b = 0.35 * np.sqrt(8 / rows) * rng.standard_normal((rows, QUAD_COLS, QUAD_X))
        c = rng.standard_normal((rows, QUAD_COLS))
        self.rows = rows
        self.a, self.b, self.c = (v.astype(np.float32) for v in (a, b, c))
        self.problem = bilevel.BilevelProblem(self.inner, self.outer, jnp.zeros((rows, QUAD_COLS)))

    def inner(self, x, y, batch):
        del batch
        y = y.astype(jnp.float32)
        return 0.5 * jnp.sum(y * (self.a @ y)) - jnp.sum(y * (self.b @ x.astype(jnp.float32)))

    def outer(self, x, y, batch):
        del batch
        x = x.astype(jnp.float32)
        return 0.5 * jnp.sum((y.astype(jnp.float32) - self.c) ** 2) + 0.5 * QUAD_MU * jnp.sum(x**2)

    def _float64(self):
        return (v.astype(np.float64) for v in (self.a, self.b, self.c))

    def solution(self):
        """``(x*, y*(x*), z*(x*))`` in float64 numpy."""
        a, b, c = self._float64()
        # y*(x) = M x with M = A^{-1} B as a (rows * cols x 3) matrix on the flattened y.
        m = np.linalg.solve(a, b.reshape(self.rows, -1)).reshape(-1, QUAD_X)
        x = np.linalg.solve(m.T @ m + QUAD_MU * np.eye(QUAD_X), m.T @ c.reshape(-1))
        y = (m @ x).reshape(self.rows, QUAD_COLS)
        z = np.linalg.solve(a, y - c)
        return x, y, z

    def ma_soba_by_hand(self, beta, gamma, theta, alpha, steps):
        """``x`` after ``steps`` MA-SOBA updates from zeros, chained with
        ``sgd(alpha)``, in float64 numpy (written from the formulas, no library code)."""
        a, b, c = self._float64()
        x, w = np.zeros(QUAD_X), np.zeros(QUAD_X)
        y = z = np.zeros((self.rows, QUAD_COLS))
        for _ in range(steps):
            grad_y_g = a @ y - b @ x
            hessian_z, grad_y_f = a @ z, y - c
            cross_z = -np.einsum("rcx,rc->x", b, z)  # J z = grad_x <grad_y g, z>
            direction = QUAD_MU * x - cross_z
            y, z = y - beta * grad_y_g, z - gamma * (hessian_z - grad_y_f)
            w = (1 - theta) * w + theta * direction
            x = x - alpha * w
        return x


_QUAD8 = Quadratic(8)
QUAD_ROWS = _QUAD8.rows
QUAD_A, QUAD_B, QUAD_C = _QUAD8.a, _QUAD8.b, _QUAD8.c
quad_inner, quad_outer = _QUAD8.inner, _QUAD8.outer
QUAD = _QUAD8.problem
quad_solution = _QUAD8.solution
# 20 rows: BROS projects y at every rank 1, 2, 4, 8, 16.
QUAD20 = Quadratic(20)


# ----------------------------------------------------------------- MLP-like problem

MLP_IN, MLP_OUT = 6, 3


def _mlp_data():
    rng = np.random.default_rng(1)
    truth = rng.standard_normal((MLP_IN, MLP_OUT))

    def data(n):
        a = rng.standard_normal((n, MLP_IN))
        t = a @ truth + 0.3 * rng.standard_normal((n, MLP_OUT))
        return a.astype(np.float32), t.astype(np.float32)

    return data(64), data(64)


(MLP_INNER_A, MLP_INNER_T), (MLP_OUTER_A, MLP_OUTER_T) = _mlp_data()


def mlp_inner(x, y, batch):
    a, t = batch
    pred = a @ y["w"] + y["b"] - x["shift"]
    fit = jnp.mean(jnp.sum(jnp.log(jnp.cosh(pred - t)), axis=-1))
    return fit + 0.5 * jnp.exp(x["log_decay"]) * jnp.sum(y["w"] ** 2)


def mlp_outer(x, y, batch):
    a, t = batch
    pred = a @ y["w"] + y["b"]
    return 0.5 * jnp.mean(jnp.sum((pred - t) ** 2, axis=-1)) + 0.01 * jnp.sum(x["shift"] ** 2)


def mlp_init_y(x):
    """A callable ``inner_init``: depends on ``x`` so that the tests can see it used."""
    return {
        "w": jnp.full((MLP_IN, MLP_OUT), 0.1) * jnp.exp(x["log_decay"]),
        "b": x["shift"] * 0.5,
    }


MLP = bilevel.BilevelProblem(mlp_inner, mlp_outer, mlp_init_y)
MLP_X = {"log_decay": jnp.float32(-1.0), "shift": jnp.array([0.1, -0.2, 0.3])}


def mlp_batches(steps: int, size: int = 16, seed: int = 0):
    """``steps`` inner and outer minibatches (numpy index draws), stacked for a scan."""
    rng = np.random.default_rng(seed)
    inner = rng.integers(0, len(MLP_INNER_A), (steps, size))
    outer = rng.integers(0, len(MLP_OUTER_A), (steps, size))
    return (
        (jnp.asarray(MLP_INNER_A[inner]), jnp.asarray(MLP_INNER_T[inner])),
        (jnp.asarray(MLP_OUTER_A[outer]), jnp.asarray(MLP_OUTER_T[outer])),
    )


def mlp_state(tx, seed: int = 0, count: int = 0):
    """A state of ``tx`` (built for ``MLP``) with nonzero ``y``, ``z`` and ``w``."""
    rng = np.random.default_rng(seed)
    state = tx.init(MLP_X)
    noisy = lambda tree: jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(np.shape(a)), a.dtype), tree
    )
    return state._replace(
        y=noisy(state.y), z=noisy(state.z), w=noisy(state.w), count=jnp.int32(count)
    )


# --------------------------------------------------------------------------- running


def run_fn(tx, x, state, inner_batches, outer_batches):
    """One update per stacked minibatch, in a ``lax.scan`` (not jitted).

    Returns ``(x, state, updates)`` with the updates stacked along a new axis.
    """

    def body(carry, batches):
        x, state = carry
        inner_batch, outer_batch = batches
        updates, state = tx.update(x, state, x, inner_batch=inner_batch, outer_batch=outer_batch)
        return (optax.apply_updates(x, updates), state), updates

    (x, state), updates = jax.lax.scan(body, (x, state), (inner_batches, outer_batches))
    return x, state, updates


run = jax.jit(run_fn, static_argnums=0)


def run_steps(tx, x, steps: int, state=None):
    """``steps`` jitted updates with both batches ``None`` (deterministic problems),
    ``x`` moved by each; returns ``(x, opt_state)``."""
    state = tx.init(x) if state is None else state
    return _run_steps(tx, steps, x, state)


def run_steps_fn(tx, x, steps: int, state=None):
    """:func:`run_steps` without the jit (to call inside a jitted or vmapped function)."""
    state = tx.init(x) if state is None else state

    def body(carry, _):
        x, state = carry
        updates, state = tx.update(x, state, x, inner_batch=None, outer_batch=None)
        return (optax.apply_updates(x, updates), state), None

    (x, state), _ = jax.lax.scan(body, (x, state), None, length=steps)
    return x, state


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_steps(tx, steps, x, state):
    return run_steps_fn(tx, x, steps, state)


def flat_hessian_parts(problem, x, y, inner_batch, outer_batch):
    """Dense float32 references at ``(x, y)`` on the flattened variables: ``grad_y g``,
    ``H``, ``cross`` (``cross @ z = J z``), ``grad_x f``, ``grad_y f``, plus the
    ``unravel`` functions of ``x`` and ``y``. ``problem`` must be hashable (its
    ``inner_init`` a function), as it is a static argument of the jitted part."""
    _, unravel_x = ravel_pytree(x)
    _, unravel_y = ravel_pytree(y)
    out = _dense_parts(problem, x, y, inner_batch, outer_batch)
    return {**out, "unravel_x": unravel_x, "unravel_y": unravel_y}


@functools.partial(jax.jit, static_argnums=0)
def _dense_parts(problem, x, y, inner_batch, outer_batch):
    flat_x, unravel_x = ravel_pytree(x)
    flat_y, unravel_y = ravel_pytree(y)
    g = lambda fx, fy: problem.inner_loss(unravel_x(fx), unravel_y(fy), inner_batch)
    f = lambda fx, fy: problem.outer_loss(unravel_x(fx), unravel_y(fy), outer_batch)
    grad_x_f, grad_y_f = jax.grad(f, (0, 1))(flat_x, flat_y)
    return {
        "grad_y_g": jax.grad(g, 1)(flat_x, flat_y),
        "hessian": jax.hessian(g, 1)(flat_x, flat_y),
        # cross[i, j] = d^2 g / (dx_i dy_j)
        "cross": jax.jacobian(jax.grad(g, 0), 1)(flat_x, flat_y),
        "grad_x_f": grad_x_f,
        "grad_y_f": grad_y_f,
    }
