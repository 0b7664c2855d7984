"""The shared conformance suite: every optimizer case of ``conformance.CASES`` must
converge, be jit/vmap/sharding friendly, compose with optax and flax wrappers, and
round-trip through checkpoints bit-exactly."""

from __future__ import annotations

import conformance as cf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from optstab import checkpoint

EPS32 = 2.0**-24  # unit roundoff of float32

# Convergence targets. Plain adam reaches ~2e-7 of the initial quadratic loss in 150
# steps and ~2e-3 on Rosenbrock in 1000; the margins leave room for stability
# controls that slow a run down a little, but one that stalls or breaks it fails.
QUADRATIC_DROP = 1e-4  # final / initial loss
ROSENBROCK_TOL = 0.05  # final loss (initial 24.2 at (-1.2, 1))


@pytest.fixture(params=cf.CASES, ids=[c.name for c in cf.CASES])
def case(request) -> cf.Case:
    """Every registered case; skipped while the module it needs does not exist."""
    reason = request.param.missing()
    if reason is not None:
        pytest.skip(reason)
    return request.param


def _losses(aux) -> np.ndarray:
    loss = np.asarray(aux["loss"])
    assert np.all(np.isfinite(loss)), f"non-finite loss: {loss}"
    return loss


def _key_data(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def _quadratic_grads(params, scale=1.0):
    return jax.tree.map(lambda g: g * scale, jax.grad(cf.quadratic_loss)(params))


# ------------------------------------------------------------------ convergence


def test_converges_on_quadratic(case):
    tx = cf.get_tx(case)
    params, state, aux = cf.train(tx, "quadratic", cf.init_params("quadratic", 0), steps=case.steps)
    first = _losses(aux)[0]
    final = float(cf.quadratic_loss(params))
    assert first > 100.0
    assert final < QUADRATIC_DROP * first, f"loss {first:.4g} -> {final:.4g} in {case.steps}"
    assert cf.all_finite(state)


def test_converges_on_rosenbrock(case):
    tx = cf.get_tx(case)
    steps = case.rosenbrock_steps
    params, _, aux = cf.train(tx, "rosenbrock", cf.init_params("rosenbrock", 0), steps=steps)
    # (1 + 1.2)^2 + 100 (1 - 1.44)^2 = 24.2, from float32 inputs in ~6 roundings:
    # 6 * EPS32 = 3.6e-7 < rel 1e-6.
    assert _losses(aux)[0] == pytest.approx(24.2, rel=1e-6)
    final = float(cf.rosenbrock_loss(params))
    # (A loss below 0.05 already puts (x, y) within 0.52 of the unique minimum (1, 1).)
    assert final < ROSENBROCK_TOL, f"Rosenbrock loss {final:.4g} after {steps} steps"


# ------------------------------------------------------------------ jit contract


def test_unknown_extra_args_are_tolerated(case):
    tx = cf.get_tx(case)
    params = cf.init_params("quadratic", 0)

    @jax.jit
    def both(grads, state, params):
        return tx.update(grads, state, params, some_unknown_arg=1.0), tx.update(
            grads, state, params
        )

    (updates, state), (ref_updates, ref_state) = both(
        _quadratic_grads(params), tx.init(params), params
    )
    cf.assert_trees_equal(updates, ref_updates)
    cf.assert_trees_equal(state, ref_state)
    assert float(cf.global_norm(updates)) > 0.0


def test_no_recompilation_on_second_call(case):
    tx = cf.get_tx(case)
    params = cf.init_params("quadratic", 0)
    traces = []

    @jax.jit
    def step(params, state, grads):
        traces.append(1)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state0 = tx.init(params)
    params1, state1 = step(params, state0, _quadratic_grads(params))
    # An update must return a state exactly like init's (dtypes, shapes, weak types),
    # or the second call retraces.
    assert cf.tree_dtypes(state1) == cf.tree_dtypes(state0)
    params2, _ = step(params1, state1, _quadratic_grads(params1, 0.5))
    assert len(traces) == 1, f"traced {len(traces)} times"
    assert cf.quadratic_loss(params2) < cf.quadratic_loss(params)


def test_state_from_plain_init_can_be_donated(case):
    # Donating params and optimizer state is the usual train step; it fails if init
    # puts one buffer into two state fields ("donate the same buffer twice").
    tx = cf.get_tx(case)
    params = cf.init_params("quadratic", 0)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p), donate_argnums=(1,))
    updates, _ = step(params, tx.init(params), _quadratic_grads(params))
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


# ------------------------------------------------------------------ optax wrappers


