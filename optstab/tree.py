"""Per-unit views of a parameter pytree, shared by every optstab method.

A *unit* is a named group of parameter elements: a whole leaf, several leaves, or
one slice along axis 0 of a stacked (scanned) leaf. A :class:`UnitPartition` maps
the leaves of a pytree onto a fixed, sorted list of unit names so that per-unit
statistics are plain ``(num_units,)`` float32 vectors with static shapes. A leaf
labelled ``None`` belongs to no unit: it is not measured, and the per-unit
operations below pass it through.

* :func:`unit_sum_squares` reduces a pytree to per-unit sums of squares,
* :func:`unit_norms` takes their square root,
* :func:`scale_units` / :func:`select_units` broadcast a per-unit vector back onto
  the leaves (for rescaling, zeroing or choosing between two pytrees).

Everything here works under ``jit``, ``vmap`` and sharded inputs: the partition is
static Python data and all array work is reductions and gathers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
# A label is a unit name for a whole leaf, or a sequence of names, one per index
# along axis 0 of the leaf (a stacked layer split into one unit per layer).
Label = str | Sequence[str] | None  # None: the leaf belongs to no unit
UnitsSpec = None | Callable[[PyTree], PyTree]
# Where a leaf's elements go: one unit index, one per index along axis 0, or no unit.
LeafUnit = int | tuple[int, ...] | None

# Trailing attribute names that wrap the array inside flax NNX variables.
_WRAPPER_ATTRS = ("value", "raw_value")


def key_path_name(path: Sequence[Any]) -> str:
    """Joins a pytree key path with '/': ``params['c']['w']`` becomes ``"c/w"``.

    Dict keys, attributes and sequence indices are all rendered by their plain name,
    and a trailing ``value`` attribute (flax NNX ``Variable``) is dropped, so an NNX
    model's ``l1.kernel`` is named ``"l1/kernel"``.
    """
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    while len(parts) > 1 and parts[-1] in _WRAPPER_ATTRS:
        parts.pop()
    return "/".join(parts) if parts else "param"


def leaf_names(tree: PyTree) -> list[str]:
    """The '/'-joined key path of every leaf of ``tree``, in flattening order."""
    return [key_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def default_labels(tree: PyTree) -> PyTree:
    """One unit per leaf, named by its key path (the ``units=None`` default)."""
    names = iter(leaf_names(tree))
    return jax.tree.map(lambda _: next(names), tree)


@dataclasses.dataclass(frozen=True)
class UnitLayout:
    """The static description of a partition that a state can carry.

    It holds no treedef: a state built from a flax NNX ``State`` of variables must
    match the pure arrays of the updates, which differ from it only in wrappers that
    :func:`key_path_name` drops.

    Attributes:
      names: sorted unit names; index ``i`` of every per-unit vector is ``names[i]``.
      leaf_paths: the '/'-joined key path of each leaf, in flattening order.
      leaf_shapes: the shape of each leaf, in flattening order.
      leaf_units: for each leaf, the unit index (an ``int``), a tuple of unit
        indices, one per position along the leaf's axis 0, or ``None`` for a leaf
        that belongs to no unit.
    """

    names: tuple[str, ...]
    leaf_paths: tuple[str, ...]
    leaf_shapes: tuple[tuple[int, ...], ...]
    leaf_units: tuple[LeafUnit, ...]

    def __hash__(self) -> int:
        # Hashed by every jit dispatch of a state that carries it: computed once.
        if "_hash" not in self.__dict__:
            fields = (self.names, self.leaf_paths, self.leaf_shapes, self.leaf_units)
            object.__setattr__(self, "_hash", hash(fields))
        return self.__dict__["_hash"]

    def __iter__(self):
        """Iterates over the unit names, as GNMR's ``state.units`` always has."""
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def mismatch(self, other: UnitLayout) -> str | None:
        """How ``other`` differs from this layout, in words; ``None`` when it does not."""
        if self.leaf_paths != other.leaf_paths:
            missing = sorted(set(self.leaf_paths) - set(other.leaf_paths))
            extra = sorted(set(other.leaf_paths) - set(self.leaf_paths))
            if missing or extra:
                return f"leaves missing: {missing}, unexpected leaves: {extra}"
            return f"leaves in another order: {list(other.leaf_paths)}"
        for path, mine, theirs in zip(
            self.leaf_paths, self.leaf_shapes, other.leaf_shapes, strict=True
        ):
            if mine != theirs:
                return f"leaf {path!r} has shape {theirs}, expected {mine}"
        if self.names != other.names or self.leaf_units != other.leaf_units:
            return f"units {list(other.names)}, expected {list(self.names)}"
        return None


