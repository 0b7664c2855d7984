"""Save and restore any pytree (parameters, optimizer state, PRNG keys) with orbax.

A thin, blocking wrapper around :class:`orbax.checkpoint.CheckpointManager` that
works for *any* pytree: optax ``NamedTuple`` states nested in ``optax.chain``,
``optax.inject_hyperparams`` or ``optax.MultiSteps``, flax ``nnx.State``, plain
dicts, and custom pytree nodes (including nodes with no children that carry only
static auxiliary data, such as unit names).

The state is flattened to its leaves, and the leaves are written as a flat dict
``{"0": leaf0, "1": leaf1, ...}`` next to a small JSON metadata item that records,
for each leaf, its key path, shape, dtype and kind. Restoring flattens the ``like``
target to get the tree structure back, restores each leaf against an abstract
``jax.ShapeDtypeStruct`` (keeping ``like``'s shardings, so a sharded state restores
sharded) and unflattens. Leaves that orbax cannot write directly are handled here:

* typed PRNG keys (``jax.random.key``) are saved as ``jax.random.key_data`` and
  re-wrapped with ``jax.random.wrap_key_data`` using the impl of the ``like`` leaf
  (legacy ``uint32`` keys from ``jax.random.PRNGKey`` are plain arrays);
* zero-size leaves are stored in the metadata only (they hold no values);
* numpy arrays and Python scalars come back as numpy arrays / Python scalars.

Restored values are bit-identical to the saved ones. Restoring always needs a target
(``like``): a checkpoint records shapes and dtypes, never Python types.

Example:

    >>> import tempfile, jax, jax.numpy as jnp, optax
    >>> from optstab import checkpoint
    >>> root = tempfile.mkdtemp()
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = {"params": params, "opt": optax.adam(1e-3).init(params), "key": jax.random.key(0)}
    >>> checkpoint.save(root, 100, state, keep=3)
    >>> like = jax.eval_shape(lambda: state)
    >>> restored = checkpoint.restore(root, None, like)  # None: the latest step
    >>> bool(jnp.all(restored["params"]["w"] == 1)), restored["key"].dtype
    (True, key<fry>)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["all_steps", "latest_step", "restore", "save"]

PyTree = Any

_LEAVES = "leaves"
_META = "meta"
_FORMAT_VERSION = 2  # 2: data shape/dtype of every leaf

# Leaf kinds recorded in the metadata.
_ARRAY = "array"  # jax.Array (restored as jax.Array with like's sharding)
_KEY = "key"  # typed PRNG key array, saved as its key_data
_NUMPY = "numpy"  # numpy array or numpy scalar
_PYTHON = "python"  # Python bool / int / float / complex


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Temporarily silences orbax's INFO/WARNING chatter (it logs through absl)."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _directory(path: str | os.PathLike) -> str:
    """Orbax wants an absolute directory; leave URLs such as ``gs://...`` alone."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


