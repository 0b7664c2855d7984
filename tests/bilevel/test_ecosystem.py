"""The bilevel transforms in the JAX/Optax ecosystem: jit without retracing,
inject_hyperparams, vmap over keys, orbax checkpoints, 8-device sharding, bf16."""

import functools
from pathlib import Path

import bilevel_data as bd
import conformance as cf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optstab import bilevel, checkpoint

SOLVERS = {
    "ma_soba": lambda **kw: bilevel.ma_soba(bd.MLP, **{"inner_lr": 0.2, "aux_lr": 0.1, **kw}),
    "bros": lambda **kw: bilevel.bros(bd.MLP, 2, **{"inner_lr": 0.2, "aux_lr": 0.1, **kw}),
}


def _chained(name, **kw):
    return optax.chain(SOLVERS[name](average=0.5, key=7, **kw), optax.sgd(0.1))


# ------------------------------------------------------------------ jit contract


@pytest.mark.parametrize("name", list(SOLVERS))
def test_no_recompilation_on_second_call(name):
    tx = _chained(name)
    traces = []

    # The usual train step donates the optimizer state: that fails if init puts one
    # buffer into two state fields.
    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(x, opt_state, inner, outer):
        traces.append(1)
        updates, opt_state = tx.update(x, opt_state, x, inner_batch=inner, outer_batch=outer)
        return optax.apply_updates(x, updates), opt_state

    (inner, outer) = bd.mlp_batches(2)
    pick = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    state0 = tx.init(bd.MLP_X)
    dtypes0 = cf.tree_dtypes(state0)
    x1, state1 = step(bd.MLP_X, state0, pick(inner, 0), pick(outer, 0))
    # The update returns a state exactly like init's (dtypes, shapes, weak types).
    assert cf.tree_dtypes(state1) == dtypes0
    assert cf.tree_dtypes(x1) == cf.tree_dtypes(bd.MLP_X)
    x2, state2 = step(x1, state1, pick(inner, 1), pick(outer, 1))
    assert len(traces) == 1, f"traced {len(traces)} times"
    assert int(bilevel.find_bilevel_state(state2).count) == 2
    assert cf.all_finite((x2, state2))
    assert not np.allclose(x2["shift"], x1["shift"])


# --------------------------------------------------------------- inject_hyperparams

STATIC = {"ma_soba": ("key",), "bros": ("rank", "resample_every", "key")}


def _injected(name):
    factory = getattr(bilevel, name)
    injected = optax.inject_hyperparams(factory, static_args=STATIC[name])
    args = (bd.MLP,) if name == "ma_soba" else (bd.MLP, 2)
    return optax.chain(
        injected(*args, inner_lr=0.2, aux_lr=0.1, average=0.5, key=7), optax.sgd(0.1)
    )


def _set_hyperparams(opt_state, **values):
    """The chain's first state, an inject state, with some hyperparameters replaced."""
    inject = opt_state[0]
    hyper = dict(inject.hyperparams)
    for name, value in values.items():
        assert name in hyper, f"{name} is not an injected hyperparameter"
        hyper[name] = jnp.asarray(value, hyper[name].dtype)
    return (inject._replace(hyperparams=hyper),) + tuple(opt_state[1:])