@dataclasses.dataclass(frozen=True)
class UnitPartition:
    """Static map from the leaves of a pytree to a sorted list of unit names.

    A pytree without leaves, or whose leaves are all labelled ``None``, has a
    partition without units.

    Attributes:
      names: sorted unit names; index ``i`` of every per-unit vector is ``names[i]``.
      leaf_units: for each leaf (flattening order), the unit index (an ``int``), a
        tuple of unit indices, one per position along the leaf's axis 0, or ``None``
        for a leaf that belongs to no unit.
      treedef: structure of the pytree the partition was built for.
      leaf_paths: the '/'-joined key path of each leaf (:func:`leaf_names`).
      leaf_shapes: the shape of each leaf.
    """

    names: tuple[str, ...]
    leaf_units: tuple[LeafUnit, ...]
    treedef: Any
    leaf_paths: tuple[str, ...]
    leaf_shapes: tuple[tuple[int, ...], ...]

    @property
    def num_units(self) -> int:
        return len(self.names)

    @property
    def layout(self) -> UnitLayout:
        """The partition without its treedef (see :class:`UnitLayout`)."""
        return UnitLayout(self.names, self.leaf_paths, self.leaf_shapes, self.leaf_units)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown unit {name!r}; units are {list(self.names)}") from None


def make_partition(tree: PyTree, units: UnitsSpec = None) -> UnitPartition:
    """Builds the :class:`UnitPartition` of ``tree`` from a units spec.

    Args:
      tree: the parameter pytree (arrays or ``jax.ShapeDtypeStruct``); one without
        leaves (such as the placeholder of ``optax.tree.map_params``) has no units.
      units: ``None`` for one unit per leaf named by its key path, or a callable
        ``tree -> labels`` (like ``optax.multi_transform`` labels) whose result has
        the structure of ``tree`` and, per leaf, a unit name, a sequence of names
        whose length is the leaf's axis-0 size (stacked layers), or ``None``: the
        leaf belongs to no unit (not measured; the per-unit operations pass it
        through).

    Raises:
      ValueError: when ``units`` is neither, or the labels do not fit the tree.
    """
    if units is None:
        labels = default_labels(tree)
    elif callable(units):
        labels = units(tree)
    else:
        raise ValueError(f"units must be None or a callable params -> labels, got {units!r}")
    leaves, treedef = jax.tree.flatten(tree)
    try:
        leaf_labels = treedef.flatten_up_to(labels)
    except (ValueError, TypeError) as err:
        raise ValueError(f"units labels do not match the parameter structure: {err}") from None
    names = set()
    for leaf, label in zip(leaves, leaf_labels, strict=True):
        if label is None:
            continue
        if isinstance(label, str):
            names.add(label)
            continue
        label = tuple(label)
        if not label or not all(isinstance(n, str) for n in label):
            raise ValueError(
                f"a unit label must be a str, a sequence of str, or None (no unit), got {label!r}"
            )
        if not np.shape(leaf) or np.shape(leaf)[0] != len(label):
            raise ValueError(
                f"a split label needs one name per index of axis 0: got {len(label)} names "
                f"for a leaf of shape {np.shape(leaf)}"
            )
        names.update(label)
    sorted_names = tuple(sorted(names))
    position = {name: i for i, name in enumerate(sorted_names)}
    leaf_units = tuple(_unit_index(label, position) for label in leaf_labels)
    shapes = tuple(tuple(np.shape(leaf)) for leaf in leaves)
    return UnitPartition(sorted_names, leaf_units, treedef, tuple(leaf_names(tree)), shapes)


def _unit_index(label: Label, position: dict[str, int]) -> LeafUnit:
    if label is None:
        return None
    if isinstance(label, str):
        return position[label]
    return tuple(position[name] for name in label)


def _check_structure(partition: UnitPartition, tree: PyTree) -> list[Any]:
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != partition.treedef:
        raise ValueError(
            f"pytree structure {treedef} does not match the unit partition's {partition.treedef}"
        )
    return leaves