def _manager(path: str | os.PathLike, *, keep: int | None = None, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(_directory(path), options=options)


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_kind(leaf: Any) -> str:
    if isinstance(leaf, jax.Array):
        return _KEY if _is_key(leaf) else _ARRAY
    if isinstance(leaf, np.ndarray | np.generic):
        return _NUMPY
    if isinstance(leaf, bool | int | float | complex):
        return _PYTHON
    raise TypeError(
        f"cannot checkpoint a leaf of type {type(leaf).__name__}: leaves must be jax arrays, "
        "numpy arrays or Python scalars"
    )


def _describe(path: Any, leaf: Any) -> tuple[dict[str, Any], Any]:
    """Metadata entry for one leaf and the value to write (``None``: nothing to write)."""
    kind = _leaf_kind(leaf)
    entry: dict[str, Any] = {"path": jax.tree_util.keystr(path), "kind": kind}
    if kind == _KEY:
        entry["impl"] = str(jax.random.key_impl(leaf))
        value = jax.random.key_data(leaf)
        entry["shape"] = list(leaf.shape)
        entry["dtype"] = "key"
    elif kind == _ARRAY:
        value = leaf
        entry["shape"] = list(leaf.shape)
        entry["dtype"] = str(leaf.dtype)
    else:
        value = np.asarray(leaf)
        entry["shape"] = list(value.shape)
        entry["dtype"] = str(value.dtype)
    entry["data_shape"] = list(value.shape)
    entry["data_dtype"] = str(value.dtype)
    entry["empty"] = value.size == 0
    if value.size == 0:
        return entry, None
    return entry, value


def save(path: str | os.PathLike, step: int, state: PyTree, *, keep: int | None = None) -> None:
    """Writes ``state`` as checkpoint ``step`` under directory ``path`` and waits for it.

    The write is atomic (orbax writes to a temporary directory and renames it when
    complete), so a crash never leaves a half-written step that :func:`restore`
    would pick up.

    Args:
      path: checkpoint root directory (created if missing); one subdirectory per step.
      step: the step number to save under; it must not exist yet (it may be lower
        than the latest saved step).
      state: any pytree whose leaves are jax arrays (typed PRNG keys included), numpy
        arrays or Python scalars.
      keep: keep at most this many most recent steps, deleting older ones after
        the save; ``None`` keeps every step.

    Returns:
      None. The checkpoint is on disk when this returns.

    Raises:
      ValueError: ``step`` already exists under ``path``, or ``keep`` < 1.
      TypeError: a leaf is not an array or a Python scalar.

    Example:

        >>> import tempfile, jax.numpy as jnp
        >>> from optstab import checkpoint
        >>> root = tempfile.mkdtemp()
        >>> for step in range(4):
        ...     checkpoint.save(root, step, {"w": jnp.full(3, step)}, keep=2)
        >>> checkpoint.latest_step(root)
        3
    """
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be None or a positive int, got {keep!r}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    entries, values = [], {}
    for i, (leaf_path, leaf) in enumerate(flat):
        entry, value = _describe(leaf_path, leaf)
        entries.append(entry)
        if value is not None:
            values[str(i)] = value
    meta = {
        "format": _FORMAT_VERSION,
        "num_leaves": len(entries),
        "treedef": str(treedef),
        "leaves": entries,
    }
    items = {_META: ocp.args.JsonSave(meta)}
    if values:
        items[_LEAVES] = ocp.args.PyTreeSave(values)
    step = int(step)
    with _quiet_orbax():
        manager = _manager(path, keep=keep)
        try:
            if step in manager.all_steps():
                raise ValueError(
                    f"checkpoint step {step} already exists under {_directory(path)!r}; "
                    "steps are never overwritten"
                )
            # force: save even when `step` is not above the latest one (orbax's default
            # policy would skip such a save silently).
            manager.save(step, args=ocp.args.Composite(**items), force=True)
            manager.wait_until_finished()
        finally:
            manager.close()


def latest_step(path: str | os.PathLike) -> int | None:
    """The newest step saved under ``path``, or ``None`` when there is none.

    Args:
      path: checkpoint root directory (it need not exist).

    Returns:
      The largest saved step as an ``int``, or ``None``.

    Example:

        >>> import tempfile
        >>> from optstab import checkpoint
        >>> print(checkpoint.latest_step(tempfile.mkdtemp()))
        None
    """
    if not _exists(path):
        return None
    with _quiet_orbax():
        manager = _manager(path, read_only=True)
        try:
            return manager.latest_step()
        finally:
            manager.close()


def all_steps(path: str | os.PathLike) -> list[int]:
    """Every step saved under ``path``, ascending (empty when there is none).

    Example:

        >>> import tempfile, jax.numpy as jnp
        >>> from optstab import checkpoint
        >>> root = tempfile.mkdtemp()
        >>> for step in (5, 2):
        ...     checkpoint.save(root, step, {"w": jnp.zeros(2)})
        >>> checkpoint.all_steps(root)
        [2, 5]
    """
    if not _exists(path):
        return []
    with _quiet_orbax():
        manager = _manager(path, read_only=True)
        try:
            return sorted(manager.all_steps())
        finally:
            manager.close()


def _exists(path: str | os.PathLike) -> bool:
    directory = _directory(path)
    if "://" in directory:
        from etils import epath

        return epath.Path(directory).exists()
    return os.path.isdir(directory)


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _key_data_sharding(like: Any) -> jax.sharding.Sharding:
    """Sharding for the ``key_data`` of a (concrete or abstract) typed key leaf."""
    if isinstance(like, jax.Array):
        return jax.random.key_data(like).sharding
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(like.shape) - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec, None))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return _default_sharding()


