"""Gradient-level perturbation as an Optax transform.

Part of the perturbed forward-backward SGD lab (arXiv 2602.20646, reconstructed; see
:mod:`optstab.perturb.ops`). :func:`perturbed_updates` perturbs the incoming update
(the parameter gradient itself) with the modes of :mod:`optstab.perturb.ops`, per leaf:
``"relative"`` gives each leaf a perturbation of norm ``scale * ||g_leaf||``,
``"absolute"`` of norm ``scale``. It is the perturbation of the last backward step,
where the cotangent meets the parameters, and lets any Optax optimizer be stressed.

Complex leaves are supported: each element's real and imaginary parts are perturbed
as two real coordinates (norms of ``|z|``, both parts rounded in ``"round"`` mode; see
:mod:`optstab.perturb.ops`), and the update keeps its complex dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optstab._checks import check_range, is_concrete_number
from optstab.perturb import ops, schedules


class PerturbedUpdatesState(NamedTuple):
    count: jax.Array  # () int32 number of updates so far
    key: jax.Array  # () typed PRNG key; step t uses fold_in(key, t)


def perturbed_updates(
    scale: schedules.Schedule | jax.typing.ArrayLike,
    mode: str = "relative",
    key: jax.Array | int = 0,
    *,
    fmt: str = "float8_e4m3",
    rounding: str = "nearest",
) -> optax.GradientTransformationExtraArgs:
    """Adds a perturbation to every leaf of the update.

    Each leaf ``g`` becomes ``g + delta`` with ``delta`` drawn as in
    :func:`optstab.perturb.forward` (per leaf: ``"relative"`` gives
    ``||delta|| = scale * ||g||``, ``"absolute"`` ``||delta|| = scale``), from the key
    ``fold_in(key, count)`` split over the leaves. Float leaves keep their dtype;
    complex leaves keep theirs and have both parts perturbed.

    Args:
      scale: perturbation size ``>= 0``: a number, an array (``inject_hyperparams``) or
        a schedule ``count -> size`` from :mod:`optstab.perturb.schedules`.
      mode: ``"absolute"``, ``"relative"``, ``"bias"`` or ``"round"``.
      key: PRNG key or int seed; stored in the state.
      fmt / rounding: options of the ``"round"`` mode.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra arguments are ignored.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optstab import perturb
      >>> tx = optax.chain(perturb.perturbed_updates(0.5, mode="bias"), optax.sgd(1.0))
      >>> params = {"w": jnp.ones(2)}
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> updates["w"]
      Array([-0.5, -0.5], dtype=float32)
    """
    if not callable(scale):
        check_range("scale", scale, lambda s: s >= 0, ">= 0")
    spec = ops.make_spec(mode, fmt, rounding)
    schedule = schedules.as_schedule(scale)

    def init_fn(params: Any) -> PerturbedUpdatesState:
        del params
        return PerturbedUpdatesState(jnp.zeros((), jnp.int32), schedules.as_key(key))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        if is_concrete_number(scale) and scale == 0:
            return updates, state._replace(count=optax.safe_increment(state.count))
        size = schedule(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        keys = jax.random.split(jax.random.fold_in(state.key, state.count), max(len(leaves), 1))
        new_leaves = [
            ops.apply_perturbation(g, k, size, spec) for g, k in zip(leaves, keys, strict=False)
        ]
        return (
            jax.tree.unflatten(treedef, new_leaves),
            state._replace(count=optax.safe_increment(state.count)),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