def test_inject_hyperparams(case):
    injected = cf.get_tx(case, injected=True)
    plain = cf.get_tx(case)
    lrs = jnp.array([0.0, case.lr, 2 * case.lr], jnp.float32)
    found = []

    @jax.jit
    def check(params):
        p_inj, state, aux_inj = cf.train_fn(injected, "quadratic", params, steps=12)
        p_ref, _, aux_ref = cf.train_fn(plain, "quadratic", params, steps=12)
        grads = _quadratic_grads(p_inj)

        def update_at(lr):
            new_state, count = cf.set_learning_rate(state, lr)
            found.append(count)
            return injected.update(grads, new_state, p_inj)[0]

        return (p_inj, aux_inj["loss"]), (p_ref, aux_ref["loss"]), jax.vmap(update_at)(lrs)

    got, want, updates = check(cf.init_params("quadratic", 0))
    # Same numbers as the plain optimizer, up to the rounding of the hyperparameters:
    # injected, they are float32 arrays and 1 - b is rounded from float32(b) (for
    # b2 = 0.999 that is 1.3e-5 relative; Python floats give the exact 1 - b). Adam's
    # update divides by sqrt(v): <= 6.5e-6 relative per step, so 12 steps of lr = 0.05
    # move O(1) parameters apart by <= 12 * 0.05 * 6.5e-6 = 4e-6 (atol 1e-5). The loss
    # moves by <= |grad L| * 4e-6 <= sqrt(2 * 100 * 300) * 4e-6 = 1e-3, against losses
    # >= ~10 over these 12 steps: rtol 1e-4.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    # The injected learning rate is live: the update is zero at lr = 0, linear in lr.
    assert found and min(found) >= 1, "no injected learning_rate in the optimizer state"
    u0, u1, u2 = (jax.tree.map(lambda u, i=i: u[i], updates) for i in range(3))
    assert float(cf.global_norm(u1)) > 0.0
    jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), u0)
    # Doubling is exact in binary floating point, so fl(2 lr * d) = 2 fl(lr * d); XLA may
    # at most contract the last product with a neighbouring op (one rounding, EPS32).
    jax.tree.map(lambda b, a: np.testing.assert_allclose(b, 2 * a, rtol=2 * EPS32, atol=0), u2, u1)


def test_multisteps(case):
    tx = cf.get_tx(case, every_k=2)
    params0 = cf.init_params("quadratic", 0)
    params, _, aux = cf.train(tx, "quadratic", params0, steps=2 * case.steps)
    norms = np.asarray(aux["update_norm"])
    # Mini-steps 1, 3, 5, ... (index 0, 2, ...) only accumulate: exactly zero updates.
    np.testing.assert_array_equal(norms[0::2], 0.0)
    assert np.all(norms[1::2][:10] > 0.0)
    first = _losses(aux)[0]
    final = float(cf.quadratic_loss(params))
    assert final < QUADRATIC_DROP * first, f"loss {first:.4g} -> {final:.4g} with MultiSteps"
    # Both mini-steps of a pair see the same parameters (a deterministic problem),
    # so their mean is the plain gradient: the run follows the plain optimizer's.
    plain, _, plain_aux = cf.train(cf.get_tx(case), "quadratic", params0, steps=case.steps)
    # The mean of two equal gradients is exact, but the two programs are compiled apart
    # and XLA may round each float32 op differently (<= 1 ulp). Adam's steps then differ
    # by ~20 roundings of lr = 0.05: over 150 steps, O(1) parameters drift apart by
    # <= 150 * 0.05 * 20 * EPS32 = 9e-6, which moves the loss by <= |grad L0| * 9e-6 =
    # sqrt(2 * 100 * L0) * 9e-6 <= 1e-5 * L0 for L0 >= 162 (seed 0 starts at L0 = 265).
    assert first > 162.0
    np.testing.assert_allclose(aux["loss"][1::2], plain_aux["loss"], rtol=0, atol=1e-5 * first)


# ------------------------------------------------------------------ transformations


def test_vmap_over_seeds_matches_separate_runs(case):
    tx = cf.get_tx(case)
    seeds = (0, 1, 2)
    steps, spike_at = 10, 7  # the spike comes after the GNMR warmup
    inits = [cf.init_params("quadratic", seed) for seed in seeds]
    batched = cf.vmapped_train(tx, "quadratic", steps, spike_at)(
        jax.tree.map(lambda *xs: jnp.stack(xs), *inits)
    )
    for i, params in enumerate(inits):
        single = cf.train(tx, "quadratic", params, steps=steps, spike_at=spike_at)
        # Near-exact, not bit-exact: XLA may reduce the batched program's sums (the
        # 35-term loss, norms) in another order, <= 35 * EPS32 = 2e-6 relative each.
        # A stability control compares such statistics and scales by their ratios (two
        # reductions per factor, ~4 per step), 8e-6 per step; 10 steps: 8e-5 < rtol 1e-4.
        # atol 1e-6 covers elements that cross zero.
        cf.assert_row_close(batched, single, i, rtol=1e-4, atol=1e-6)
    losses = np.asarray(batched[2]["loss"])
    assert len(set(losses[:, 0].tolist())) == len(seeds), "the seeds gave identical runs"