def _abs_squared(leaf: jax.Array) -> jax.Array:
    """Elementwise ``|x|^2`` in float32; for complex ``x``, ``re(x)^2 + im(x)^2``."""
    x = jnp.asarray(leaf)
    if jnp.iscomplexobj(x):
        return jnp.square(x.real.astype(jnp.float32)) + jnp.square(x.imag.astype(jnp.float32))
    return jnp.square(x.astype(jnp.float32))


def _leaf_sum_squares(leaf: jax.Array, unit: int | tuple[int, ...]) -> jax.Array:
    squares = _abs_squared(leaf)
    if isinstance(unit, int):
        return jnp.sum(squares)
    return jnp.sum(squares.reshape(squares.shape[0], -1), axis=1)


def unit_sum_squares(partition: UnitPartition, tree: PyTree) -> jax.Array:
    """Per-unit sum of ``|x|^2`` over ``tree``, float32 of shape ``(num_units,)``."""
    leaves = _check_structure(partition, tree)
    total = jnp.zeros((partition.num_units,), jnp.float32)
    for leaf, unit in zip(leaves, partition.leaf_units, strict=True):
        if unit is None:
            continue
        index = unit if isinstance(unit, int) else jnp.asarray(unit, jnp.int32)
        total = total.at[index].add(_leaf_sum_squares(leaf, unit))
    return total


def global_norm(tree: PyTree) -> jax.Array:
    """L2 norm of a whole pytree in float32, ``|z|`` for complex elements (0 without leaves)."""
    single = lambda x: jnp.asarray(x).astype(
        jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32
    )  # optax.tree.norm sums re^2 + im^2 of complex leaves
    return optax.tree.norm(jax.tree.map(single, tree))


def unit_norms(partition: UnitPartition, tree: PyTree) -> jax.Array:
    """Per-unit L2 norm of ``tree`` in float32; non-finite where any element is.

    Complex elements count by their modulus: ``[3 + 4j]`` has norm 5.
    """
    return jnp.sqrt(unit_sum_squares(partition, tree))


def _broadcast(values: jax.Array, unit: int | tuple[int, ...], leaf: jax.Array) -> jax.Array:
    """Picks the per-unit ``values`` that apply to ``leaf``, shaped to broadcast."""
    if isinstance(unit, int):
        return values[unit]
    per_row = values[jnp.asarray(unit, jnp.int32)]
    return per_row.reshape((-1,) + (1,) * (jnp.ndim(leaf) - 1))


def leaf_values(partition: UnitPartition, values: jax.Array) -> list[jax.Array | None]:
    """The per-unit ``values`` seen by each leaf (flattening order), shaped to broadcast
    against a leaf of the partition's shape; ``None`` for a leaf without unit."""
    return [
        None if unit is None else _broadcast(values, unit, np.empty(shape, np.bool_))
        for unit, shape in zip(partition.leaf_units, partition.leaf_shapes, strict=True)
    ]


def scale_units(partition: UnitPartition, tree: PyTree, factors: jax.Array) -> PyTree:
    """Multiplies every element of unit ``u`` by the real ``factors[u]``; keeps each leaf's
    dtype (a complex leaf is scaled in modulus, its phase kept). Leaves without unit
    are unchanged."""
    leaves = _check_structure(partition, tree)
    scaled = [
        leaf if unit is None else leaf * _broadcast(factors, unit, leaf).astype(leaf.dtype)
        for leaf, unit in zip(leaves, partition.leaf_units, strict=True)
    ]
    return jax.tree.unflatten(partition.treedef, scaled)


def select_units(
    partition: UnitPartition, mask: jax.Array, on_true: PyTree, on_false: PyTree
) -> PyTree:
    """Elementwise ``where(mask[unit], on_true, on_false)`` over two pytrees.

    Unlike multiplying by zero, this drops NaN and inf in the unselected pytree. A leaf
    without unit is taken from ``on_false``.
    """
    true_leaves = _check_structure(partition, on_true)
    false_leaves = _check_structure(partition, on_false)
    chosen = [
        f if unit is None else jnp.where(_broadcast(mask, unit, t), t, f)
        for t, f, unit in zip(true_leaves, false_leaves, partition.leaf_units, strict=True)
    ]
    return jax.tree.unflatten(partition.treedef, chosen)


def zero_units(partition: UnitPartition, tree: PyTree, mask: jax.Array) -> PyTree:
    """Sets the elements of every unit with ``mask[u]`` to exactly zero (leaves without
    unit are unchanged)."""
    return select_units(partition, mask, jax.tree.map(jnp.zeros_like, tree), tree)
