"""Runs every conformance case on 8 simulated CPU devices; writes the results to a .npz.

Started once per test session by the ``sharded_results`` fixture (tests/conftest.py)
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``:

    python tests/_sharded_worker.py OUT.npz CKPT_DIR

(The ``sharded_results`` fixture starts it in the background at collection time.)

For each case it runs ``STEPS`` jitted steps of the quadratic problem three times:
with every array on one device; with leaf ``w`` (leading dim 8) sharded over a 1-D
mesh of 8 devices and the other leaves replicated (sharding propagated by XLA); and
the same under an *explicit-sharding* mesh (``jax.set_mesh``, shardings in the types,
as in optax's ``sharding_test``), where ``lax.scan`` requires the optimizer state to
keep its type, sharding included, across an update. Keys written per case ``c``:

* ``c/missing``: why the case was skipped (then nothing else), or
* ``c/error``: the traceback if running the case raised, or
* ``c/single/<leaf>``, ``c/sharded/<leaf>``, ``c/explicit/<leaf>``: final parameters,
  ``c/loss/single``, ``c/loss/sharded``, ``c/loss/explicit``: the loss before each step,
  ``c/w_still_sharded``: whether the final ``w`` kept the input sharding,
* ``c/explicit/type_changes``: the state leaves whose type (shape, dtype, sharding)
  an update changes, per ``jax.eval_shape`` under the explicit mesh (empty if none),
  ``c/explicit/error``: the traceback if the explicit-sharding run raised.

It also checks an orbax round trip of a sharded state (``ckpt/...`` keys).
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conformance as cf  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402

STEPS = 12
SPIKE_AT = 8  # after the GNMR warmup used by the cases, so recovery runs sharded too
NUM_DEVICES = 8


def shard_params(params, mesh):
    """``w`` split along axis 0 over the mesh; every other leaf replicated."""
    return {
        name: jax.device_put(
            leaf, NamedSharding(mesh, PartitionSpec("d") if name == "w" else PartitionSpec())
        )
        for name, leaf in params.items()
    }


def run_case(case, mesh, out):
    tx = cf.get_tx(case)
    params = cf.init_params("quadratic", 0)
    kw = {"steps": STEPS, "spike_at": SPIKE_AT}
    single, _, aux_single = cf.train(tx, "quadratic", params, **kw)
    sharded_in = shard_params(params, mesh)
    sharded, _, aux_sharded = cf.train(tx, "quadratic", sharded_in, **kw)
    for leaf in params:
        out[f"{case.name}/single/{leaf}"] = np.asarray(single[leaf])
        out[f"{case.name}/sharded/{leaf}"] = np.asarray(sharded[leaf])
    out[f"{case.name}/loss/single"] = np.asarray(aux_single["loss"])
    out[f"{case.name}/loss/sharded"] = np.asarray(aux_sharded["loss"])
    out[f"{case.name}/w_still_sharded"] = np.asarray(
        sharded["w"].sharding.is_equivalent_to(sharded_in["w"].sharding, 2)
    )


def _describe(x) -> tuple:
    """Shape, dtype, partition spec and weak type of an array or ``ShapeDtypeStruct``."""
    if isinstance(x, jax.ShapeDtypeStruct):
        spec = x.sharding.spec if x.sharding is not None else None
        return (x.shape, str(x.dtype), spec, x.weak_type)
    aval = jax.typeof(x)
    return (aval.shape, str(aval.dtype), aval.sharding.spec, aval.weak_type)


def _type_changes(tx, params) -> str:
    """State leaves whose type (shape, dtype, sharding) one update changes.

    As optax's ``sharding_test``: ``init`` runs eagerly under the mesh; the update's
    output types come from tracing it (``jax.eval_shape``, no compilation).
    """
    state0 = tx.init(params)
    _, state1 = jax.eval_shape(tx.update, params, state0, params)
    flat0 = jax.tree_util.tree_flatten_with_path(state0)[0]
    changes = [
        f"{jax.tree_util.keystr(path)}: {_describe(a)} -> {_describe(b)}"
        for (path, a), b in zip(flat0, jax.tree.leaves(state1), strict=True)
        if _describe(a) != _describe(b)
    ]
    return "\n".join(changes)


def run_case_explicit(case, mesh, out):
    """The sharded run again, with the shardings in the types (an explicit mesh)."""
    tx = cf.get_tx(case)
    params = cf.init_params("quadratic", 0)
    with jax.set_mesh(mesh):
        sharded_in = shard_params(params, mesh)
        out[f"{case.name}/explicit/type_changes"] = np.asarray(_type_changes(tx, sharded_in))
        final, _, aux = cf.train(tx, "quadratic", sharded_in, steps=STEPS, spike_at=SPIKE_AT)
    for leaf in params:
        out[f"{case.name}/explicit/{leaf}"] = np.asarray(final[leaf])
    out[f"{case.name}/loss/explicit"] = np.asarray(aux["loss"])


def checkpoint_round_trip(mesh, ckpt_dir, out):
    """Saves a sharded (params, opt_state, key) and restores it against a sharded target."""
    from optstab import checkpoint

    # Prefer a GNMR case: its state holds a static pytree node (the unit names).
    preferred = ["gnmr_wrap_reset", "gnmr_clip"] + [c.name for c in cf.CASES]
    case = next(cf.CASES_BY_NAME[n] for n in preferred if cf.CASES_BY_NAME[n].missing() is None)
    out["ckpt/case"] = np.asarray(case.name)
    tx = cf.get_tx(case)
    params = shard_params(cf.init_params("quadratic", 0), mesh)
    key = jax.device_put(
        jax.random.split(jax.random.key(3), 8), NamedSharding(mesh, PartitionSpec("d"))
    )
    params, opt_state, _ = cf.train(tx, "quadratic", params, steps=4)
    state = {"params": params, "opt_state": opt_state, "key": key}
    checkpoint.save(ckpt_dir, 4, state)
    like = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = checkpoint.restore(ckpt_dir, None, like)
    problems = []
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, a), b in zip(flat, jax.tree.leaves(restored), strict=True):
        name = jax.tree_util.keystr(path)
        if not b.sharding.is_equivalent_to(a.sharding, a.ndim):
            problems.append(f"{name}: sharding {b.sharding} != {a.sharding}")
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            problems.append(f"{name}: values differ")
    # Resharding on restore: the same checkpoint into an unsharded target.
    unsharded = checkpoint.restore(
        ckpt_dir, 4, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    )
    for (path, a), b in zip(flat, jax.tree.leaves(unsharded), strict=True):
        name = jax.tree_util.keystr(path)
        if len(b.sharding.device_set) != 1:
            problems.append(f"{name}: unsharded restore gave {b.sharding}")
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            problems.append(f"{name}: values differ after an unsharded restore")
    w_sharding = restored["params"]["w"].sharding
    out["ckpt/w_sharded"] = np.asarray(
        isinstance(w_sharding, NamedSharding) and w_sharding.spec == PartitionSpec("d")
    )
    out["ckpt/problems"] = np.asarray("\n".join(problems))


def main(npz_path: str, ckpt_dir: str) -> None:
    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(f"expected {NUM_DEVICES} devices, got {jax.devices()}")
    mesh = Mesh(np.array(jax.devices()), ("d",))
    explicit_mesh = jax.make_mesh((NUM_DEVICES,), ("d",), axis_types=(AxisType.Explicit,))
    out: dict[str, np.ndarray] = {}
    for case in cf.CASES:
        reason = case.missing()
        if reason is not None:
            out[f"{case.name}/missing"] = np.asarray(reason)
            continue
        try:
            run_case(case, mesh, out)
        except Exception:  # reported by the test of this case
            out[f"{case.name}/error"] = np.asarray(traceback.format_exc())
        try:
            run_case_explicit(case, explicit_mesh, out)
        except Exception:
            out[f"{case.name}/explicit/error"] = np.asarray(traceback.format_exc())
    try:
        checkpoint_round_trip(mesh, ckpt_dir, out)
    except Exception:
        out["ckpt/error"] = np.asarray(traceback.format_exc())
    tmp_path = npz_path + ".tmp.npz"
    np.savez(tmp_path, **out)
    os.replace(tmp_path, npz_path)


if __name__ == "__main__":
    # Never outlive the test session by much, even if pytest was interrupted.
    signal.alarm(int(os.environ.get("OPTSTAB_SHARDED_TIMEOUT_S", "400")))
    main(sys.argv[1], sys.argv[2])