def test_bfloat16_params(case):
    tx = cf.get_tx(case)
    params = cf.init_params("quadratic", 0, dtype=jnp.bfloat16)
    state0 = jax.eval_shape(tx.init, params)
    updates, state1 = jax.eval_shape(tx.update, _quadratic_grads(params), state0, params)
    assert cf.tree_dtypes(updates) == cf.tree_dtypes(params), "updates must keep bf16"
    # Every state leaf keeps its dtype: float32 statistics stay float32.
    assert cf.tree_dtypes(state1) == cf.tree_dtypes(state0)
    final, state, aux = cf.train(tx, "quadratic", params, steps=40)
    assert cf.tree_dtypes(state) == cf.tree_dtypes(state0)
    assert cf.tree_dtypes(final) == cf.tree_dtypes(params)
    assert cf.all_finite(final) and cf.all_finite(state)
    first = _losses(aux)[0]
    assert float(cf.quadratic_loss(final)) < 0.05 * first
    # optax's test_gradient_accumulation: MultiSteps over bf16 params only accumulates
    # at its first mini-step, so its update is exactly zero, in bf16.
    multi = optax.MultiSteps(tx, every_k_schedule=4)
    grads = _quadratic_grads(params)
    updates, _ = jax.jit(multi.update)(grads, multi.init(params), params)
    assert cf.tree_dtypes(updates) == cf.tree_dtypes(params)
    jax.tree.map(lambda u: np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0), updates)


def test_flax_nnx_optimizer(case):
    tx = cf.get_tx(case)
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 4), np.float32))
    y = x @ jnp.array([[1.0, -1.0], [2.0, 0.5], [-0.5, 1.0], [0.0, 3.0]]) + 0.3
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer)) for _ in range(30)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------ checkpointing


