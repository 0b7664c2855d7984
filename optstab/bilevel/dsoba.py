"""D-SOBA: decentralized single-loop stochastic bilevel optimisation (reconstructed).

D-SOBA (Kong, Zhu, Lu et al. 2024, https://arxiv.org/abs/2402.03167) runs SOBA on ``n``
nodes that each hold their own data and talk only to their neighbours in a graph with
doubly stochastic mixing matrix ``W`` (:mod:`optstab.bilevel.topology`). Only the
abstract is public: it names two variants, D-SOBA-SO (Hessian- and Jacobian-vector
products) and D-SOBA-FO (first-order gradients only), and studies how topology, data
heterogeneity and the nested structure enter the *transient iteration complexity*.
The iteration below is our reconstruction. Node ``i`` holds ``x_i, y_i, z_i, h_i`` and
its own losses ``g_i, f_i`` (the same functions on its own batches); one update
(adapt, then combine with the neighbours) is::

    y_i <- sum_j W[i, j] (y_j - beta  grad_y g_j)
    z_i <- sum_j W[i, j] (z_j - gamma (H_j z_j - grad_y f_j))
    h_i <- (1 - theta) h_i + theta (grad_x f_i - J_i z_i)
    x_i <- sum_j W[i, j] (x_j - alpha h_j)

with every oracle at the update's old ``(x_j, y_j, z_j)``. This transform computes the
first three lines and outputs ``h``; chain it as
``optax.chain(dsoba(...), optax.sgd(alpha), gossip(topology))`` for the fourth (``x``
moves with the freshly averaged ``h``, as MA-SOBA's ``x`` does with its ``w``). With
``W = 11^T / n`` and identical data on every node each node runs MA-SOBA.

``first_order=True`` (D-SOBA-FO) replaces the two products by central differences of
gradients, ``H z ~ (grad_y g(x, y + d z) - grad_y g(x, y - d z)) / (2 d)`` and ``J z``
likewise with ``grad_x g``; ours: ``d = fd_delta / max(||z_i||, 1)``, so the probe moves
``y`` by at most ``fd_delta`` (default ``1e-2``; exact up to rounding on a quadratic).

Execution. Every leaf of ``x``, of the state and of the batches has a leading node axis
of size ``n``. With ``mesh=None`` the nodes are a ``vmap`` on one device and mixing is
one ``roll`` per shift of the graph; with a mesh whose ``axis`` has one device per node,
the update runs in ``jax.shard_map``, each device computing its node's oracles and
mixing by ``ppermute`` with its neighbours only (:mod:`optstab.bilevel.mixing`).

Also ours: ``y0`` is ``inner_init(x_i)`` per node when ``inner_init`` is callable, else
the same ``inner_init`` on every node; ``z`` and ``h`` start at zero in float32. A node
whose losses or products are not finite skips its own adapt step (its ``y``, ``z``, ``h``
enter the mixing unchanged and its output is zero), as the centralized solvers skip a
step (:mod:`optstab.bilevel._core`); ``nonfinite`` counts the skips per node, so no
node needs to hear about another's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec

from optstab.bilevel import _core, mixing, oracles
from optstab.bilevel.problem import (
    BilevelProblem,
    BilevelState,
    PyTree,
    as_schedule,
    check_average,
    check_problem,
    check_radius,
)
from optstab.bilevel.topology import Topology


def dsoba(
    problem: BilevelProblem,
    topology: Topology,
    inner_lr: optax.ScalarOrSchedule,
    aux_lr: optax.ScalarOrSchedule,
    average: jax.typing.ArrayLike = 0.1,
    first_order: bool = False,
    *,
    radius: jax.typing.ArrayLike | None = None,
    fd_delta: float = 1e-2,
    mesh: Mesh | None = None,
    axis: str = "nodes",
    key: jax.Array | int = 0,
) -> optax.GradientTransformationExtraArgs:
    """D-SOBA over the nodes of ``topology``; outputs each node's averaged hypergradient.

    Args:
      problem: the :class:`~optstab.bilevel.BilevelProblem` of one node (its losses
        are evaluated on that node's batches).
      topology: the communication graph (:mod:`optstab.bilevel.topology`).
      inner_lr: ``beta``: a number, array or schedule ``count -> beta``.
      aux_lr: ``gamma``, likewise.
      average: ``theta`` in (0, 1] (1: D-SOBA without a moving average).
      first_order: ``False`` for D-SOBA-SO (Hessian/Jacobian-vector products),
        ``True`` for D-SOBA-FO (central differences of gradients).
      radius: optional ball radius for each node's ``z``.
      fd_delta: D-SOBA-FO's probe size in ``y`` (> 0).
      mesh: ``None`` (nodes vmapped on one device) or a mesh with one device per node
        along ``axis`` (``shard_map`` with ``ppermute`` between neighbours).
      axis: the mesh axis of the nodes.
      key: PRNG key or int seed kept in the state (unused by D-SOBA itself).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` over ``x`` (leading node axis). Its
      ``update(updates, state, x, inner_batch=..., outer_batch=...)`` ignores
      ``updates``; both batches carry a leading node axis; the output is ``h``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optstab import bilevel
      >>> from optstab.bilevel import topology
      >>> problem = bilevel.BilevelProblem(  # node i: y*(x) = x, f_i = (y - t_i)^2 / 2
      ...     inner_loss=lambda x, y, b: 0.5 * jnp.sum((y - x) ** 2),
      ...     outer_loss=lambda x, y, t: 0.5 * jnp.sum((y - t) ** 2),
      ...     inner_init=jnp.zeros(1))
      >>> ring = topology.ring(4)
      >>> tx = optax.chain(bilevel.dsoba(problem, ring, 0.5, 0.5, average=0.5),
      ...                  optax.sgd(0.1), bilevel.gossip(ring))
      >>> x, targets = jnp.zeros((4, 1)), jnp.arange(4.0)[:, None]  # mean target 1.5
      >>> state = tx.init(x)
      >>> for _ in range(300):
      ...     u, state = tx.update(x, state, x, inner_batch=targets, outer_batch=targets)
      ...     x = optax.apply_updates(x, u)
      >>> float(x.mean()).__round__(2), float(jnp.ptp(x)) < 0.2  # consensus near 1.5
      (1.5, True)

    References:
      Kong, Zhu, Lu et al., *Decentralized Bilevel Optimization: A Perspective from
      Transient Iteration Complexity*, https://arxiv.org/abs/2402.03167 (abstract only;
      reconstructed).
    """
    check_problem(problem)
    if not isinstance(topology, Topology):
        raise ValueError(f"topology must be an optstab.bilevel.topology.Topology, got {topology!r}")
    check_average(average)
    check_radius(radius)
    if not isinstance(first_order, bool):
        raise ValueError(f"first_order must be a bool, got {first_order!r}")
    if not (isinstance(fd_delta, int | float) and fd_delta > 0):
        raise ValueError(f"fd_delta must be a number > 0, got {fd_delta!r}")
    if mesh is not None:
        mixing.check_mesh(topology, mesh, axis)
    beta = as_schedule("inner_lr", inner_lr)
    gamma = as_schedule("aux_lr", aux_lr)
    inner = _fd_oracles(problem, fd_delta) if first_order else _product_oracles(problem)

    def local_step(x, y, z, w, inner_batch, outer_batch, count):
        """One node's adapt step: new w and the unmixed y, z (unchanged if not finite)."""
        outer = oracles.outer_gradients(problem, x, y, outer_batch)
        x_, z_, inner_batch = oracles.after(outer, x, z, inner_batch)
        inner_value, grad_y, hessian_z, cross_z = inner(x_, y, z_, inner_batch)
        aux = jax.tree.map(jnp.subtract, hessian_z, outer.y)
        direction = jax.tree.map(jnp.subtract, outer.x, cross_z)
        ok = _core.all_finite(outer.loss, inner_value, grad_y, aux, direction)
        y = _core.descend(y, _core.zero_unless(ok, grad_y), beta(count))
        z = _core.descend(z_, _core.zero_unless(ok, aux), gamma(count))
        theta = jnp.where(ok, average, 0.0)  # a skipped step keeps w exactly
        d = _core.zero_unless(ok, direction)
        w = jax.tree.map(lambda w_, d_: (1 - theta) * w_ + theta * d_, w, d)
        return w, y, z, ok

    def node_update(x, y, z, w, inner_batch, outer_batch, count, axis_name):
        """All nodes of this device: adapt (vmapped), then combine (mix)."""
        step = lambda *a: local_step(*a, count)
        w, y, z, ok = jax.vmap(step)(x, y, z, w, inner_batch, outer_batch)
        y = mixing.mix(topology, y, axis_name)
        z = mixing.mix(topology, z, axis_name)
        if radius is not None:
            z = jax.vmap(lambda t: _core.project_ball(t, radius))(z)
        return y, z, w, ok

    def init_fn(x: PyTree) -> BilevelState:
        mixing.check_node_axis(topology, x, "dsoba's x")
        init = problem.inner_init
        y = jax.vmap(init)(x) if callable(init) else _broadcast(init, topology.num_nodes)
        return _core.fresh_state(y, x, key, nonfinite_shape=(topology.num_nodes,))

    def update_fn(
        updates, state, params=None, *, inner_batch=_core.MISSING, outer_batch=_core.MISSING, **_
    ):
        del updates
        _check_inputs(problem, topology, params, state, inner_batch, outer_batch)
        args = (params, state.y, state.z, state.w, inner_batch, outer_batch)
        if mesh is None:
            y, z, w, ok = node_update(*args, state.count, None)
        else:
            y, z, w, ok = _on_mesh(node_update, args, state.count, mesh, axis)
        new_state = BilevelState(
            y=y,
            z=z,
            w=w,
            key=state.key,
            count=optax.safe_increment(state.count),
            nonfinite=state.nonfinite + jnp.where(ok, 0, 1).astype(jnp.int32),
        )
        output = jax.vmap(_core.zero_unless)(ok, w)
        return oracles.cast_like(output, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def consensus_error(tree: PyTree) -> jax.Array:
    """``(1/n) sum_i ||v_i - mean(v)||^2`` over the leading node axis (float32)."""
    leaves = [jnp.asarray(a, jnp.float32) for a in jax.tree.leaves(tree)]
    spread = [jnp.sum((a - jnp.mean(a, axis=0)) ** 2) for a in leaves]
    return sum(spread) / leaves[0].shape[0]


# ----------------------------------------------------------------------------- oracles


def _product_oracles(problem: BilevelProblem):
    """D-SOBA-SO: ``g``, ``grad_y g``, ``H z``, ``J z`` from one forward-over-reverse pass."""

    def oracle(x, y, z, batch):
        result = oracles.inner_oracles(problem, x, y, z, batch)
        return result.loss, result.grad_y, result.hessian_z, result.cross_z

    return oracle


def _fd_oracles(problem: BilevelProblem, fd_delta: float):
    """D-SOBA-FO: ``g``, ``grad_y g`` and the products as central differences of
    first-order gradients."""
    grads = jax.grad(problem.inner_loss, argnums=(0, 1))

    def oracle(x, y, z, batch):
        value, gy = jax.value_and_grad(problem.inner_loss, argnums=1)(x, y, batch)
        z_norm = optax.tree.norm(z)
        delta = fd_delta / jnp.maximum(z_norm, 1.0)
        shift = lambda sign: jax.tree.map(lambda a, b: a + sign * delta * b.astype(a.dtype), y, z)
        gx_plus, gy_plus = grads(x, shift(1.0), batch)
        gx_minus, gy_minus = grads(x, shift(-1.0), batch)
        central = lambda p, m: oracles.to_float32(
            jax.tree.map(lambda a, b: (a - b) / (2.0 * delta), p, m)
        )
        products = central(gy_plus, gy_minus), central(gx_plus, gx_minus)
        return value, oracles.to_float32(gy), *products

    return oracle


# ----------------------------------------------------------------------------- execution


def _check_inputs(problem, topology, x, state, inner_batch, outer_batch) -> None:
    """Node axes everywhere, x like the state, and one node's losses traceable."""
    if x is None:
        raise ValueError("dsoba needs params (the upper variable x, with a node axis)")
    if inner_batch is _core.MISSING or outer_batch is _core.MISSING:
        raise ValueError("dsoba needs the inner_batch and outer_batch args")
    for what, tree in (("x", x), ("inner_batch", inner_batch), ("outer_batch", outer_batch)):
        mixing.check_node_axis(topology, tree, f"dsoba's {what}")
    _core.check_like_state(x, state.w)
    node = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree)
    _core.check_losses(problem, node(x), node(state.y), node(inner_batch), node(outer_batch))


def _broadcast(tree: PyTree, n: int) -> PyTree:
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)


def _on_mesh(node_update, args, count, mesh: Mesh, axis: str):
    """``node_update`` in ``shard_map``: one node per device, count replicated."""
    nodes = PartitionSpec(axis)
    args = mixing.place_nodes(args, mesh, axis)
    run = jax.shard_map(
        lambda *a: node_update(*a, axis_name=axis),
        mesh=mesh,
        in_specs=(nodes,) * len(args) + (PartitionSpec(),),
        out_specs=nodes,
    )
    return run(*args, count)
