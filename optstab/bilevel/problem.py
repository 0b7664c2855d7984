"""The bilevel problem and the state shared by SOBA, MA-SOBA and BROS.

Problem: ``min_x F(x) = f(x, y*(x))`` with ``y*(x) = argmin_y g(x, y)`` and ``g``
strongly convex in ``y``. All three solvers are single-loop: each update takes one
step on the lower variable ``y``, one on the auxiliary variable ``z`` (which tracks
``H^{-1} grad_y f``, ``H = grad^2_yy g``) and returns a hypergradient direction for the
upper variable ``x``, the Optax "params".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from optstab._checks import check_range, is_concrete_number

PyTree = Any
Loss = Callable[[PyTree, PyTree, Any], jax.Array]


class BilevelProblem(NamedTuple):
    """A stochastic bilevel problem.

    Attributes:
      inner_loss: ``g(x, y, batch) -> scalar``, strongly convex in ``y``.
      outer_loss: ``f(x, y, batch) -> scalar``.
      inner_init: the initial lower variable ``y0`` (a pytree), or a function
        ``x -> y0``.
    """

    inner_loss: Loss
    outer_loss: Loss
    inner_init: PyTree | Callable[[PyTree], PyTree]


class BilevelState(NamedTuple):
    """State of :func:`~optstab.bilevel.soba`, ``ma_soba``, ``bros`` and ``dsoba``.

    Under ``dsoba`` every field but ``key`` and ``count`` has a leading node axis
    (``nonfinite`` is ``(n,)``: each node counts its own skipped steps). The field
    order is the checkpoint format (``nonfinite`` and then ``stats`` were appended
    last, so a checkpoint written before they existed does not restore into this
    state).
    """

    y: PyTree  # lower variable, the dtype of inner_init
    z: PyTree  # float32 auxiliary variable, approximates H^{-1} grad_y f
    w: PyTree  # float32 moving average of the hypergradient, the structure of x
    key: jax.Array  # () typed PRNG key; BROS draws its probes from fold_in(key, period)
    count: jax.Array  # () int32 number of updates so far, skipped ones included
    nonfinite: jax.Array  # () int32 (dsoba: (n,)) updates skipped as not finite
    # Solver statistics: BROS's curvature statistics (per leaf of y, see
    # optstab.bilevel.bros); () for the other solvers.
    stats: PyTree = ()


def initial_inner(problem: BilevelProblem, x: PyTree) -> PyTree:
    """``y0``: ``problem.inner_init(x)`` when it is callable, else ``inner_init``."""
    init = problem.inner_init
    return init(x) if callable(init) else init


def as_schedule(name: str, value: optax.ScalarOrSchedule) -> optax.Schedule:
    """A step-size schedule from a number, an array or a schedule ``count -> size``."""
    if callable(value):
        return value
    check_range(name, value, lambda v: v > 0, "> 0")
    return lambda count: value


def check_problem(problem: Any) -> None:
    """Raises ``ValueError`` unless ``problem`` is a usable :class:`BilevelProblem`."""
    if not isinstance(problem, BilevelProblem):
        raise ValueError(f"problem must be a BilevelProblem, got {type(problem).__name__}")
    for name in ("inner_loss", "outer_loss"):
        if not callable(getattr(problem, name)):
            raise ValueError(f"problem.{name} must be callable")


def check_average(average: Any) -> None:
    check_range("average", average, lambda a: 0 < a <= 1, "in (0, 1]")


def check_radius(radius: Any) -> None:
    if radius is not None:
        check_range("radius", radius, lambda r: r > 0, "> 0 or None")


def check_positive_int(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is an array or a whole number >= 1."""
    if not (is_concrete_number(value) or hasattr(value, "dtype")):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    check_range(name, value, lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1")


def check_rank(rank: Any) -> None:
    """``rank`` sets array shapes, so it must be a Python int >= 1 (or ``None``)."""
    if rank is None:
        return
    if not (is_concrete_number(rank) and float(rank).is_integer() and rank >= 1):
        raise ValueError(
            f"rank must be a Python integer >= 1 or None (it is static: pass it in "
            f"inject_hyperparams' static_args), got {rank!r}"
        )