@pytest.mark.parametrize("name", list(SOLVERS))
def test_inject_hyperparams_gives_the_same_numbers_and_live_hyperparameters(name):
    injected, plain = _injected(name), _chained(name)
    inner, outer = bd.mlp_batches(4)

    @jax.jit
    def check(x):
        x_inj, state, _ = bd.run_fn(injected, x, injected.init(x), inner, outer)
        x_ref, ref_state, _ = bd.run_fn(plain, x, plain.init(x), inner, outer)
        batch = jax.tree.map(lambda a: a[0], (inner, outer))

        def update_with(**values):
            new_state = _set_hyperparams(state, **values)
            _, after = injected.update(
                x_inj, new_state, x_inj, inner_batch=batch[0], outer_batch=batch[1]
            )
            return bilevel.find_bilevel_state(after)

        return (x_inj, state), (x_ref, ref_state), update_with(inner_lr=0, aux_lr=0, average=0)

    (x_inj, state), (x_ref, ref_state), frozen = check(bd.MLP_X)
    got, want = bilevel.find_bilevel_state(state), bilevel.find_bilevel_state(ref_state)
    # Same arithmetic, hyperparameters traced instead of constant: XLA may fold and
    # order sums differently. Sums of <= 96 products per step (batch 16 x 6 inputs)
    # move by <= 96 * 2^-24 = 6e-6 of their scale, 4 contracting steps: 2.4e-5; the
    # values are O(0.1-1), so atol 1e-6 only matters for entries near zero.
    close = lambda a, b: np.testing.assert_allclose(
        cf.as_numpy(a), cf.as_numpy(b), rtol=2.5e-5, atol=1e-6
    )
    jax.tree.map(close, (x_inj, got), (x_ref, want))
    # The injected values are live: zero step sizes and a zero average keep y, z and w
    # exactly (each field reads its own hyperparameter from the state), where the
    # injected values moved all three away from init.
    cf.assert_trees_equal((frozen.y, frozen.z, frozen.w), (got.y, got.z, got.w))
    assert int(frozen.count) == int(got.count) + 1
    init = bilevel.find_bilevel_state(injected.init(bd.MLP_X))
    for field in ("y", "z", "w"):
        before, after = getattr(init, field), getattr(got, field)
        assert not any(jax.tree.leaves(jax.tree.map(np.allclose, after, before))), field


def test_inject_hyperparams_without_static_args():
    tx = optax.inject_hyperparams(bilevel.ma_soba)(bd.MLP, inner_lr=0.2, aux_lr=0.1)
    state = tx.init(bd.MLP_X)
    inner, outer = jax.tree.map(lambda a: a[0], bd.mlp_batches(1))
    tx.update(bd.MLP_X, state, bd.MLP_X, inner_batch=inner, outer_batch=outer)
    cf.assert_trees_equal(state.inner_state.key, jax.random.key(0))


# ---------------------------------------------------------------------- vmap


@jax.jit
def _bros_run(key):
    tx = optax.chain(bilevel.bros(bd.MLP, 2, 0.2, 0.1, average=0.5, key=key), optax.sgd(0.1))
    inner, outer = bd.mlp_batches(4)
    return bd.run_fn(tx, bd.MLP_X, tx.init(bd.MLP_X), inner, outer)


