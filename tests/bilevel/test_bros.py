"""optstab.bilevel.bros: MA-SOBA with lower and auxiliary steps in random subspaces."""

import functools

import bilevel_data as bd
import conformance as cf
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from optstab import bilevel
from optstab.bilevel import subspace
from optstab.bilevel.bros import certified_inflation

BETA, GAMMA, THETA = 0.3, 0.2, 0.4


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ------------------------------------------------------------- one step, by hand


def hand_bros_step(state, x, inner_batch, outer_batch, rank, resample_every, scaled):
    """One BROS update computed from dense derivatives (float64 numpy) and the probes
    the library draws: ``draw_probes(fold_in(key, count // resample_every), y, rank)``.

    The MLP problem's ``y`` has a projected leaf ``w`` (6 x 3) and a full-space ``b``.
    With ``scaled`` (the rank rule), ``w``'s lower step is divided by
    ``k = 1 + (6 - 1) / rank``, its auxiliary step by ``k^2``, and the output is
    ``w / k^2``; ``b`` keeps the given steps. Returns ``(y, z, w, output)``.
    """
    k = 1 + (bd.MLP_IN - 1) / rank if scaled else 1.0
    period = int(state.count) // resample_every
    probes = subspace.draw_probes(jax.random.fold_in(state.key, period), state.y, rank)
    assert probes.left["b"] is None and probes.left["w"] is not None
    p, q = np.asarray(probes.left["w"], np.float64), np.asarray(probes.right["w"], np.float64)

    parts = bd.flat_hessian_parts(bd.MLP, x, state.y, inner_batch, outer_batch)
    tree_y = lambda flat: _np(parts["unravel_y"](jnp.asarray(flat, jnp.float32)))
    hessian, cross = np.asarray(parts["hessian"], np.float64), np.asarray(parts["cross"])
    grad_g, grad_f = tree_y(parts["grad_y_g"]), tree_y(parts["grad_y_f"])
    y, z, w = _np(state.y), _np(state.z), _np(state.w)

    # z seen through the right probe: Q Q^T z on the projected leaf, z elsewhere.
    right_z = {"w": q @ q.T @ z["w"], "b": z["b"]}
    # Flatten in ravel_pytree's (sorted-key) order: "b" then "w".
    flat_right_z = np.concatenate([right_z["b"].ravel(), right_z["w"].ravel()])
    h_right_z = {
        "b": (hessian @ flat_right_z)[: z["b"].size],
        "w": (hessian @ flat_right_z)[z["b"].size :].reshape(z["w"].shape),
    }
    new_y = {"w": y["w"] - BETA / k * p @ p.T @ grad_g["w"], "b": y["b"] - BETA * grad_g["b"]}
    new_z = {
        "w": z["w"] - GAMMA / k**2 * p @ (p.T @ h_right_z["w"] - p.T @ grad_f["w"]),
        "b": z["b"] - GAMMA * (h_right_z["b"] - grad_f["b"]),
    }
    direction = np.asarray(parts["grad_x_f"], np.float64) - cross @ flat_right_z
    _, unravel_x = ravel_pytree(x)
    direction = _np(unravel_x(jnp.asarray(direction, jnp.float32)))
    new_w = jax.tree.map(lambda a, d: (1 - THETA) * a + THETA * d, w, direction)
    return new_y, new_z, new_w, jax.tree.map(lambda a: a / k**2, new_w)


