"""Unit partitions for GNMR: which parameter elements are watched and recovered together.

These helpers build on :mod:`optstab.tree`, which turns a units spec into the
:class:`optstab.tree.UnitPartition` that every per-unit method shares.

A units spec is ``None`` (one unit per leaf, named by its '/'-joined key path) or a
callable ``params -> labels`` returning, for every leaf, a unit name, a sequence
of names (one per index along axis 0, for stacked layers), or ``None`` (the leaf
belongs to no unit: not watched, passed through). The helpers here build
such callables; any function with the same contract works too, exactly like
``optax.multi_transform`` labels.

Example:
  >>> import jax.numpy as jnp
  >>> from optstab import units
  >>> params = {"blocks": {"w": jnp.zeros((4, 3, 3)), "b": jnp.zeros((4, 3))},
  ...           "head": {"w": jnp.zeros((3, 2))}}
  >>> units.by_depth(1)(params)
  {'blocks': {'b': 'blocks', 'w': 'blocks'}, 'head': {'w': 'head'}}
  >>> units.stacked(r"^blocks/", units.by_depth(1))(params)["blocks"]["w"]
  ('blocks/0', 'blocks/1', 'blocks/2', 'blocks/3')
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from optstab.tree import default_labels, leaf_names

PyTree = Any
Labeler = Callable[[PyTree], PyTree]


def _relabel(tree: PyTree, name_of: Callable[[str, Any], Any]) -> PyTree:
    names = iter(leaf_names(tree))
    return jax.tree.map(lambda leaf: name_of(next(names), leaf), tree)


def by_regex(rules: Mapping[str, str | None], default: str | None = None) -> Labeler:
    r"""Units from regular expressions over leaf key paths.

    Args:
      rules: ordered mapping ``pattern -> unit name``. A leaf belongs to the first
        pattern that ``re.search``-es its key path; the name may use the match's
        groups (``r"\1"``), so ``{r"^(layer\d+)/": r"\1"}`` groups each layer's
        leaves into one unit. A rule whose name is ``None`` leaves its leaves out of
        every unit (not watched), so ``{..., r".": None}`` watches only the leaves
        the rules before it name.
      default: unit name for leaves that match no pattern; ``None`` keeps their own
        key path as the unit name.

    Returns:
      A callable ``params -> labels`` for the ``units=`` argument.

    Example:
      >>> import jax.numpy as jnp
      >>> from optstab import units
      >>> params = {"layer0": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)},
      ...           "layer1": {"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)},
      ...           "head": jnp.zeros((3, 2))}
      >>> labels = units.by_regex({r"^(layer\d+)/": r"\1"})(params)
      >>> labels["layer1"], labels["head"]  # "head" matches no rule: its own key path
      ({'b': 'layer1', 'w': 'layer1'}, 'head')
      >>> units.by_regex({r"^layer": "body"}, default="rest")(params)["head"]
      'rest'
      >>> units.by_regex({r"^(layer\d+)/w": r"\1", r".": None})(params)["layer0"]
      {'b': None, 'w': 'layer0'}
    """
    compiled = [(re.compile(pattern), name) for pattern, name in rules.items()]

    def name_of(path: str, _leaf: Any) -> str | None:
        for pattern, name in compiled:
            match = pattern.search(path)
            if match:
                return None if name is None else match.expand(name)
        return path if default is None else default

    return lambda params: _relabel(params, name_of)


def by_depth(depth: int) -> Labeler:
    """Units from the first ``depth`` components of each leaf's key path.

    ``by_depth(1)`` on ``{"l1": {"w", "b"}, "l2": {...}}`` gives units ``l1`` and
    ``l2``, each covering its weight and bias.

    Raises:
      ValueError: unless ``depth`` is an int >= 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from optstab import units
      >>> params = {"l1": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, "out": jnp.zeros(3)}
      >>> units.by_depth(1)(params)
      {'l1': {'b': 'l1', 'w': 'l1'}, 'out': 'out'}
    """
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    return lambda params: _relabel(params, lambda path, _: "/".join(path.split("/")[:depth]))


def stacked(pattern: str, base: Labeler | None = None) -> Labeler:
    """Splits stacked (scanned) leaves into one unit per index along axis 0.

    Args:
      pattern: regular expression; leaves whose key path it ``re.search``-es and that
        have at least one dimension are split.
      base: the units spec to refine (``None``: one unit per leaf). A split leaf whose
        base unit is ``u`` yields units ``u/0``, ``u/1``, ... so leaves that share a
        base unit (a layer's kernel and bias) also share each per-layer unit; a leaf
        that the base leaves out of every unit (label ``None``) stays out.

    Returns:
      A callable ``params -> labels`` for the ``units=`` argument.

    Example:
      >>> import jax.numpy as jnp
      >>> from optstab import units
      >>> params = {"blocks": {"w": jnp.zeros((3, 4, 4)), "b": jnp.zeros((3, 4))}}
      >>> labels = units.stacked(r"^blocks/", units.by_depth(1))(params)
      >>> labels["blocks"]["w"], labels["blocks"]["b"]
      (('blocks/0', 'blocks/1', 'blocks/2'), ('blocks/0', 'blocks/1', 'blocks/2'))
    """
    compiled = re.compile(pattern)

    def labels(params: PyTree) -> PyTree:
        base_labels = default_labels(params) if base is None else base(params)
        leaves, treedef = jax.tree.flatten(params)
        flat = treedef.flatten_up_to(base_labels)
        paths = leaf_names(params)
        split = []
        for path, leaf, label in zip(paths, leaves, flat, strict=True):
            if compiled.search(path) and np.ndim(leaf) >= 1 and label is not None:
                if not isinstance(label, str):
                    raise ValueError(f"leaf {path!r} is split twice")
                label = tuple(f"{label}/{i}" for i in range(np.shape(leaf)[0]))
            split.append(label)
        return treedef.unflatten(split)

    return labels


def named(labels: Sequence[str] | PyTree) -> Labeler:
    """A units spec from a fixed labels pytree (same structure as the params).

    Each leaf of ``labels`` is a unit name, or a sequence of names (one per index
    along the leaf's axis 0). The same labels are used whatever the params, so use it
    only with the params it was written for (``optax.tree.map_params`` works on
    :func:`optstab.gnmr` states whatever the units).

    Example:
      >>> import jax.numpy as jnp
      >>> import optstab
      >>> params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2), "emb": jnp.zeros((5, 2))}
      >>> spec = optstab.units.named({"w": "dense", "b": "dense", "emb": "embedding"})
      >>> state = optstab.gnmr(units=spec).init(params)
      >>> sorted(optstab.recovery_mask(state))
      ['dense', 'embedding']
    """
    return lambda _params: labels
