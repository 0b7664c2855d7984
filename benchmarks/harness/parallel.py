"""Device meshes for the studies: data parallel over a ``("data",)`` axis, and
optionally fully sharded data parallel (FSDP) parameters.

Every study's ``run(config, *, mesh=...)`` takes ``mesh`` (the harness resolves it with
:func:`resolve_mesh` before the study starts):

* ``"auto"`` (the default): all devices on the ``data`` axis when there are several,
  else None;
* ``None``: everything on the default device;
* a :class:`jax.sharding.Mesh` with a ``data`` axis.

With a mesh, each training step's minibatch is sharded over ``data`` (its example
axis), everything else is replicated, and with ``fsdp=True`` parameter leaves of at
least ``FSDP_MIN_SIZE`` elements are split over ``data`` along their largest
divisible axis (``jax.sharding.NamedSharding``). XLA inserts the collectives. The
numbers match a single device up to float reassociation of the batch reductions.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize()``
(the CLI's ``--distributed``); on a TPU pod every host runs the same command, e.g.::

    gcloud compute tpus tpu-vm ssh NAME --worker=all --command \\
      "cd optstab && .venv/bin/python -m benchmarks.run lowprec_lm --config full --distributed"

Example (on one device ``"auto"`` gives no mesh, and every helper is a no-op):

    >>> import jax.numpy as jnp
    >>> from benchmarks.harness import parallel
    >>> mesh = parallel.data_mesh(1)
    >>> x = parallel.shard_batch(jnp.zeros((8, 3)), mesh)
    >>> x.sharding.spec, parallel.describe(mesh)
    (P('data', None), {'devices': 1, 'axes': {'data': 1}})
    >>> parallel.shard_batch(jnp.zeros((8, 3)), None).shape  # no mesh: unchanged
    (8, 3)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA",
    "batch_constraint",
    "check_batch",
    "constrain",
    "data_mesh",
    "describe",
    "initialize_distributed",
    "param_shardings",
    "place_params",
    "place_setup",
    "replicate",
    "resolve_mesh",
    "shard_batch",
    "shardings_of",
]

DATA = "data"
FSDP_MIN_SIZE = 2**14
PyTree = Any


def initialize_distributed() -> None:
    """Joins a multi-host run (``jax.distributed.initialize()``: TPU pods, SLURM and
    GPU clusters configure it from the environment). Call before any other jax use."""
    jax.distributed.initialize()


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``("data",)`` mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    count = len(devices) if num_devices is None else num_devices
    if not 1 <= count <= len(devices):
        raise ValueError(f"asked for {count} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:count]), (DATA,), axis_types=(jax.sharding.AxisType.Auto,))


def resolve_mesh(mesh: Any) -> Mesh | None:
    """``"auto"`` -> :func:`data_mesh` when there are several devices (else None);
    None -> None; a Mesh with a ``data`` axis -> itself."""
    if isinstance(mesh, str):
        if mesh != "auto":
            raise ValueError(f"mesh must be 'auto', None or a jax Mesh, got {mesh!r}")
        return data_mesh() if jax.device_count() > 1 else None
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh) or DATA not in mesh.axis_names:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with a {DATA!r} axis, got {mesh!r}")
    return mesh


def describe(mesh: Mesh | None) -> dict:
    """JSON-ready description of the mesh a result was computed on."""
    if mesh is None:
        return {"devices": 1, "axes": {}}
    return {"devices": int(mesh.devices.size), "axes": dict(mesh.shape)}


def _data_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA])


def batch_spec(ndim: int, axis: int) -> PartitionSpec:
    """``PartitionSpec`` splitting ``axis`` over ``data``."""
    spec = [None] * ndim
    spec[axis] = DATA
    return PartitionSpec(*spec)


def replicate(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """Puts every leaf on every device of ``mesh`` (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(tree: PyTree, mesh: Mesh | None, axis: int = 0) -> PyTree:
    """Puts each leaf on ``mesh`` with ``axis`` (the example axis) split over ``data``.

    Raises:
      ValueError: an example axis is not divisible by the number of data shards.
    """
    if mesh is None:
        return tree

    def put(x):
        _check_divisible(x.shape, axis, mesh)
        return jax.device_put(x, NamedSharding(mesh, batch_spec(np.ndim(x), axis)))

    return jax.tree.map(put, tree)


def batch_constraint(tree: PyTree, mesh: Mesh | None, axis: int = 0) -> PyTree:
    """Inside ``jit``: asks XLA to keep ``axis`` of each leaf split over ``data``.

    Works under ``vmap`` (the mapped axis stays unsharded). No-op without a mesh.
    """
    if mesh is None:
        return tree

    def constrain(x):
        _check_divisible(x.shape, axis, mesh)
        sharding = NamedSharding(mesh, batch_spec(x.ndim, axis))
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(constrain, tree)


def _check_divisible(shape: tuple, axis: int, mesh: Mesh) -> None:
    check_batch(shape[axis], mesh)


def check_batch(size: int, mesh: Mesh | None, what: str = "batch axis") -> None:
    """A ``ValueError`` when ``size`` examples do not split evenly over ``mesh``'s
    ``data`` axis (a study's ``prepare`` checks its batch sizes with it)."""
    if mesh is not None and size % _data_size(mesh):
        raise ValueError(
            f"{what} of size {size} does not split over {_data_size(mesh)} "
            "devices: choose a batch size divisible by the device count"
        )


def param_shardings(
    params: PyTree, mesh: Mesh, fsdp: bool = False, leading_axes: int = 0
) -> PyTree:
    """A ``NamedSharding`` per leaf: replicated, or with ``fsdp`` split over ``data``
    along the largest axis that divides evenly, for leaves of at least
    ``FSDP_MIN_SIZE`` elements (smaller ones stay replicated). The first
    ``leading_axes`` axes (a stacked seed axis, say) are never split."""
    shards = _data_size(mesh)

    def one(leaf):
        shape = np.shape(leaf)
        spec = [None] * len(shape)
        if fsdp and int(np.prod(shape[leading_axes:])) >= FSDP_MIN_SIZE:
            candidates = range(leading_axes, len(shape))
            divisible = [i for i in candidates if shape[i] % shards == 0]
            if divisible:
                spec[max(divisible, key=lambda i: shape[i])] = DATA
        return NamedSharding(mesh, PartitionSpec(*spec))

    return jax.tree.map(one, params)


def place_params(
    params: PyTree, mesh: Mesh | None, fsdp: bool = False, leading_axes: int = 0
) -> PyTree:
    """``device_put`` of ``params`` with :func:`param_shardings` (no-op without a mesh)."""
    if mesh is None:
        return params
    return jax.device_put(params, param_shardings(params, mesh, fsdp, leading_axes))


def place_setup(setup: dict, mesh: Mesh | None, fsdp: bool = False, leading_axes: int = 1) -> dict:
    """A study's per-seed ``setup`` on ``mesh``: ``setup["params"]`` placed by
    :func:`place_params` (the stacked seed axis never split), everything else
    replicated. No-op without a mesh."""
    if mesh is None:
        return setup
    rest = {key: value for key, value in setup.items() if key != "params"}
    params = place_params(setup["params"], mesh, fsdp, leading_axes)
    return {**replicate(rest, mesh), "params": params}


def shardings_of(tree: PyTree, mesh: Mesh | None) -> PyTree:
    """The shardings of ``tree``'s (placed) arrays, or None without a mesh.

    With :func:`constrain` inside a jitted step, the step's outputs keep the shardings
    of its inputs, so that the compiled step accepts its own outputs (XLA would
    otherwise choose output shardings of its own).
    """
    return None if mesh is None else jax.tree.map(lambda leaf: leaf.sharding, tree)


def constrain(tree: PyTree, shardings: PyTree) -> PyTree:
    """Inside ``jit``: ``tree`` constrained to ``shardings`` (from :func:`shardings_of`);
    unchanged when ``shardings`` is None (no mesh)."""
    if shardings is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, shardings)
