"""Do BROS's projected ViT leaves stay factored? A check on the traced program.

BROS evaluates the losses at ``y + P B1 + Q B2`` through
:func:`optstab.bilevel.subspace.call_factored` and differentiates with respect to the
coordinates ``B``. If a projected leaf ``W`` (``m x n``) were formed densely anywhere
(``W + P B1``, or its full gradient ``a^T dh``), the traced program would hold an
``m x n`` (or ``n x m``) value that depends on ``B``. :func:`weight_shaped_values`
traces the two passes of a BROS step, the outer ``value_and_grad`` and the inner
forward-over-reverse product (the same calls as :mod:`optstab.bilevel.bros`), follows
which values depend on the coordinates (inside nested calls too) and counts those with
the shape of a projected leaf. With ``factored=False`` (the dense evaluation) the same
count must be positive: that is the control which shows the check can fail.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from optstab.bilevel import BilevelProblem, subspace


def _weight_shaped_dependents(closed: jex.ClosedJaxpr, shapes: set[tuple[int, ...]]) -> int:
    """How many values of ``closed`` depend on its inputs and have one of ``shapes``."""

    def visit(jaxpr, tainted) -> int:
        count = 0
        for eqn in jaxpr.eqns:
            hits = [not isinstance(v, jex.Literal) and v in tainted for v in eqn.invars]
            if not any(hits):
                continue
            for param in eqn.params.values():
                sub = param.jaxpr if isinstance(param, jex.ClosedJaxpr) else param
                if isinstance(sub, jex.Jaxpr) and len(sub.invars) == len(eqn.invars):
                    inner = {v for v, hit in zip(sub.invars, hits, strict=True) if hit}
                    count += visit(sub, inner)
            for out in eqn.outvars:
                tainted.add(out)
                count += tuple(out.aval.shape) in shapes
        return count

    return visit(closed.jaxpr, set(closed.jaxpr.invars))


def weight_shaped_values(
    problem: BilevelProblem, y: Any, x: Any, inner_batch: Any, outer_batch: Any, rank: int,
    factored: bool = True,
) -> dict:  # fmt: skip
    """Traces BROS's outer and inner passes at ``rank`` and counts coordinate-dependent
    values shaped like a projected leaf (``m x n`` or ``n x m``).

    A leaf shape that is also the shape of legitimate coordinate-sized values (``r x
    n`` or, with both probes stacked, ``2r x n``, for any projected leaf's ``n``) cannot
    tell a dense product from those and is left out: ``unchecked`` lists such shapes
    (none when ``2 * rank`` is below every projected leaf's smaller side). Choose batches
    whose activations cannot share a projected leaf's shape (one image does for the
    study's ViTs: its activations have ``tokens`` rows).

    Returns ``{"outer": count, "inner": count, "checked": shapes, "unchecked": shapes}``
    (sorted lists of ``(rows, columns)``).
    """
    probes = subspace.draw_probes(jax.random.key(0), y, rank)
    left = jax.tree.leaves(probes.left, is_leaf=lambda p: p is None)
    leaves = zip(left, jax.tree.leaves(y), strict=True)
    projected = [jnp.shape(leaf) for p, leaf in leaves if p is not None]
    weight_like = {shape for m, n in projected for shape in ((m, n), (n, m))}
    coordinate_like = {
        shape for _, n in projected for k in (rank, 2 * rank) for shape in ((k, n), (n, k))
    }
    shapes = weight_like - coordinate_like
    first = subspace.zero_coordinates(probes.left, y)

    def evaluate(loss):
        if factored:
            return lambda *args: subspace.call_factored(loss, *args)
        return loss

    def outer_pass(b1):
        def loss(b):
            return evaluate(problem.outer_loss)(
                x, subspace.shifted_one(y, probes.left, b, factored), outer_batch
            )

        return jax.value_and_grad(loss)(b1)

    def inner_pass(b1, b2, tangent):
        def loss(x_, b1_, b2_):
            shifted = subspace.shifted(y, probes, b1_, b2_, factored)
            return evaluate(problem.inner_loss)(x_, shifted, inner_batch)

        def gradients(b2_):
            return jax.value_and_grad(loss, argnums=(0, 1))(x, b1, b2_)

        return jax.jvp(gradients, (b2,), (tangent,))

    return {
        "outer": _weight_shaped_dependents(jax.make_jaxpr(outer_pass)(first), shapes),
        "inner": _weight_shaped_dependents(jax.make_jaxpr(inner_pass)(first, first, first), shapes),
        "checked": sorted(shapes),
        "unchecked": sorted(weight_like & coordinate_like),
    }