def _key_impl(like: Any, saved_impl: str) -> Any:
    """The PRNG impl of a typed-key ``like`` leaf (falls back to the saved impl name)."""
    if isinstance(like, jax.Array):
        return jax.random.key_impl(like)
    impl = getattr(like.dtype, "_impl", None)  # abstract key dtypes carry their impl
    return impl if impl is not None else saved_impl


def _like_kind(like: Any) -> str:
    if isinstance(like, jax.ShapeDtypeStruct) or isinstance(like, jax.Array):
        return _KEY if _is_key(like) else _ARRAY
    return _leaf_kind(like)


def _mismatch(message: str, path: str | os.PathLike, step: int) -> ValueError:
    return ValueError(
        f"checkpoint {_directory(path)!r} step {step} does not match the `like` target: {message}"
    )


def restore(
    path: str | os.PathLike,
    step: int | None = None,
    like: PyTree = None,
    *,
    strict: bool = True,
) -> PyTree:
    """Reads checkpoint ``step`` from ``path`` into the structure of ``like``.

    Args:
      path: checkpoint root directory written by :func:`save`.
      step: the step to restore, or ``None`` for the latest one.
      like: a pytree with the structure, shapes and dtypes of the saved state:
        concrete arrays or abstract ``jax.ShapeDtypeStruct`` leaves (for example
        ``jax.eval_shape(init_fn)``). jax leaves are restored with ``like``'s
        sharding when it has one (so a sharded state comes back sharded), else on
        the default device; numpy / Python scalar leaves come back as such.
      strict: also require the key paths of the leaves to match the saved ones
        (catches reordered or renamed dict keys with equal shapes).

    Returns:
      The restored pytree, with ``like``'s tree structure and bit-identical values.
      Its jax arrays are *committed* to their sharding (the default device when
      ``like`` has none): a function jitted on uncommitted arrays (fresh from
      ``jnp`` ops) compiles once more for them; ``jax.device_put`` the fresh state
      to avoid that where compile time matters.

    Raises:
      FileNotFoundError: there is no checkpoint (or no such ``step``) under ``path``.
      ValueError: the checkpoint's leaves do not match ``like`` (number of leaves,
        shapes, dtypes, PRNG-key-ness or, when ``strict``, key paths), or ``like``
        is missing.

    Example:

        >>> import tempfile, jax, jax.numpy as jnp
        >>> from optstab import checkpoint
        >>> root = tempfile.mkdtemp()
        >>> checkpoint.save(root, 7, {"w": jnp.arange(3.0), "key": jax.random.key(1)})
        >>> like = {"w": jax.ShapeDtypeStruct((3,), jnp.float32), "key": jax.random.key(0)}
        >>> state = checkpoint.restore(root, None, like)
        >>> state["w"], bool(jnp.all(jax.random.key_data(state["key"]) ==
        ...                          jax.random.key_data(jax.random.key(1))))
        (Array([0., 1., 2.], dtype=float32), True)
    """
    directory = _directory(path)
    if like is None:
        raise ValueError(
            "restore needs `like`: a pytree with the saved state's structure, shapes and "
            "dtypes (for example jax.eval_shape of the function that made it)"
        )
    if not _exists(path):
        raise FileNotFoundError(f"no checkpoint directory at {directory!r}")
    with _quiet_orbax():
        manager = _manager(path, read_only=True)
        try:
            steps = sorted(manager.all_steps())
            if not steps:
                raise FileNotFoundError(f"no checkpoint found under {directory!r}")
            if step is None:
                step = steps[-1]
            elif int(step) not in steps:
                raise FileNotFoundError(
                    f"no checkpoint for step {step} under {directory!r}; saved steps: {steps}"
                )
            step = int(step)
            meta = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
            meta = meta[_META]
            like_flat, treedef = jax.tree_util.tree_flatten_with_path(like)
            _check(meta, like_flat, strict, path, step)
            targets, restore_args = _targets(meta["leaves"], like_flat)
            data: dict[str, Any] = {}
            if targets:
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{_LEAVES: ocp.args.PyTreeRestore(targets, restore_args=restore_args)}
                    ),
                )
                data = dict(restored[_LEAVES])
        finally:
            manager.close()
    leaves = [
        _rebuild(entry, like_leaf, data.get(str(i)))
        for i, (entry, (_, like_leaf)) in enumerate(zip(meta["leaves"], like_flat, strict=True))
    ]
    return jax.tree.unflatten(treedef, leaves)


