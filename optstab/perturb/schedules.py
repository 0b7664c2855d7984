"""Perturbation-size schedules and the per-step, per-operator key layout.

A schedule maps the step count (an int array, 0 at the first step) to a float32
perturbation size, like an ``optax.Schedule``; every schedule is jit-compatible and its
numbers may be traced arrays. The decaying schedules use ``t = step + 1`` so that the
first step has size ``c``.

Keys: :func:`operator_keys` derives every perturbation of a step from one root key with
``fold_in(root, step)``, then splits it per operator and per direction. A clean run and
a perturbed run that draw their minibatches from a *different* key therefore share their
data order and differ only in the perturbation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from optstab._checks import check_count, check_range
from optstab._random import as_key  # noqa: F401  (re-exported: schedules.as_key)

Schedule = Callable[[jax.Array], jax.Array]


def _f32(value) -> jax.Array:
    return jnp.asarray(value, jnp.float32)


def constant(c: jax.typing.ArrayLike) -> Schedule:
    """``c`` at every step."""
    check_range("c", c, lambda v: v >= 0, ">= 0")
    return lambda step: _f32(c) * jnp.ones((), jnp.float32)


def inverse_sqrt(c: jax.typing.ArrayLike) -> Schedule:
    """``c / sqrt(t)`` with ``t = step + 1``."""
    check_range("c", c, lambda v: v >= 0, ">= 0")
    return lambda step: _f32(c) / jnp.sqrt(_f32(step) + 1.0)


def inverse(c: jax.typing.ArrayLike) -> Schedule:
    """``c / t`` with ``t = step + 1``."""
    check_range("c", c, lambda v: v >= 0, ">= 0")
    return lambda step: _f32(c) / (_f32(step) + 1.0)


def spike(
    t0: jax.typing.ArrayLike,
    size: jax.typing.ArrayLike,
    duration: jax.typing.ArrayLike = 1,
    base: Schedule | jax.typing.ArrayLike = 0.0,
) -> Schedule:
    """``size`` for ``t0 <= step < t0 + duration``, else ``base`` (a number or schedule)."""
    check_count("t0", t0)
    check_range("size", size, lambda v: v >= 0, ">= 0")
    check_range("duration", duration, lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1")
    base_schedule = base if callable(base) else constant(base)

    def schedule(step):
        inside = (step >= t0) & (step < jnp.asarray(t0) + duration)
        return jnp.where(inside, _f32(size), base_schedule(step))

    return schedule


def poisson_spikes(
    key: jax.Array,
    rate: jax.typing.ArrayLike,
    size: jax.typing.ArrayLike,
    duration: int = 1,
    base: Schedule | jax.typing.ArrayLike = 0.0,
    start: jax.typing.ArrayLike = 0,
) -> Schedule:
    """Spikes arriving as a Bernoulli(``rate``) process per step from ``start`` on.

    A spike starting at step ``s`` holds ``size`` for ``duration`` steps; between spikes
    the size is ``base``. Whether a spike starts at ``s`` depends only on
    ``fold_in(key, s)``, so the schedule is a pure function of the step.
    """
    check_range("rate", rate, lambda v: 0 <= v <= 1, "in [0, 1]")
    check_range("size", size, lambda v: v >= 0, ">= 0")
    if not isinstance(duration, int) or duration < 1:
        raise ValueError(f"duration must be an int >= 1 (a window length), got {duration!r}")
    base_schedule = base if callable(base) else constant(base)

    def starts_at(s):
        return (s >= start) & jax.random.bernoulli(jax.random.fold_in(key, s), rate)

    def schedule(step):
        recent = step - jnp.arange(duration)
        active = jnp.any(jax.vmap(starts_at)(recent) & (recent >= 0))
        return jnp.where(active, _f32(size), base_schedule(step))

    return schedule


def as_schedule(value: Schedule | jax.typing.ArrayLike | None) -> Schedule:
    """A schedule from a schedule, a number (constant) or ``None`` (zero)."""
    if value is None:
        return constant(0.0)
    return value if callable(value) else constant(value)


def operator_keys(root: jax.Array, step: jax.Array, num_operators: int) -> jax.Array:
    """Keys of one step, shape ``(num_operators, 2)``: column 0 forward, column 1 backward."""
    keys = jax.random.split(jax.random.fold_in(root, step), 2 * num_operators)
    return keys.reshape(num_operators, 2)
