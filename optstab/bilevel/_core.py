"""The engine shared by the single-loop bilevel solvers (SOBA, MA-SOBA, BROS).

A solver is a *step*: from the state and the current ``x`` it proposes the new lower
variable ``y``, the new (unprojected) auxiliary variable ``z`` and a hypergradient
estimate ``D``, and says whether everything it computed was finite.
:func:`bilevel_transform` wraps a step into an Optax transform and owns what every
solver shares: checking the inputs, the moving average ``w``, the projection of ``z``,
skipping non-finite steps, and the counters.

Non-finite steps (ours, in the manner of ``optax.apply_if_finite``): when a loss, a
gradient or a Hessian/Jacobian product of the step is not finite, the step directions
are replaced by zeros *before* they are applied, so ``y``, ``z`` and ``w`` keep their
values exactly, the transform outputs zeros (``x`` does not move), ``nonfinite``
counts the skipped update and ``count`` still advances (schedules and probe draws see
every call).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optstab._random import as_key
from optstab.bilevel import oracles
from optstab.bilevel.problem import BilevelProblem, BilevelState, PyTree, initial_inner

MISSING = object()  # a batch may legitimately be None (deterministic problems)


class Proposal(NamedTuple):
    """What one solver step proposes; :func:`bilevel_transform` applies it."""

    direction: PyTree  # float32 hypergradient estimate D, the structure of x
    y: PyTree  # new lower variable (equal to the old one where the step was not finite)
    z: PyTree  # new float32 auxiliary variable, before the projection onto the ball
    finite: jax.Array  # () bool: every loss and derivative of the step was finite
    output_scale: float | jax.Array = 1.0  # the transform outputs output_scale * w
    stats: PyTree = None  # new solver statistics (None: keep the state's)


# step(state, x, inner_batch, outer_batch) -> Proposal
Step = Callable[[BilevelState, PyTree, Any, Any], Proposal]


def fresh_state(
    y: PyTree, x: PyTree, key: jax.Array | int, nonfinite_shape=(), stats: PyTree = ()
) -> BilevelState:
    """A solver's state before its first update: ``z`` and ``w`` zero in float32, no
    updates counted (``nonfinite`` of shape ``nonfinite_shape``: one per node for D-SOBA)."""
    zeros = lambda a: jnp.zeros(jnp.shape(a), jnp.float32)
    return BilevelState(
        y=y,
        z=jax.tree.map(zeros, y),
        w=jax.tree.map(zeros, x),
        key=as_key(key),
        count=jnp.zeros([], jnp.int32),
        nonfinite=jnp.zeros(nonfinite_shape, jnp.int32),
        stats=stats,
    )


def descend(tree: PyTree, direction: PyTree, lr: jax.Array) -> PyTree:
    """``tree - lr * direction``, computed in float32 and kept in ``tree``'s dtype."""
    return jax.tree.map(
        lambda t, d: (t.astype(jnp.float32) - lr * d).astype(t.dtype), tree, direction
    )