def test_vmap_over_keys_matches_separate_runs():
    keys = jax.random.split(jax.random.key(11), 2)
    batched = jax.jit(jax.vmap(_bros_run))(keys)
    for i in range(len(keys)):
        single = _bros_run(keys[i])
        # The batched program may fuse and sum in another order: as for inject_hyperparams
        # above, <= 96 * 2^-24 per step over 4 steps = 2.4e-5.
        cf.assert_row_close(batched, single, i, rtol=2.5e-5, atol=1e-6)
    finals = np.asarray(batched[0]["shift"])
    assert len({tuple(row) for row in finals.tolist()}) == len(keys), "keys gave equal runs"


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", list(SOLVERS))
def test_checkpoint_round_trip_continues_bit_identically(name, tmp_path):
    tx = _chained(name)
    inner, outer = bd.mlp_batches(6)
    first = lambda tree: jax.tree.map(lambda a: a[:3], tree)
    last = lambda tree: jax.tree.map(lambda a: a[3:], tree)
    # Restored arrays are committed to a device; commit the originals too, so that
    # both continuations run the same executable.
    x = jax.device_put(bd.MLP_X, jax.devices()[0])
    x, opt_state, _ = bd.run(tx, x, jax.jit(tx.init)(x), first(inner), first(outer))
    state = {"x": x, "opt_state": opt_state, "step": 3}
    checkpoint.save(tmp_path / "ckpt", 3, state)
    restored = checkpoint.restore(tmp_path / "ckpt", None, jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    key = bilevel.find_bilevel_state(restored["opt_state"]).key
    assert key.dtype == bilevel.find_bilevel_state(opt_state).key.dtype  # still a typed key
    cf.assert_trees_equal(restored, state)

    resume = lambda s: bd.run(tx, s["x"], s["opt_state"], last(inner), last(outer))
    a, b = resume(state), resume(restored)
    cf.assert_trees_equal(a, b)
    assert int(bilevel.find_bilevel_state(b[1]).count) == 6


# ------------------------------------------------------------------- sharding

WORKER = Path(__file__).resolve().parent / "_bilevel_sharded_worker.py"


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bilevel_sharded") / "results.npz"
    return cf.run_on_eight_devices(WORKER, out, timeout=300)


def test_sharded_matches_single_device(sharded_results):
    # One test for both solvers, so that one xdist worker starts the subprocess.
    r = sharded_results
    for name in SOLVERS:
        if f"{name}/error" in r:
            pytest.fail(f"8-device worker raised:\n{r[f'{name}/error']}", pytrace=False)
        keys = [k for k in r if k.startswith(f"{name}/single/")]
        assert len(keys) == 6, keys  # x, y (w, b), z (w, b), w
        for key in keys:
            # Not bit-exact: sharded reductions add per-device partial sums (4 of the 32
            # samples, 2 of the 16 rows each), i.e. the same terms in another order. A sum
            # of n terms reordered moves by <= n * 2^-24 of the terms' scale: 32 * 6e-8 =
            # 1.9e-6 per reduction, two chained reductions (loss, then the x-gradient) per
            # step, 5 steps: 1.9e-5 of each leaf's scale.
            sharded = r[key.replace("/single/", "/sharded/")]
            scale = np.abs(r[key]).max()
            np.testing.assert_allclose(sharded, r[key], rtol=2e-5, atol=2e-5 * scale, err_msg=key)
        assert np.abs(r[f"{name}/single/x"] - (-1.0)).max() > 1e-3, f"{name}: x did not move"
        assert bool(r[f"{name}/y_still_sharded"]), f"{name}: the update replicated y['w']"


# ----------------------------------------------------------------------- bf16


def _bf16_problem():
    y0 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), bd.mlp_init_y(bd.MLP_X))
    return bd.MLP._replace(inner_init=y0)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_bfloat16_x_and_y_keep_their_dtypes(name):
    problem = _bf16_problem()
    make = {
        "ma_soba": lambda p: bilevel.ma_soba(p, 0.2, 0.1, average=0.5),
        "bros": lambda p: bilevel.bros(p, 2, 0.2, 0.1, average=0.5, key=7),
    }[name]
    tx = optax.chain(make(problem), optax.sgd(0.1))
    x16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), bd.MLP_X)
    inner, outer = bd.mlp_batches(3)
    state0 = tx.init(x16)
    x, opt_state, updates = bd.run(tx, x16, state0, inner, outer)
    assert cf.tree_dtypes(opt_state) == cf.tree_dtypes(state0)  # no retrace, no drift
    state = bilevel.find_bilevel_state(opt_state)
    for leaf in jax.tree.leaves((x, state.y, updates)):
        assert leaf.dtype == jnp.bfloat16
    for leaf in jax.tree.leaves((state.z, state.w)):
        assert leaf.dtype == jnp.float32
    assert cf.all_finite((x, state))
    # The same run in float32 lands nearby (bf16 keeps ~3 significant digits).
    tx32 = optax.chain(make(bd.MLP._replace(inner_init=jax.tree.map(
        lambda a: a.astype(jnp.float32), problem.inner_init))), optax.sgd(0.1))  # fmt: skip
    x32, opt32, _ = bd.run(tx32, bd.MLP_X, tx32.init(bd.MLP_X), inner, outer)
    y32 = bilevel.find_bilevel_state(opt32).y
    # bf16 rounds to 8 significant bits (2^-9 = 2e-3 relative per rounding). A step
    # chains ~10 rounded operations (losses, derivatives, updates) and 3 steps compound:
    # <= 30 * 2e-3 = 6% in the worst case, ~sqrt(30) * 2e-3 = 1% typically; rtol 5%,
    # plus atol 0.02 (5% of the values' scale ~0.4) for entries near zero.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=0.05, atol=0.02),
        (x, state.y),
        (x32, y32),
    )