def _check(meta: dict, like_flat: list, strict: bool, path, step: int) -> None:
    entries = meta["leaves"]
    if len(entries) != len(like_flat):
        raise _mismatch(
            f"it has {len(entries)} leaves but `like` has {len(like_flat)} "
            f"(saved structure: {meta.get('treedef')})",
            path,
            step,
        )
    for entry, (like_path, like_leaf) in zip(entries, like_flat, strict=True):
        name = jax.tree_util.keystr(like_path)
        if strict and entry["path"] != name:
            raise _mismatch(
                f"leaf key path {entry['path']!r} in the checkpoint, {name!r} in `like`",
                path,
                step,
            )
        kind = _like_kind(like_leaf)
        if (kind == _KEY) != (entry["kind"] == _KEY):
            raise _mismatch(
                f"leaf {name}: typed PRNG key in {'`like`' if kind == _KEY else 'the checkpoint'}"
                " only",
                path,
                step,
            )
        shape = list(np.shape(like_leaf))
        if entry["shape"] != shape:
            raise _mismatch(
                f"leaf {name}: shape {tuple(entry['shape'])} in the checkpoint, "
                f"{tuple(shape)} in `like`",
                path,
                step,
            )
        # Python scalars have no fixed dtype: they restore into whatever `like` holds.
        if kind in (_ARRAY, _NUMPY) and entry["kind"] not in (_KEY, _PYTHON):
            dtype = str(np.dtype(like_leaf.dtype))
            # An abstract target made by jax.eval_shape holds canonical jax dtypes
            # (int32 for a saved int64 numpy leaf when x64 is off): accept those.
            canonical = str(np.dtype(jax.dtypes.canonicalize_dtype(entry["dtype"])))
            if entry["dtype"] != dtype and not (kind == _ARRAY and canonical == dtype):
                raise _mismatch(
                    f"leaf {name}: dtype {entry['dtype']} in the checkpoint, {dtype} in `like`",
                    path,
                    step,
                )


def _targets(entries: list[dict], like_flat: list) -> tuple[dict, dict]:
    """Abstract restore targets and orbax restore args for every leaf with data."""
    targets, args = {}, {}
    for i, (entry, (_, like_leaf)) in enumerate(zip(entries, like_flat, strict=True)):
        if _is_empty(entry):  # zero-size leaf: nothing was written
            continue
        kind = _like_kind(like_leaf)
        if kind in (_ARRAY, _KEY):
            if kind == _KEY:
                data = jax.eval_shape(jax.random.key_data, like_leaf)
                shape, dtype = data.shape, data.dtype
                sharding = _key_data_sharding(like_leaf)
            else:
                shape, dtype = like_leaf.shape, like_leaf.dtype
                sharding = getattr(like_leaf, "sharding", None) or _default_sharding()
            targets[str(i)] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            args[str(i)] = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=shape, dtype=dtype)
        else:
            targets[str(i)] = np.zeros((), np.dtype(entry["dtype"]))
            args[str(i)] = ocp.RestoreArgs(restore_type=np.ndarray)
    return targets, args


def _is_empty(entry: dict) -> bool:
    """Whether a leaf had no values (format 1 recorded data_shape for those only)."""
    return entry.get("empty", "data_shape" in entry)


def _rebuild(entry: dict, like: Any, value: Any) -> Any:
    """Turns a restored raw value back into a leaf of the type of ``like``."""
    kind = _like_kind(like)
    if value is None:  # zero-size leaf
        if kind == _KEY:
            sharding = _key_data_sharding(like)
            data = jnp.zeros(entry["data_shape"], entry["data_dtype"], device=sharding)
            return jax.random.wrap_key_data(data, impl=_key_impl(like, entry["impl"]))
        if kind == _ARRAY:
            sharding = getattr(like, "sharding", None) or _default_sharding()
            return jnp.zeros(like.shape, like.dtype, device=sharding)
        value = np.zeros(entry["data_shape"], entry["data_dtype"])
    if kind == _KEY:
        return jax.random.wrap_key_data(value, impl=_key_impl(like, entry["impl"]))
    if kind == _ARRAY:
        return value
    value = np.asarray(value)
    if kind == _PYTHON:
        return type(like)(value.item())
    if isinstance(like, np.generic):
        return value.astype(like.dtype)[()]
    return value.astype(like.dtype, copy=False)
