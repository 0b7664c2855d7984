"""Neighbour averaging (gossip) over a :class:`~optstab.bilevel.topology.Topology`.

Every leaf carries a leading node axis of size ``n``; one mixing round replaces node
``i``'s slice by ``sum_j W[i, j] * value_j``. It is computed as the diagonal term plus
one term per shift ``s`` of the topology (``W[i, (i + s) mod n] * value_{i + s}``),
always in the same order, in two executions of the same arithmetic:

* on one device (``mesh=None``), each shift is a ``jnp.roll`` along the node axis;
* on a mesh with one node per device along ``axis``, each shift is a
  ``jax.lax.ppermute`` inside ``jax.shard_map``: a node sends its slice to the nodes
  that weigh it, and nothing else moves (no all-gather of every node).

Products and sums happen in float32 and are cast back to each leaf's dtype, so the two
executions agree up to float32 reassociation of at most ``max_degree + 1`` terms.

:func:`gossip` is the Optax transform that mixes the upper variable after a local step:
``x <- W (x + u)``; chained as ``optax.chain(dsoba(...), optax.sgd(lr), gossip(topo))``
it gives D-SOBA's ``x_i <- sum_j W[i, j] (x_j - lr h_j)``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from optstab.bilevel.topology import Topology

PyTree = Any


def mix(topology: Topology, tree: PyTree, axis_name: str | None = None) -> PyTree:
    """One mixing round ``W @ tree`` over the leading node axis of every leaf.

    Args:
      topology: the graph.
      tree: a pytree whose leaves have a leading axis of size ``num_nodes``, or, with
        ``axis_name``, this device's slice (leading axis 1) inside ``jax.shard_map``.
      axis_name: ``None`` on one device; the mesh axis of the nodes inside
        ``shard_map`` (one node per device along it).

    Returns:
      The mixed pytree, each leaf in its own dtype.
    """
    if axis_name is None:
        check_node_axis(topology, tree)
        return jax.tree.map(lambda leaf: _mix_dense(topology, leaf), tree)
    return jax.tree.map(lambda leaf: _mix_permuted(topology, leaf, axis_name), tree)


def mix_on_mesh(topology: Topology, tree: PyTree, mesh: Mesh, axis: str = "nodes") -> PyTree:
    """:func:`mix` with the node axis split over ``mesh`` (one node per device)."""
    check_mesh(topology, mesh, axis)
    check_node_axis(topology, tree)
    spec = PartitionSpec(axis)
    tree = place_nodes(tree, mesh, axis)
    mixed = jax.shard_map(
        lambda local: mix(topology, local, axis_name=axis),
        mesh=mesh,
        in_specs=spec,
        out_specs=spec,
    )
    return mixed(tree)


def gossip(
    topology: Topology, *, mesh: Mesh | None = None, axis: str = "nodes"
) -> optax.GradientTransformation:
    """Mixes the upper variable with the neighbours: ``x <- W (x + u)``.

    Args:
      topology: the graph; every leaf of the params has a leading axis of size
        ``topology.num_nodes``.
      mesh: ``None`` to mix on one device; a mesh whose ``axis`` has one device per
        node to mix with ``ppermute`` between neighbours.
      axis: the mesh axis of the nodes.

    Returns:
      An ``optax.GradientTransformation`` (stateless) whose update returns
      ``W (x + u) - x`` in the params' dtype, so ``optax.apply_updates`` gives
      ``W (x + u)`` up to one rounding.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from optstab import bilevel
      >>> tx = bilevel.gossip(bilevel.topology.complete(4))
      >>> x = jnp.arange(4.0)[:, None]
      >>> u, _ = tx.update(jnp.zeros_like(x), tx.init(x), x)
      >>> optax.apply_updates(x, u).ravel()
      Array([1.5, 1.5, 1.5, 1.5], dtype=float32)
    """
    if not isinstance(topology, Topology):
        raise ValueError(f"topology must be an optstab.bilevel.topology.Topology, got {topology!r}")
    if mesh is not None:
        check_mesh(topology, mesh, axis)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("gossip needs params (the upper variable x) to mix")
        moved = jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, updates)
        if mesh is None:
            mixed = mix(topology, moved)
        else:
            mixed = mix_on_mesh(topology, moved, mesh, axis)
        return jax.tree.map(lambda m, p: (m - p).astype(p.dtype), mixed, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def place_nodes(tree: PyTree, mesh: Mesh, axis: str = "nodes") -> PyTree:
    """``tree`` with its leading (node) axis split over ``axis`` of ``mesh``.

    Works for meshes with explicit and with automatic axes (``jax.reshard`` on the
    former, a sharding constraint on the latter).
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    if mesh.axis_types and all(t == AxisType.Explicit for t in mesh.axis_types):
        return jax.tree.map(lambda leaf: jax.reshard(leaf, sharding), tree)
    return jax.lax.with_sharding_constraint(tree, jax.tree.map(lambda _: sharding, tree))


# ----------------------------------------------------------------------------- checks


def check_node_axis(topology: Topology, tree: PyTree, what: str = "every leaf") -> None:
    """Raises ``ValueError`` unless every leaf's leading axis is ``num_nodes``."""
    n = topology.num_nodes
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = np.shape(leaf)
        if not shape or shape[0] != n:
            name = jax.tree_util.keystr(path) or "the array"
            raise ValueError(
                f"{what} needs a leading node axis of size {n} ({topology.name}); "
                f"{name} has shape {shape}"
            )


def check_mesh(topology: Topology, mesh: Mesh, axis: str) -> None:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh or None, got {mesh!r}")
    if axis not in mesh.shape:
        raise ValueError(f"the mesh has no axis {axis!r} (its axes: {tuple(mesh.shape)})")
    if mesh.shape[axis] != topology.num_nodes:
        raise ValueError(
            f"mixing on a mesh needs one node per device: the mesh axis {axis!r} has "
            f"{mesh.shape[axis]} devices for {topology.num_nodes} nodes"
        )


# ----------------------------------------------------------------------------- arithmetic


def _weights(values: np.ndarray, ndim: int) -> jax.Array:
    return jnp.asarray(values, jnp.float32).reshape((-1,) + (1,) * (ndim - 1))


def _mix_dense(topology: Topology, leaf: jax.Array) -> jax.Array:
    x = jnp.asarray(leaf).astype(jnp.float32)
    out = _weights(topology.self_weights, x.ndim) * x
    for shift, weights in topology.shifts:
        out = out + _weights(weights, x.ndim) * jnp.roll(x, -shift, axis=0)
    return out.astype(jnp.result_type(leaf))


def _mix_permuted(topology: Topology, leaf: jax.Array, axis_name: str) -> jax.Array:
    n = topology.num_nodes
    node = jax.lax.axis_index(axis_name)
    x = jnp.asarray(leaf).astype(jnp.float32)
    pick = lambda values: jnp.asarray(values, jnp.float32)[node]
    out = pick(topology.self_weights) * x
    for shift, weights in topology.shifts:
        # Node i weighs node (i + shift) mod n: that node sends, node i receives.
        pairs = [((i + shift) % n, i) for i in range(n) if weights[i] > 0]
        received = jax.lax.ppermute(x, axis_name, perm=pairs)
        out = out + pick(weights) * received
    return out.astype(jnp.result_type(leaf))