def all_finite(*trees: PyTree) -> jax.Array:
    """A () bool: whether every entry of every leaf of ``trees`` is finite."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(trees)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def zero_unless(ok: jax.Array, tree: PyTree) -> PyTree:
    """``tree`` where ``ok``, else zeros of the same shapes (``0 * nan`` would be nan)."""
    return jax.tree.map(lambda t: jnp.where(ok, t, jnp.zeros_like(t)), tree)


def project_ball(tree: PyTree, radius: jax.typing.ArrayLike | None) -> PyTree:
    """``tree`` scaled onto the ball ``||tree|| <= radius`` (unchanged if ``None``)."""
    if radius is None:
        return tree
    norm = optax.tree.norm(tree)
    factor = jnp.minimum(1.0, radius / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return jax.tree.map(lambda t: t * factor, tree)


# ------------------------------------------------------------------------- input checks


def check_like_state(x: PyTree, w: PyTree) -> None:
    """Raises ``ValueError`` unless ``x`` has the tree and leaf shapes ``init`` saw."""
    x_def, w_def = jax.tree.structure(x), jax.tree.structure(w)
    if x_def != w_def:
        raise ValueError(
            f"params (x) has tree structure {x_def}, but the state was initialised for {w_def}"
        )
    for (path, leaf), want in zip(
        jax.tree_util.tree_flatten_with_path(x)[0], jax.tree.leaves(w), strict=True
    ):
        if jnp.shape(leaf) != want.shape:
            where = f" leaf {jax.tree_util.keystr(path)}" if path else ""
            raise ValueError(
                f"params (x){where} has shape {jnp.shape(leaf)}, but the state was "
                f"initialised for shape {want.shape}"
            )


def check_losses(problem: BilevelProblem, x: PyTree, y: PyTree, inner: Any, outer: Any) -> None:
    """Traces both losses on these inputs (no computation); raises ``ValueError`` if one
    fails on them (a batch of the wrong shape, say) or does not return a real scalar."""
    for name, batch_name, loss, batch in (
        ("inner_loss", "inner_batch", problem.inner_loss, inner),
        ("outer_loss", "outer_batch", problem.outer_loss, outer),
    ):
        try:
            out = jax.eval_shape(loss, x, y, batch)
        except Exception as error:  # re-raised with the call that failed
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise ValueError(
                f"problem.{name}(x, y, {batch_name}) fails on these inputs: "
                f"{type(error).__name__}: {first_line}"
            ) from error
        if not (
            isinstance(out, jax.ShapeDtypeStruct)
            and out.shape == ()
            and jnp.issubdtype(out.dtype, jnp.floating)
        ):
            got = (
                f"shape {out.shape}, dtype {out.dtype}"
                if isinstance(out, jax.ShapeDtypeStruct)
                else f"a {jax.tree.structure(out)}"
            )
            raise ValueError(f"problem.{name} must return a real scalar, got {got}")


def _abstract_signature(tree: PyTree) -> Any:
    """A hashable ``(treedef, shapes and dtypes)`` of ``tree``; ``None`` if unhashable."""
    leaves, treedef = jax.tree.flatten(tree)
    try:
        signature = (treedef, tuple((jnp.shape(a), jnp.result_type(a)) for a in leaves))
        hash(signature)
    except (TypeError, ValueError):
        return None
    return signature


# ------------------------------------------------------------------------ the transform


def bilevel_transform(
    problem: BilevelProblem,
    step: Step,
    average: jax.typing.ArrayLike,
    radius: jax.typing.ArrayLike | None,
    key: jax.Array | int,
    init_stats: Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Optax transform around ``step``: checks, averaging, projection, skipping.

    ``init_stats(y0)`` gives the initial ``stats`` field of the state (``()`` if
    ``None``); the step returns the new statistics in its proposal.
    """
    checked: set = set()  # input signatures whose losses were already checked

    def init_fn(x: PyTree) -> BilevelState:
        y = initial_inner(problem, x)
        stats = () if init_stats is None else init_stats(y)
        return fresh_state(y, x, key, stats=stats)

    def update_fn(
        updates, state, params=None, *, inner_batch=MISSING, outer_batch=MISSING, **extra
    ):
        del updates, extra
        if params is None:
            raise ValueError("bilevel transforms need params (the upper variable x)")
        if inner_batch is MISSING or outer_batch is MISSING:
            raise ValueError("bilevel transforms need the inner_batch and outer_batch args")
        check_like_state(params, state.w)
        signature = _abstract_signature((params, state.y, inner_batch, outer_batch))
        if signature is None or signature not in checked:  # trace the losses once per
            check_losses(problem, params, state.y, inner_batch, outer_batch)  # signature
            checked.add(signature)

        proposal = step(state, params, inner_batch, outer_batch)
        ok = proposal.finite
        theta = jnp.where(ok, average, 0.0)  # a skipped step keeps w exactly
        direction = zero_unless(ok, proposal.direction)
        w = jax.tree.map(lambda w_, d: (1 - theta) * w_ + theta * d, state.w, direction)
        # A skipped step leaves z as it was (already inside the ball): no rescaling.
        radius_now = None if radius is None else jnp.where(ok, radius, jnp.inf)
        new_state = BilevelState(
            y=proposal.y,
            z=project_ball(proposal.z, radius_now),
            w=w,
            key=state.key,
            count=optax.safe_increment(state.count),
            nonfinite=state.nonfinite + jnp.where(ok, 0, 1).astype(jnp.int32),
            stats=state.stats if proposal.stats is None else proposal.stats,
        )
        output = zero_unless(ok, w)
        scale = proposal.output_scale
        if not (isinstance(scale, float | int) and scale == 1.0):
            output = jax.tree.map(lambda o: scale * o, output)
        return oracles.cast_like(output, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