def test_checkpoint_round_trip_is_bit_exact(case, tmp_path):
    tx = cf.get_tx(case)
    kw = {"steps": 6, "spike_at": 9}  # the spike comes after the restore
    # Restored arrays are committed to a device; commit the originals too, so that
    # both continuations hit the same compiled executable.
    params = jax.device_put(cf.init_params("quadratic", 0), jax.devices()[0])
    params, opt_state, _ = cf.run(tx, "quadratic", params, jax.jit(tx.init)(params), 0, **kw)
    state = {"params": params, "opt_state": opt_state, "key": jax.random.key(7), "step": 6}
    checkpoint.save(tmp_path / "ckpt", 6, state)
    restored = checkpoint.restore(tmp_path / "ckpt", None, jax.eval_shape(lambda: state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert restored["step"] == 6 and restored["key"].dtype == state["key"].dtype
    np.testing.assert_array_equal(_key_data(restored["key"]), _key_data(state["key"]))

    def resume(s):
        return cf.run(tx, "quadratic", s["params"], s["opt_state"], 6, **kw)

    a, b = resume(state), resume(restored)
    cf.assert_trees_equal(a, b)
    assert float(a[2]["update_norm"][-1]) > 0.0


# ------------------------------------------------------------------ sharding


def _sharded_results_of(case, r):
    """The 8-device worker's results; skips a case it did not run, fails one that raised."""
    if f"{case.name}/missing" in r:
        pytest.skip(f"not run in the 8-device worker: {r[f'{case.name}/missing']}")
    if f"{case.name}/error" in r:
        pytest.fail(f"8-device worker raised:\n{r[f'{case.name}/error']}", pytrace=False)
    return r


# 8 devices vs 1. With ``w`` split over 8 devices, every reduction (the loss, the global
# and per-leaf norms of the stability statistics) sums 8 partial sums and then across
# devices: another float32 summation order than on one device. A reassociated sum of
# n = 35 terms differs by at most ~n * eps * sum|terms| = 35 * 6e-8 = 2e-6 relative.
# Adam divides by sqrt(v), halving a relative error in v, and 12 steps add such errors
# up: 12 * 2e-6 / 2 * (a few) ~ 1e-5 relative in the parameters. The loss is within the
# same relative error, and atol 1e-6 covers parameters that cross zero.
SHARDED_RTOL, SHARDED_ATOL = 1e-5, 1e-6


def _assert_matches_single_device(r, name: str, run: str) -> None:
    """The 8-device ``run``'s final parameters and losses are the 1-device run's."""
    for leaf in ("a", "w"):
        np.testing.assert_allclose(
            r[f"{name}/{run}/{leaf}"],
            r[f"{name}/single/{leaf}"],
            rtol=SHARDED_RTOL,
            atol=SHARDED_ATOL,
        )
    np.testing.assert_allclose(r[f"{name}/loss/{run}"], r[f"{name}/loss/single"], rtol=SHARDED_RTOL)


def test_sharded_matches_single_device(case, sharded_results):
    r = _sharded_results_of(case, sharded_results)
    _assert_matches_single_device(r, case.name, "sharded")
    assert r[f"{case.name}/loss/single"][-1] < r[f"{case.name}/loss/single"][0]
    assert bool(r[f"{case.name}/w_still_sharded"]), "the update replicated the sharded leaf w"


def test_explicit_sharding_keeps_state_types_in_scan(case, sharded_results):
    # optax's sharding_test: under an explicit-sharding mesh an update must return the
    # state init gave, shardings included, or lax.scan rejects the carry.
    r = _sharded_results_of(case, sharded_results)
    name = case.name
    if f"{name}/explicit/error" in r:
        pytest.fail(f"explicit-sharding run raised:\n{r[f'{name}/explicit/error']}", pytrace=False)
    changes = str(r[f"{name}/explicit/type_changes"])
    assert not changes, f"an update changes the state's types:\n{changes}"
    _assert_matches_single_device(r, name, "explicit")  # the same computation, typed


# ------------------------------------------------ properties of optax's shared tests
# (optax 0.2.8: optax/contrib/_common_test.py, optax/_src/alias_test.py,
# float64_test.py and sharding_test.py, adapted to every case of the registry)


def test_map_params_reaches_every_params_copy(case):
    # optax.tree.map_params (used to give the optimizer state the params' shardings)
    # calls init on a placeholder pytree with no leaves.
    tx = cf.get_tx(case)
    params = cf.init_params("quadratic", 0)
    state = tx.init(params)
    cf.assert_trees_equal(optax.tree.map_params(tx, lambda v: v, state), state)
    # A marker value reaches the params-shaped subtrees (at least the inner adam's
    # moments) and nothing else.
    marked = optax.tree.map_params(tx, lambda v: jnp.full(v.shape, 7.0, v.dtype), state)
    changed = [
        a.shape
        for a, b in zip(jax.tree.leaves(marked), jax.tree.leaves(state), strict=True)
        if not np.array_equal(cf.as_numpy(a), cf.as_numpy(b))
    ]
    assert changed and set(changed) <= {p.shape for p in jax.tree.leaves(params)}


def test_init_accepts_abstract_params(case):
    # optax's sharding_test: init of jax.ShapeDtypeStruct params (no arrays yet).
    tx = cf.get_tx(case)
    params = cf.init_params("quadratic", 0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    assert cf.tree_dtypes(tx.init(abstract)) == cf.tree_dtypes(tx.init(params))


_MIXED_DTYPES = {"h": jnp.float16, "b": jnp.bfloat16, "a": jnp.float32, "w": jnp.float64}


def test_state_types_are_stable_for_every_dtype(case):
    # optax's test_state_shape_dtype_shard_stability and float64_test, in one pytree of
    # float16, bfloat16, float32 and float64 leaves (x64 on): an update inside lax.cond
    # must return exactly the types init gave (the other branch keeps the old state),
    # with updates in each parameter's dtype; the loss handed on is float16 on purpose.
    tx = cf.get_tx(case)
    with jax.enable_x64(True):
        params = {name: jnp.full((4, 2), 0.5, dtype) for name, dtype in _MIXED_DTYPES.items()}

        def loss_fn(p):
            return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - 1.0)) for x in p.values())

        @jax.jit
        def step(params, state, take_update):
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, state = jax.lax.cond(
                take_update,
                lambda: tx.update(grads, state, params, loss=loss.astype(jnp.float16)),
                lambda: (params, state),
            )
            return optax.apply_updates(params, updates), state

        state = tx.init(params)
        for take_update in (True, True, False):
            params, state = step(params, state, take_update)
        assert cf.tree_dtypes(params) == cf.tree_dtypes(
            {name: jnp.zeros((4, 2), dtype) for name, dtype in _MIXED_DTYPES.items()}
        )
        assert cf.all_finite(params) and cf.all_finite(state)


