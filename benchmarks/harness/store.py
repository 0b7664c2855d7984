"""Plain results on disk: saved with :mod:`optstab.checkpoint`, read back without a target.

A stage's result (one method's training, one sweep point) is made of *plain* containers
(dicts with string keys, lists, tuples, ``None``) holding numpy or jax arrays and
Python numbers. A resumed study has nothing to restore it into, so the store keeps, next
to the checkpoint, a JSON *index*: the containers (dict key order included) and every
leaf's shape and dtype. :func:`restore` builds the target from the index and asks
:func:`optstab.checkpoint.restore` for the leaves.

Layout of a store directory::

    index-<step>.json   the containers and leaf specs of step <step>
    leaves/<step>/      optstab.checkpoint of the leaves (a flat list)

Atomicity: the index is written first (to a temporary file, then renamed) and the
leaves second; orbax writes a step atomically, so a step *exists* once its leaves do. A
run killed between the two writes leaves an index without leaves, which no reader sees
and the next save of that step overwrites.

Arrays come back as numpy arrays (jax arrays included), Python numbers as Python
numbers, numpy scalars as numpy scalars; values are bit-identical.

Example:

    >>> import tempfile, numpy as np
    >>> from benchmarks.harness import store
    >>> root = tempfile.mkdtemp()
    >>> store.save(root, 0, {"loss": np.arange(3.0), "runs": [1, 2.5, None]})
    >>> store.restore(root, 0)
    {'loss': array([0., 1., 2.]), 'runs': [1, 2.5, None]}
    >>> store.latest_step(root), store.is_plain({"name": "adam"})
    (0, False)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optstab import checkpoint

__all__ = ["check_plain", "is_plain", "latest_step", "restore", "save"]

PyTree = Any
LEAVES = "leaves"
_NUMBERS = (bool, int, float, complex)


class _NotPlain(Exception):
    """A container other than dict / list / tuple / None, or a leaf of another type."""


def _encode(value: PyTree) -> tuple[Any, list]:
    """The JSON description of ``value``'s containers, and its leaves in that order."""
    leaves: list = []

    def encode(node: Any) -> Any:
        if node is None:
            return {"none": None}
        if type(node) is dict:
            if not all(isinstance(key, str) for key in node):
                raise _NotPlain
            return {"dict": [[key, encode(child)] for key, child in node.items()]}
        if type(node) in (list, tuple):
            return {type(node).__name__: [encode(child) for child in node]}
        leaves.append(_leaf(node))
        return len(leaves) - 1

    return encode(value), leaves


def _leaf(node: Any) -> Any:
    """A leaf as it is saved: numpy for arrays, the value itself for Python numbers."""
    if isinstance(node, (*_NUMBERS, np.generic, np.ndarray)):
        return node
    if isinstance(node, jax.Array) and not jax.dtypes.issubdtype(node.dtype, jax.dtypes.prng_key):
        return np.asarray(node)
    raise _NotPlain


def is_plain(value: PyTree) -> bool:
    """Whether ``value`` is made of plain containers with array and number leaves."""
    try:
        _encode(value)
    except _NotPlain:
        return False
    return True


def check_plain(value: PyTree, what: str) -> PyTree:
    """``value`` if :func:`is_plain`, else a ``TypeError`` naming ``what``."""
    if not is_plain(value):
        raise TypeError(
            f"{what} must be dicts with string keys, lists, tuples, None, arrays and "
            "numbers (no strings, PRNG keys, NamedTuples or other pytree nodes)"
        )
    return value


def _spec(leaf: Any) -> dict:
    if isinstance(leaf, np.generic):  # before the numbers: np.float64 is a float
        return {"scalar": str(leaf.dtype)}
    if isinstance(leaf, _NUMBERS):
        return {"python": type(leaf).__name__}
    return {"array": str(leaf.dtype), "shape": list(np.shape(leaf))}


def _target(spec: dict) -> Any:
    """A leaf of the restore target (its type, shape and dtype are what matter)."""
    if "python" in spec:
        return {"bool": False, "int": 0, "float": 0.0, "complex": 0j}[spec["python"]]
    if "scalar" in spec:
        return np.zeros((), jnp.dtype(spec["scalar"]))[()]
    return np.zeros(spec["shape"], jnp.dtype(spec["array"]))


def _build(structure: Any, leaves: list) -> PyTree:
    if isinstance(structure, int):
        return leaves[structure]
    ((kind, body),) = structure.items()
    if kind == "none":
        return None
    if kind == "dict":
        return {key: _build(child, leaves) for key, child in body}
    children = [_build(child, leaves) for child in body]
    return children if kind == "list" else tuple(children)


def _index_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"index-{int(step)}.json"


def save(directory: str | os.PathLike, step: int, value: PyTree, *, keep: int | None = None):
    """Writes ``value`` (plain, see :func:`check_plain`) as ``step`` under ``directory``.

    ``keep``: keep only the newest ``keep`` steps (``None``: all).
    """
    try:
        structure, leaves = _encode(value)
    except _NotPlain:
        check_plain(value, "a stored value")
    index = {"structure": structure, "leaves": [_spec(leaf) for leaf in leaves]}
    path = _index_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(index))
    os.replace(temporary, path)
    checkpoint.save(Path(directory) / LEAVES, step, leaves, keep=keep)
    kept = set(all_steps(directory))
    for stale in Path(directory).glob("index-*.json"):
        if int(stale.stem.removeprefix("index-")) not in kept and stale != path:
            stale.unlink(missing_ok=True)


def restore(directory: str | os.PathLike, step: int | None = None) -> PyTree:
    """The value saved as ``step`` (``None``: the newest) under ``directory``."""
    step = latest_step(directory) if step is None else step
    if step is None:
        raise FileNotFoundError(f"nothing saved under {str(directory)!r}")
    index = json.loads(_index_path(directory, step).read_text())
    like = [_target(spec) for spec in index["leaves"]]
    leaves = checkpoint.restore(Path(directory) / LEAVES, step, like)
    return _build(index["structure"], leaves)


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest step saved under ``directory``, or None."""
    return checkpoint.latest_step(Path(directory) / LEAVES)


def all_steps(directory: str | os.PathLike) -> list[int]:
    """Every step saved under ``directory``, ascending."""
    return checkpoint.all_steps(Path(directory) / LEAVES)
