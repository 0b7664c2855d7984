"""The per-parameter part of a wrapped optimizer's state, for :func:`optstab.gnmr_wrap`.

An optimizer state mixes per-parameter statistics (Adam's ``mu`` and ``nu``: subtrees
with the params' structure) and fields shared by all parameters (a step count, a
noise key, injected hyperparameters). ``gnmr_wrap`` freezes or zeroes the former for
some units and must leave the latter alone, whatever the shape of the params (a
single array has the structure of every leaf, so structure alone cannot tell them
apart). The per-parameter subtrees are found as ``optax.tree.map_params`` finds them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optstab import tree as ot

PyTree = Any


@jax.tree_util.register_pytree_node_class
class _ParamsSlot:
    """Stands for the params in ``inner.init(_ParamsSlot())``: a pytree without leaves.

    Every per-parameter subtree of the inner state then becomes one slot, and the
    shared fields keep their leaves: the rule by which ``optax.tree.map_params``
    finds the params in a state.
    """

    def tree_flatten(self):
        return (), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux, children
        return cls()


def _is_slot(node: Any) -> bool:
    return isinstance(node, _ParamsSlot)


def per_parameter_map(
    inner: optax.GradientTransformation, partition: ot.UnitPartition
) -> Callable[..., PyTree]:
    """``map(fn, state, *others)``: applies ``fn`` to the per-parameter subtrees of an
    inner state (and the matching subtrees of ``others``), keeping the rest.

    The subtrees are found from ``inner.init`` on a placeholder without leaves, as
    ``optax.tree.map_params`` does. An inner optimizer whose ``init`` rejects that
    placeholder falls back to a structural test (:func:`_has_params_layout`); with
    params that are one scalar, a float scalar of the inner state (an injected
    learning rate) then also counts as per-parameter.
    """
    try:
        template = inner.init(_ParamsSlot())
    except Exception:  # noqa: BLE001 - any failure means: use the structural test
        template = None

    def by_template(fn, state, *others):
        def apply(slot, node, *other_nodes):
            return fn(node, *other_nodes) if _is_slot(slot) else node

        return jax.tree.map(apply, template, state, *others, is_leaf=_is_slot)

    def by_structure(fn, state, *others):
        is_per_parameter = lambda node: _has_params_layout(partition, node)

        def apply(node, *other_nodes):
            return fn(node, *other_nodes) if is_per_parameter(node) else node

        return jax.tree.map(apply, state, *others, is_leaf=is_per_parameter)

    def fits_template(state) -> bool:
        try:
            jax.tree.structure(template, is_leaf=_is_slot).flatten_up_to(state)
        except (ValueError, TypeError):
            return False
        return True

    def map_per_parameter(fn, state, *others):
        if template is not None and fits_template(state):
            return by_template(fn, state, *others)
        return by_structure(fn, state, *others)

    return map_per_parameter


def _has_params_layout(partition: ot.UnitPartition, node: Any) -> bool:
    """The structural test: the updates' structure, with float or complex arrays of the
    updates' shapes at its leaves, or subtrees without leaves (``MaskedNode``)."""
    if jax.tree.structure(node).num_leaves == 0:
        return False
    try:
        items = partition.treedef.flatten_up_to(node)
    except (ValueError, TypeError):
        return False

    def fits(item, shape) -> bool:
        if not jax.tree.leaves(item):
            return True  # masked out by the inner optimizer
        return (
            hasattr(item, "shape")
            and tuple(item.shape) == shape
            and jnp.issubdtype(item.dtype, jnp.inexact)
        )

    return all(fits(item, shape) for item, shape in zip(items, partition.leaf_shapes, strict=True))


def select_leaves(
    partition: ot.UnitPartition, mask: jax.Array, on_true: PyTree, on_false: PyTree
) -> PyTree:
    """:func:`optstab.tree.select_units` for a per-parameter subtree of an inner state,
    where a leaf masked out by the inner optimizer (``optax.masked``'s ``MaskedNode``,
    a node without leaves) stays as it is."""
    true_items = partition.treedef.flatten_up_to(on_true)
    false_items = partition.treedef.flatten_up_to(on_false)
    chosen = [
        jnp.where(m, t, f) if jax.tree.leaves(f) else f
        for m, t, f in zip(ot.leaf_values(partition, mask), true_items, false_items, strict=True)
    ]
    return partition.treedef.unflatten(chosen)


def zero_leaves(partition: ot.UnitPartition, mask: jax.Array, tree: PyTree) -> PyTree:
    """``tree`` with the elements of every unit in ``mask`` set to zero."""
    return select_leaves(partition, mask, jax.tree.map(jnp.zeros_like, tree), tree)
