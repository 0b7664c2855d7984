"""Finding one transform's state inside a nested optimizer state."""

from __future__ import annotations

from typing import Any

import jax


def find_unique(opt_state: Any, state_type: type, label: str) -> Any:
    """The one node of type ``state_type`` in ``opt_state``.

    Looks through ``optax.chain``, wrappers, ``optax.inject_hyperparams``,
    ``optax.MultiSteps`` and any other pytree nesting.

    Raises:
      ValueError: when there is no such node or more than one.
    """
    is_state = lambda node: isinstance(node, state_type)
    found = [n for n in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(n)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one {label} state in the optimizer state, found {len(found)}"
        )
    return found[0]
