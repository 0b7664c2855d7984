"""Runs MA-SOBA and BROS on 8 simulated CPU devices; writes the results to a .npz.

Started by ``test_ecosystem.py::test_sharded_matches_single_device`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``::

    python tests/bilevel/_bilevel_sharded_worker.py OUT.npz

For each solver it runs ``STEPS`` jitted steps (chained with ``optax.sgd``) of a
small regression problem twice: with every array on one device, and with the lower
variable's weight ``w`` (16 rows) and both minibatches split along their leading axis
over a 1-D mesh of 8 devices. Keys per solver ``s``: ``s/<single|sharded>/<name>``
for the final ``x`` and the state's ``y``, ``z`` and ``w`` leaves, and
``s/y_still_sharded``; ``s/error`` holds a traceback instead if the run raised.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optstab import bilevel

STEPS, ROWS, COLS, BATCH, NUM_DEVICES = 5, 16, 4, 32, 8


def inner_loss(x, y, batch):
    a, t = batch
    pred = jnp.tanh(a @ y["w"] + y["b"])
    return jnp.mean(jnp.sum((pred - t) ** 2, axis=-1)) + 0.5 * jnp.exp(x) * jnp.sum(y["w"] ** 2)


def outer_loss(x, y, batch):
    a, t = batch
    return jnp.mean(jnp.sum((a @ y["w"] + y["b"] - t) ** 2, axis=-1))


Y0 = {"w": jnp.full((ROWS, COLS), 0.05), "b": jnp.zeros(COLS)}
PROBLEM = bilevel.BilevelProblem(inner_loss, outer_loss, Y0)
SOLVERS = {
    "ma_soba": bilevel.ma_soba(PROBLEM, 0.2, 0.1, average=0.5),
    # Unscaled steps: the rank rule would divide the output by k^2 = (1 + 15/4)^2 and x
    # would hardly move in STEPS steps. The rule's scales are static numbers; they do
    # not interact with sharding.
    "bros": bilevel.bros(PROBLEM, 4, 0.2, 0.1, average=0.5, key=3, rank_scaled_steps=False),
}


def batches(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((STEPS, BATCH, ROWS)).astype(np.float32)
    t = rng.standard_normal((STEPS, BATCH, COLS)).astype(np.float32)
    return jnp.asarray(a), jnp.asarray(t)


def make_step(tx):
    @jax.jit
    def step(x, opt_state, inner, outer):
        updates, opt_state = tx.update(x, opt_state, x, inner_batch=inner, outer_batch=outer)
        return optax.apply_updates(x, updates), opt_state

    return step


def run(step, x, opt_state, inner, outer):
    for i in range(STEPS):
        pick = lambda tree, i=i: jax.tree.map(lambda a: a[i], tree)
        x, opt_state = step(x, opt_state, pick(inner), pick(outer))
    return x, opt_state


def run_solver(name, transform, mesh, out):
    tx = optax.chain(transform, optax.sgd(0.1))
    step = make_step(tx)
    x = jnp.float32(-1.0)
    inner, outer = batches(0), batches(1)
    single_x, single_state = run(step, x, tx.init(x), inner, outer)

    rows = NamedSharding(mesh, PartitionSpec("d"))
    batch_axis = NamedSharding(mesh, PartitionSpec(None, "d"))  # (steps, batch, ...)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_state = tx.init(x)
    state = bilevel.find_bilevel_state(opt_state)

    def place(tree):
        return {"w": jax.device_put(tree["w"], rows), "b": jax.device_put(tree["b"], replicated)}

    sharded_state = state._replace(y=place(state.y), z=place(state.z))
    opt_state = (sharded_state,) + tuple(opt_state[1:])
    shard = lambda tree: jax.tree.map(lambda a: jax.device_put(a, batch_axis), tree)
    sharded_x, sharded_opt = run(step, x, opt_state, shard(inner), shard(outer))

    for label, (fx, fs) in {
        "single": (single_x, single_state),
        "sharded": (sharded_x, sharded_opt),
    }.items():
        found = bilevel.find_bilevel_state(fs)
        out[f"{name}/{label}/x"] = np.asarray(fx)
        for field in ("y", "z", "w"):
            value = getattr(found, field)
            for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
                key = jax.tree_util.keystr(path).strip("[]'\"") or "leaf"
                out[f"{name}/{label}/{field}_{key}"] = np.asarray(leaf)
    final_w = bilevel.find_bilevel_state(sharded_opt).y["w"]
    out[f"{name}/y_still_sharded"] = np.asarray(final_w.sharding.is_equivalent_to(rows, 2))


def main(npz_path: str) -> None:
    if jax.device_count() != NUM_DEVICES:
        raise SystemExit(f"expected {NUM_DEVICES} devices, got {jax.devices()}")
    mesh = Mesh(np.array(jax.devices()), ("d",))
    out: dict[str, np.ndarray] = {}
    for name, transform in SOLVERS.items():
        try:
            run_solver(name, transform, mesh, out)
        except Exception:  # reported by the test
            out[f"{name}/error"] = np.asarray(traceback.format_exc())
    tmp_path = npz_path + ".tmp.npz"
    np.savez(tmp_path, **out)
    os.replace(tmp_path, npz_path)


if __name__ == "__main__":
    signal.alarm(int(os.environ.get("OPTSTAB_SHARDED_TIMEOUT_S", "300")))
    main(sys.argv[1])