def _assert_close(got, want, rtol=2e-5):
    """float32 library against a float64 assembly of float32 dense derivatives. Both
    sides' derivatives are float32 sums of at most ~100 products (batch 16 x 6 inputs;
    the 21 x 21 Hessian times a vector), which another evaluation order moves by at
    most 100 * 2^-24 = 6e-6 of the terms' scale; the library adds a few float32 steps
    (probe products, the update) of ~1e-7 each. rtol 2e-5 of each leaf's largest
    entry leaves a factor ~3 for cancellation."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w, np.float64)
        atol = rtol * np.abs(w).max()
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("factored", "scaled"),
    [(True, True), (False, True), (True, False)],
    ids=["factored", "dense", "factored-unscaled"],
)
def test_one_update_matches_the_hand_computation(factored, scaled):
    rank, resample_every, count = 2, 3, 7  # period 7 // 3 = 2
    tx = bilevel.bros(
        bd.MLP, rank, BETA, GAMMA, average=THETA, key=5,
        resample_every=resample_every, factored=factored, rank_scaled_steps=scaled,
    )  # fmt: skip
    state = bd.mlp_state(tx, seed=1, count=count)
    (inner_batch, outer_batch) = jax.tree.map(lambda a: a[0], bd.mlp_batches(1))
    x = bd.MLP_X
    updates, new = jax.jit(tx.update)(x, state, x, inner_batch=inner_batch, outer_batch=outer_batch)

    want_y, want_z, want_w, want_output = hand_bros_step(
        state, x, inner_batch, outer_batch, rank, resample_every, scaled
    )
    _assert_close(new.y, want_y)
    _assert_close(new.z, want_z)
    _assert_close(new.w, want_w)
    _assert_close(updates, want_output)  # the averaged w, divided by k^2 under the rule
    assert int(new.count) == count + 1
    cf.assert_trees_equal(new.key, state.key)
    # Not a vacuous match: the update did move z.
    assert not np.allclose(new.z["w"], state.z["w"])


# ---------------------------------------------------------- relations to MA-SOBA


def _mlp_run(tx, steps=4, seed=0):
    inner, outer = bd.mlp_batches(steps, seed=seed)
    return bd.run(tx, bd.MLP_X, tx.init(bd.MLP_X), inner, outer)


REFERENCE_KW = {"average": 0.3, "radius": 5.0, "key": 4}


@functools.cache
def _ma_soba_reference_run():
    return _mlp_run(bilevel.ma_soba(bd.MLP, 0.2, 0.1, **REFERENCE_KW))


def test_rank_none_is_ma_soba_bit_for_bit():
    got = _mlp_run(bilevel.bros(bd.MLP, None, 0.2, 0.1, **REFERENCE_KW))
    cf.assert_trees_equal(got, _ma_soba_reference_run())  # x, (y, z, w, key, count), updates
    assert not np.allclose(got[1].z["w"], 0.0)


def test_rank_at_least_every_row_count_follows_ma_soba():
    # No leaf has more rows than the rank: everything stays in full space, P = Q = I.
    got = _mlp_run(bilevel.bros(bd.MLP, bd.MLP_IN, 0.2, 0.1, **REFERENCE_KW))
    # The same arithmetic traced another way (derivatives in coordinates B at y + B):
    # only XLA's fusion and summation order differ. Per step, sums of <= 96 products
    # (batch 16 x 6 inputs) move by <= 96 * 2^-24 = 6e-6 of their scale; 4 contracting
    # steps: 2.4e-5. Entries near zero are held to that fraction of the leaf's scale.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(_ma_soba_reference_run()), strict=True):
        a, b = cf.as_numpy(a), cf.as_numpy(b)
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(a, b)  # keys and counts: exact
            continue
        np.testing.assert_allclose(a, b, rtol=2.5e-5, atol=2.5e-5 * np.abs(b).max())


# ------------------------------------------------------------------ randomness


@jax.jit
def _bros_run_with_key(key, inner, outer):
    tx = bilevel.bros(bd.MLP, 2, 0.2, 0.1, average=0.5, key=key)
    return bd.run_fn(tx, bd.MLP_X, tx.init(bd.MLP_X), inner, outer)


def test_same_key_same_bits_other_key_other_result():
    inner, outer = bd.mlp_batches(3)
    first = _bros_run_with_key(jax.random.key(3), inner, outer)
    again = _bros_run_with_key(jax.random.key(3), inner, outer)
    cf.assert_trees_equal(first, again)
    other = _bros_run_with_key(jax.random.key(4), inner, outer)
    assert not np.allclose(other[1].y["w"], first[1].y["w"])
    assert not np.allclose(other[0]["shift"], first[0]["shift"])


def test_int_seed_raw_key_and_typed_key_give_the_same_state_key():
    # A run depends on the key only through state.key.
    keys = [
        bilevel.bros(bd.MLP, 2, 0.1, 0.1, key=key).init(bd.MLP_X).key
        for key in (3, jax.random.PRNGKey(3), jax.random.key(3))
    ]
    for key in keys:
        assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()
        cf.assert_trees_equal(key, jax.random.key(3))


@jax.jit
def _update_at_count(count):
    tx = bilevel.bros(bd.MLP, 2, 0.2, 0.1, average=0.5, key=9, resample_every=3)
    state = bd.mlp_state(tx, seed=2)._replace(count=count)
    inner, outer = jax.tree.map(lambda a: a[0], bd.mlp_batches(1))
    updates, new = tx.update(bd.MLP_X, state, bd.MLP_X, inner_batch=inner, outer_batch=outer)
    return updates, new.y, new.z


def test_resample_every_keeps_probes_within_a_period():
    # The learning rates are constant, so the count reaches an update only through the
    # probes: updates at counts of one period (3, 4, 5) are identical, and the
    # neighbouring periods' (count 2, count 6) differ. (The hand computation above
    # pins the period index itself: fold_in(key, count // resample_every).)
    results = {c: _update_at_count(jnp.int32(c)) for c in (2, 3, 4, 5, 6)}
    for c in (4, 5):
        cf.assert_trees_equal(results[c], results[3])
    for c in (2, 6):
        assert not np.allclose(results[c][1]["w"], results[3][1]["w"]), c
        assert not np.allclose(results[c][2]["w"], results[3][2]["w"]), c


# ---------------------------------------------------------------- convergence
#
# MA-SOBA's step sizes on the 20-row quadratic (MA-SOBA reaches x* to 1e-6 in 400
# steps with them, see test_soba), given to BROS at every rank. With the default
# (certified curvature) rule: no divergence and the error falls. With the worst-case
# rule (kappa = k fixed) two facts make the check exact rather than empirical:
# * E[x_t] follows the *mean-field* iteration: the probes of step t are independent
#   of the state and enter linearly, with E[P P^T] = I and E[P P^T H Q Q^T] = H, so
#   E[x_t] is MA-SOBA run with BROS's effective rates: lower beta / k, auxiliary
#   gamma / k^2, outer alpha / k^2 (k = 1 + (20 - 1) / r, the rank rule). That is
#   computed by hand in float64 (bd.Quadratic.ma_soba_by_hand).
# * The Monte Carlo mean over NUM_KEYS runs is compared with it in units of its
#   standard error: by the CLT each coordinate's score is ~|N(0, 1)|; over
#   3 coordinates x 2 ranks, P(max score > 4.5) <= 6 * 6.8e-6 = 4e-5 (union bound).
#   float32 rounding moves x_t by ~1e-6, far below the standard errors (~1e-2).

RANKS = (1, 2, 4, 8, 16)
MA_SOBA_STEPS = {"beta": 0.4, "gamma": 0.4, "theta": 0.5, "alpha": 0.3}
NUM_KEYS, SWEEP_STEPS = 32, 800


@functools.partial(jax.jit, static_argnames=("rank", "scaled"))
def _quad20_final_x(keys, rank, scaled="curvature"):
    s = MA_SOBA_STEPS

    def one(key):
        solver = bilevel.bros(
            bd.QUAD20.problem, rank, s["beta"], s["gamma"], average=s["theta"], key=key,
            rank_scaled_steps=scaled,
        )  # fmt: skip
        tx = optax.chain(solver, optax.sgd(s["alpha"]))
        x, opt_state = bd.run_steps_fn(tx, jnp.zeros(bd.QUAD_X), SWEEP_STEPS)
        return x, bilevel.find_bilevel_state(opt_state).nonfinite

    return jax.vmap(one)(keys)


def _assert_error_falls(xs, skipped, rank):
    """No divergence (every run finite, no step skipped) and a mean-square error below
    the start's: E||x_T - x*||^2 (Monte Carlo mean plus 4.5 standard errors, by the CLT
    exceeded with probability < 7e-6) is below ||x_0 - x*||^2 = ||x*||^2."""
    x_star = bd.QUAD20.solution()[0]
    assert np.all(np.isfinite(xs)) and not np.any(skipped), rank
    sq = np.sum((np.asarray(xs, np.float64) - x_star) ** 2, axis=1)
    bound = sq.mean() + 4.5 * sq.std(ddof=1) / np.sqrt(len(sq))
    assert bound < np.sum(x_star**2), (rank, sq.mean())


def test_default_rule_is_stable_at_every_rank_with_ma_soba_steps():
    # The default (certified curvature) rule with MA-SOBA's step sizes at every rank.
    keys = jax.random.split(jax.random.key(0), NUM_KEYS)
    for rank in RANKS:
        xs, skipped = _quad20_final_x(keys, rank)
        _assert_error_falls(xs, skipped, rank)


@pytest.mark.parametrize("rank", [1, 16])
def test_worst_case_rule_follows_the_mean_field_iteration(rank):
    keys = jax.random.split(jax.random.key(0), NUM_KEYS)
    s = MA_SOBA_STEPS
    xs, skipped = _quad20_final_x(keys, rank, "worst_case")
    _assert_error_falls(xs, skipped, rank)
    xs = np.asarray(xs, np.float64)
    # The mean follows the mean-field iteration (see above).
    k = 1 + (bd.QUAD20.rows - 1) / rank
    mean_field = bd.QUAD20.ma_soba_by_hand(
        s["beta"] / k, s["gamma"] / k**2, s["theta"], s["alpha"] / k**2, SWEEP_STEPS
    )
    stderr = xs.std(axis=0, ddof=1) / np.sqrt(NUM_KEYS)
    scores = np.abs(xs.mean(axis=0) - mean_field) / stderr
    assert scores.max() < 4.5, (rank, scores)
    # ... which approaches x* (a property of the hand computation, checked so that the
    # Monte Carlo comparison above is not one of two motionless runs).
    x_star = bd.QUAD20.solution()[0]
    assert np.sum((mean_field - x_star) ** 2) < 0.8 * np.sum(x_star**2), rank


def test_without_the_rank_rule_the_same_steps_diverge():
    # The counterpart: unscaled, the lower step's mean-square factor at rank 1 is
    # 1 - 2 beta lambda + k beta^2 lambda^2 > 1 (k = 20, beta = 0.4, lambda >= 1).
    xs, skipped = _quad20_final_x(jax.random.split(jax.random.key(0), 2), 1, scaled="none")
    assert np.all(skipped > 0) or not np.all(np.abs(np.asarray(xs)) < 1e3)


ONE_STEP_DRAWS, ONE_STEP_RANK = 4000, 4


@jax.jit
def _one_step_squared_errors(keys, y, z):
    """||y'||^2 and ||z'||^2 after one BROS update from (x = 0, y, z), per key."""
    s = MA_SOBA_STEPS
    tx = bilevel.bros(bd.QUAD20.problem, ONE_STEP_RANK, s["beta"], s["gamma"], average=0.5)
    x = jnp.zeros(bd.QUAD_X)

    def one(key):
        state = tx.init(x)._replace(y=y, z=z, key=key)
        _, new = tx.update(x, state, x, inner_batch=None, outer_batch=None)
        # From zero statistics one update leaves [1, 1, n, n^2, d, d^2] (n, d / ||z||^2).
        return jnp.sum(new.y**2), jnp.sum(new.z**2), new.stats[2], new.stats[4]

    return jax.vmap(one)(keys)


def test_one_step_second_moments_follow_the_derivation():
    # The exact second moments of the bros docstring, on QUAD20 at x = 0 (so y* = 0 and
    # e = y) with y = C (so grad_y f = y - C = 0 and z* = 0, e = z), k = 1 + 19/4:
    #   E||y'||^2 = ||y||^2 - (1/k) sum_cols y^T (2 beta A - beta^2 A^2) y
    #   E||z'||^2 = ||z||^2 - 2 g sum_cols z^T A z + g^2 k sum_cols z^T X z,  g = gamma/k^2
    # with X = E[M A^2 M] = A^2 + (A^2 + tr(A^2) I - 2 diag(A^2)) / r. Float64 here,
    # compared with the Monte Carlo means in units of their standard errors.
    a = bd.QUAD20.a.astype(np.float64)
    y = bd.QUAD20.c.astype(np.float64)
    z = np.random.default_rng(4).standard_normal(y.shape)
    s, r = MA_SOBA_STEPS, ONE_STEP_RANK
    k = 1 + (bd.QUAD20.rows - 1) / r
    beta, g = s["beta"], s["gamma"] / k**2
    quad = lambda m, v: float(np.sum(v * (m @ v)))  # sum over columns of v^T m v
    want_y = np.sum(y**2) - quad(2 * beta * a - beta**2 * a @ a, y) / k
    a2 = a @ a
    x_mma = a2 + (a2 + np.trace(a2) * np.eye(len(a)) - 2 * np.diag(np.diag(a2))) / r
    want_z = np.sum(z**2) - 2 * g * quad(a, z) + g**2 * k * quad(x_mma, z)
    # The curvature samples of the default rule (bros docstring, "Certified inflation"):
    # E[n] = z^T E[M_Q A M_Q] z and E[d] = z^T A z, per column, over ||z||^2.
    x_ma = a + (a + np.trace(a) * np.eye(len(a)) - 2 * np.diag(np.diag(a))) / r
    want_n, want_d = quad(x_ma, z) / np.sum(z**2), quad(a, z) / np.sum(z**2)
    keys = jax.random.split(jax.random.key(1), ONE_STEP_DRAWS)
    ys, zs, ns, ds = (np.asarray(v, np.float64) for v in _one_step_squared_errors(keys, y, z))
    # Four scores: P(max > 4.5) <= 4 * 6.8e-6 under the CLT with 4000 draws.
    for samples, want in ((ys, want_y), (zs, want_z), (ns, want_n), (ds, want_d)):
        stderr = samples.std(ddof=1) / np.sqrt(ONE_STEP_DRAWS)
        assert abs(samples.mean() - want) < 4.5 * stderr, (samples.mean(), want, stderr)
    # Both contract, as the rule promises for steps at which MA-SOBA's do.
    assert want_y < np.sum(y**2) and want_z < np.sum(z**2)


# The certified inflation on curvature with known kappa: the inner loss
# 0.5 sum_c y_c^T A y_c with A passed as the inner batch (one compile for every A), the
# state reset to a fixed (y, z) before each update so that the samples are independent
# draws at one z, the statistics carried. For z = e_0 (x) 1 and A = diag(1, eps, ...),
# kappa_z = 1 + (tr(A) - 1) / r (the docstring's formula): far below k. For A = I,
# kappa_z = k for every z: nothing to certify.
CERT_ROWS, CERT_RANK, CERT_STEPS = 64, 4, 300
CERT_PROBLEM = bilevel.BilevelProblem(
    inner_loss=lambda x, y, a: 0.5 * jnp.sum(y * (a @ y)) - jnp.sum(y) * jnp.sum(x),
    outer_loss=lambda x, y, b: 0.5 * jnp.sum(y**2),
    inner_init=jnp.zeros((CERT_ROWS, 2)),
)


@jax.jit
def _certified_statistics(a, z):
    tx = bilevel.bros(CERT_PROBLEM, CERT_RANK, 0.1, 0.1, average=0.5, key=2)
    x = jnp.zeros(3)

    def step(state, _):
        state = state._replace(y=jnp.zeros_like(z), z=z)
        _, state = tx.update(x, state, x, inner_batch=a, outer_batch=None)
        return state, None

    state, _ = jax.lax.scan(step, tx.init(x), length=CERT_STEPS)
    return state.stats, certified_inflation(state.stats, _CERT_K)


_CERT_K = 1 + (CERT_ROWS - 1) / CERT_RANK


@pytest.mark.parametrize("isotropic", [False, True], ids=["anisotropic", "isotropic"])
def test_certified_inflation_brackets_the_true_one(isotropic):
    eps = 0.01
    a = np.eye(CERT_ROWS) if isotropic else np.diag([1.0] + [eps] * (CERT_ROWS - 1))
    z = np.zeros((CERT_ROWS, 2))
    z[0] = 1.0
    r, m = CERT_RANK, CERT_ROWS
    # E[n] and E[d] over ||z||^2 by hand (float64): z^T E[M A M] z and z^T A z.
    x_ma = a + (a + np.trace(a) * np.eye(m) - 2 * np.diag(np.diag(a))) / r
    want_n, want_d = np.sum(z * (x_ma @ z)) / 2, np.sum(z * (a @ z)) / 2
    true_kappa = want_n / want_d
    np.testing.assert_allclose(true_kappa, _CERT_K if isotropic else 1 + eps * (m - 1) / r)
    stats, kappa = _certified_statistics(jnp.asarray(a, jnp.float32), jnp.asarray(z, jnp.float32))
    total, total_sq, n1, n2, d1, d2 = np.asarray(stats, np.float64)
    # The statistics' own standard errors of the weighted means (independent draws,
    # effective sample size total^2 / total_sq, ~180 here).
    size = total**2 / total_sq
    se_n = np.sqrt(max(n2 / total - (n1 / total) ** 2, 0.0) / size)
    se_d = np.sqrt(max(d2 / total - (d1 / total) ** 2, 0.0) / size)
    # The rule's bound uses mean +- 2 standard errors; the means lie within 4.5 of the
    # truth (CLT, P > 1 - 2 * 6.8e-6), so the certified value lies between these two:
    low = (want_n - 2.5 * se_n) / (want_d + 2.5 * se_d)
    high = (want_n + 6.5 * se_n) / (want_d - 6.5 * se_d)
    kappa = float(kappa)
    assert min(low, _CERT_K) <= kappa <= min(high, _CERT_K), (low, kappa, high)
    if isotropic:
        # Nothing to save: the rule is (within its error) the worst-case one.
        assert kappa > 0.9 * _CERT_K, kappa
    else:
        # The saving is certified: kappa ~1.2 against k = 16.75.
        assert kappa < 0.25 * _CERT_K, kappa


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "2"])
def test_bad_rank_raises(rank):
    with pytest.raises(ValueError, match="rank"):
        bilevel.bros(bd.MLP, rank, 0.1, 0.1)


@pytest.mark.parametrize("resample_every", [0, -2, 1.5, None])
def test_bad_resample_every_raises(resample_every):
    with pytest.raises(ValueError, match="resample_every"):
        bilevel.bros(bd.MLP, 2, 0.1, 0.1, resample_every=resample_every)


@pytest.mark.parametrize("rule", ["isotropic", "", None, 1, 0])
def test_bad_rank_scaled_steps_raises(rule):
    with pytest.raises(ValueError, match="rank_scaled_steps must be one of 'curvature'"):
        bilevel.bros(bd.MLP, 2, 0.1, 0.1, rank_scaled_steps=rule)


def test_integral_float_rank_is_accepted():
    bilevel.bros(bd.MLP, 2.0, 0.2, 0.1)  # a whole number given as a float is fine
    bilevel.bros(bd.MLP, np.int64(2), 0.2, 0.1, resample_every=np.int32(3))


def test_resample_every_as_array_is_not_validated():
    tx = bilevel.bros(bd.MLP, 2, 0.2, 0.1, average=0.5, key=3, resample_every=jnp.int32(2))
    want = bilevel.bros(bd.MLP, 2, 0.2, 0.1, average=0.5, key=3, resample_every=2)
    cf.assert_trees_equal(_mlp_run(tx, steps=3), _mlp_run(want, steps=3))