def test_complex_params_are_supported_or_rejected(case):
    # optax's alias_test runs complex64 parameters; an optimizer either supports them or
    # says it does not. Supported means: the run on the problem whose coordinates are
    # rotated by phases exp(i theta) (see conformance.py) is the real run rotated, the
    # injected spike included. A random case is checked through its deterministic variant.
    tx = cf.get_tx(case) if case.complex_make is None else case.complex_make(case.lr)
    kw = {"steps": 10, "spike_at": 7}
    real, _, real_aux = cf.train(tx, "quadratic", cf.init_params("quadratic", 0), **kw)
    try:
        rotated, state, aux = cf.train(
            tx, "quadratic_rotated", cf.init_params("quadratic_rotated", 0), **kw
        )
    except (TypeError, ValueError) as err:
        assert case.complex_params != "supported", f"complex parameters raised: {err}"
        assert "complex" in str(err).lower(), f"unclear error for complex parameters: {err}"
        return
    assert case.complex_params != "rejected", "complex parameters were accepted silently"
    assert cf.tree_dtypes(rotated) == cf.tree_dtypes(cf.init_params("quadratic_rotated", 0))
    assert cf.all_finite(state)
    # Tolerance: both runs do the same float32 operations on numbers of the same size,
    # the complex ones with a few more roundings each (a complex product or |z|: ~4 eps).
    # Adam normalises every step, so each of the 10 steps moves a parameter by at most
    # lr = 0.05 with a relative error of ~20 roundings: 10 * 0.05 * 20 * 6e-8 = 6e-7 in
    # absolute terms (parameters are O(1)); atol 1e-5 leaves a 15x margin, while dropping
    # or mistreating the imaginary part moves parameters by O(lr) = 5e-2.
    for leaf in ("a", "w"):
        np.testing.assert_allclose(
            np.asarray(rotated[leaf]),
            cf.ROTATIONS[leaf] * np.asarray(real[leaf]),
            rtol=0,
            atol=1e-5,
        )
    # Update norms: ~20 roundings per update element (1.2e-6) plus the parameter drift
    # above seen through gradients H * 6e-7 <= 6e-5 against gradients ~100 (6e-7):
    # 2e-6 relative, rtol 1e-5.
    np.testing.assert_allclose(aux["update_norm"], real_aux["update_norm"], rtol=1e-5)


def _parabola_loss(params):
    """optax's single-array target: ``[-1, 10, 1]`` to ``[1, -1, 1]``."""
    return jnp.sum(jnp.square(params - jnp.array([1.0, -1.0, 1.0])))


def test_learning_rate_schedule_and_single_array_params(case):
    # optax's test_optimizers_accept_learning_rate_schedule and its single-array
    # targets: the case built with a constant schedule follows the plain one, and a
    # pytree that is one array converges.
    scheduled = case.make(optax.constant_schedule(case.lr))
    plain = cf.get_tx(case)

    @jax.jit
    def run(params):
        def body(carry, _):
            (p_s, s_s), (p_p, s_p) = carry
            u_s, s_s = scheduled.update(jax.grad(_parabola_loss)(p_s), s_s, p_s)
            u_p, s_p = plain.update(jax.grad(_parabola_loss)(p_p), s_p, p_p)
            carry = (optax.apply_updates(p_s, u_s), s_s), (optax.apply_updates(p_p, u_p), s_p)
            return carry, None

        init = ((params, scheduled.init(params)), (params, plain.init(params)))
        # Adam moves each coordinate by at most ~lr per step and the start is 11 from the
        # target: 3 * 150 steps of lr 0.05 cover it twice over.
        ((p_s, _), (p_p, _)), _ = jax.lax.scan(body, init, None, length=3 * case.steps)
        return p_s, p_p

    start = jnp.array([-1.0, 10.0, 1.0])
    with_schedule, without = run(start)
    # The schedule hands adam the same float32 learning rate every step, as a traced
    # scalar instead of a constant: at most the last bit of each step may differ (XLA
    # may fold the constant differently), ~1 ulp per step over 150 steps of O(1)
    # parameters: 450 * 1.2e-7 = 5.4e-5.
    np.testing.assert_allclose(with_schedule, without, rtol=0, atol=6e-5)
    # Plain adam ends at ~5e-4 of the initial loss (the last coordinate creeps in as
    # sqrt(v) remembers the early, larger gradients); 1e-2 leaves room for controls that
    # slow it down, while one that stalls or diverges fails.
    assert float(_parabola_loss(without)) < 1e-2 * float(_parabola_loss(start))
