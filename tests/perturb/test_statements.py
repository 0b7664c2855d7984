"""The study statements of the perturbed forward-backward SGD lab, one test each, on
tiny problems (the full study is benchmarks/studies/perturbed_sgd/).

1. A backward perturbation at operator k changes only the gradients of blocks 1..k,
   each by at most M_j * prod_{i=j+1..k} L_i * ||xi||.
2. A forward perturbation changes every block's gradient, and when every L_i > 1 the
   gradient error grows with the perturbed operator's distance to the output. Checked
   over the hidden outputs z_1..z_{N-1}: a random perturbation of the logits z_N is not
   amplified by the head, whose L (1.5 here) is that of a rank-1 map that a random
   direction in R^4 only sees ~1/2 of (measured: ~equal errors at z_{N-1} and z_N).
3. For small sizes the gradient error is linear in the perturbation size.
4. The forward/backward sensitivity ratio of each layer is finite, positive and
   deterministic for a fixed key.
5. Convex L2 logistic regression, SGD with lr ~ 1/t: a constant forward bias at the
   output leaves an excess loss ~ size^2; a size decaying as 1/sqrt(t) keeps the
   clean convergence rate.
6. The recovery time after a one-off spike of size S is linear in log S.
7. A persistent backward bias: SGD converges when the relative gradient error is
   well below 1 and stalls or diverges when it is >= 1.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from perturb_data import U, gamma, lipschitz_slack, logistic_data, tanh_logistic_abs_gradient

from optstab import perturb

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.standard_normal((8, 4)), jnp.float32)
Y = (X[:, 0] - X[:, 1] > 0).astype(jnp.int32)

# Deep linear factors and tanh layers; relative forward and absolute backward sizes.
MIXED = perturb.Composite(
    [
        perturb.linear(1.2),
        perturb.dense(4, "tanh"),
        perturb.linear(0.9),
        perturb.dense(4, "tanh"),
        perturb.logistic_head(),
    ],
    regularizer="l2",
    reg_strength=1e-2,
    forward_mode="relative",
    backward_mode="absolute",
)
MIXED_PARAMS = jax.jit(MIXED.init, static_argnums=1)(jax.random.key(1), 4)


def expanding_model():
    """Four linear factors of gain 1.5 and a head rescaled to norm 1.5: every L_i = 1.5."""
    model = perturb.Composite(
        [perturb.linear(1.5)] * 4 + [perturb.logistic_head()],
        forward_mode="absolute",
        backward_mode="absolute",
    )
    params = jax.jit(model.init, static_argnums=1)(jax.random.key(2), 4)
    head = params[-1]
    head = {"w": 1.5 * head["w"] / jnp.linalg.norm(head["w"]), "b": head["b"]}
    return model, (*params[:-1], head)


EXPANDING, EXPANDING_PARAMS = expanding_model()


@functools.partial(jax.jit, static_argnums=0)
def block_errors(model, params, forward, backward, key):
    """``||g_hat_j - g_j||`` per block for (N,) forward and backward sizes (None: 0)."""
    injection = model.make_injection(
        perturb.operator_keys(key, 0, model.num_operators), forward, backward
    )
    clean = model.gradient(params, X, Y)
    return perturb.block_errors(model.gradient(params, X, Y, injection), clean)


jacobian_norms = jax.jit(perturb.jacobian_norms, static_argnums=0)


def at(k, size, n=5):
    return jnp.zeros((n,), jnp.float32).at[k].set(size)


NONE = jnp.zeros((5,), jnp.float32)
KEY = jax.random.key(3)


# ------------------------------------------------------------------ 1-4: one gradient


def test_statement_1_backward_noise_is_local_and_bounded():
    lip, m = (np.asarray(a, np.float64) for a in jacobian_norms(MIXED, MIXED_PARAMS, X))
    size = 0.5
    for k in range(MIXED.num_operators):
        errors = np.asarray(block_errors(MIXED, MIXED_PARAMS, NONE, at(k, size), KEY), np.float64)
        np.testing.assert_array_equal(errors[k + 1 :], 0.0)
        for j in range(k + 1):
            bound = m[j] * np.prod(lip[j + 1 : k + 1]) * size
            slack = lipschitz_slack(batch=8, entries=40, svds=5, svd_size=32)
            assert 0.0 < errors[j] <= bound * (1 + slack), (k, j, errors[j], bound)


def test_statement_2_forward_noise_reaches_every_block_and_grows_with_depth():
    lip, _ = jacobian_norms(EXPANDING, EXPANDING_PARAMS, X)
    # Every L_i > 1: 1.5 up to the factors' orthogonality (4 n**2 U, n = 4) and the
    # float32 SVD of the 32 x 32 Jacobian (4 * 32 U); see test_composite.
    np.testing.assert_allclose(lip, 1.5, rtol=4 * 16 * U + 4 * 32 * U)
    keys = jax.random.split(jax.random.key(4), 16)
    # backward=None: no backward perturbation is even compiled.
    errors = jax.vmap(  # (operator m, key, block j)
        lambda m: jax.vmap(lambda k: block_errors(EXPANDING, EXPANDING_PARAMS, m, None, k))(keys)
    )(0.1 * jnp.eye(5))
    errors = np.asarray(errors, np.float64)
    assert np.all(errors > 0), "a forward perturbation must change every block"
    # Mean total error over the keys, by perturbed operator: the further from the output,
    # the larger (over the hidden outputs; see the module docstring for the logits).
    total = np.linalg.norm(errors, axis=2).mean(axis=1)
    hidden = total[:-1]
    assert np.all(np.diff(hidden) < 0), total
    # A criterion of the claim, not a rounding tolerance: from z_1 to z_4 the noise
    # crosses 3 more operators of L = 1.5, a growth of up to 1.5**3 = 3.4; most of it.
    assert hidden[0] > 3.0 * hidden[-1], total


def test_statement_3_gradient_error_is_linear_in_small_sizes():
    sizes = np.array([1e-4, 1e-3, 1e-2])
    for direction in ("forward", "backward"):
        totals = []
        for s in sizes:
            sizes_n = jnp.full((5,), s, jnp.float32)
            fwd, bwd = (sizes_n, NONE) if direction == "forward" else (NONE, sizes_n)
            totals.append(float(np.linalg.norm(block_errors(MIXED, MIXED_PARAMS, fwd, bwd, KEY))))
        slope = np.polyfit(np.log(sizes), np.log(totals), 1)[0]
        # A criterion: error = a s (1 + O(s)); over 1e-4..1e-2 a relative second-order
        # term r at the top moves the log-log slope by about r / ln(100); +-0.1 allows r
        # up to ~40%. Float32 rounding (~1e-6 of the gradient) is 1% of the smallest
        # error, a slope change below 0.01.
        assert 0.9 <= slope <= 1.1, (direction, slope, totals)


def test_statement_4_forward_backward_sensitivity_ratio_is_finite_positive_deterministic():
    eps = 1e-3

    def ratios(key):
        """Per operator: gradient error of a forward over that of a backward perturbation."""
        out = []
        for i in range(MIXED.num_operators):
            fwd = np.linalg.norm(block_errors(MIXED, MIXED_PARAMS, at(i, eps), NONE, key))
            bwd = np.linalg.norm(block_errors(MIXED, MIXED_PARAMS, NONE, at(i, eps), key))
            out.append(fwd / bwd)
        return np.array(out)

    first = ratios(KEY)
    assert np.all(np.isfinite(first)) and np.all(first > 0), first
    np.testing.assert_array_equal(ratios(KEY), first)
    assert not np.array_equal(ratios(jax.random.key(9)), first)


# ------------------------------------------------------------------ 5-7: SGD runs


LX, LY = logistic_data()


def convex_logistic(reg, forward_mode="bias", backward_mode="bias"):
    model = perturb.Composite(
        [perturb.logistic_head()], regularizer="l2", reg_strength=reg,
        forward_mode=forward_mode, backward_mode=backward_mode,
    )  # fmt: skip
    return model, jax.jit(model.init, static_argnums=1)(jax.random.key(1), 3)


def loglog_slope(x, y) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def test_statement_5_constant_bias_plateaus_at_size_squared_decaying_keeps_the_rate():
    model, params = convex_logistic(0.05)
    steps, sizes = 1000, np.array([0.05, 0.1, 0.2, 0.4])

    @jax.jit
    def optimum_loss():
        step = lambda _, p: jax.tree.map(lambda w, g: w - g, p, model.gradient(p, LX, LY))
        return model.loss(jax.lax.fori_loop(0, 2000, step, params), LX, LY)

    def run(size, decay, data_key):
        schedule = lambda t: jnp.where(
            decay, perturb.inverse_sqrt(size)(t), perturb.constant(size)(t)
        )
        return perturb.run_sgd(
            model, params, LX, LY, num_steps=steps, learning_rate=lambda t: 10.0 / (t + 10.0),
            perturbation=perturb.Perturbation(forward={-1: schedule}), batch_size=8,
            eval_data=(LX, LY), data_key=data_key,
        )  # fmt: skip

    # (decay, size, SGD seed); the excess losses are averaged over 8 SGD seeds.
    runs = jax.jit(
        jax.vmap(jax.vmap(jax.vmap(run, (None, None, 0)), (0, None, None)), (None, 0, None))
    )
    trace = runs(jnp.asarray(sizes, jnp.float32), jnp.array([False, True]), jnp.arange(8)).trace
    best = float(optimum_loss())
    excess = np.asarray(trace.loss, np.float64).mean(axis=2) - best  # (decay, size, step)
    clean = np.asarray(trace.loss_clean, np.float64).mean(axis=2)[0, 0] - best
    assert np.all(excess > 0) and np.all(clean > 0)
    # Constant size: the plateau (last quarter) above the clean run grows like size^2.
    plateau = excess[0, :, -steps // 4 :].mean(axis=1) - clean[-steps // 4 :].mean()
    exponent = loglog_slope(sizes, plateau)
    # Criteria of the claim (plateau ~ size^2; rate kept), not rounding tolerances: the
    # excess losses are means over 8 SGD seeds, whose noise the +-0.5 / 0.3 allow for.
    assert 1.5 <= exponent <= 2.5, (exponent, plateau)
    # Decaying size: the excess loss keeps the clean run's log-log slope in t.
    t = np.unique(np.geomspace(steps // 10, steps - 1, 20).astype(int))
    clean_slope = loglog_slope(t + 1, clean[t])
    assert clean_slope < -0.5, clean_slope  # the clean run converges at a rate
    for i, size in enumerate(sizes):
        slope = loglog_slope(t + 1, excess[1, i, t])
        assert abs(slope - clean_slope) <= 0.3, (size, slope, clean_slope)


def test_statement_6_recovery_time_is_linear_in_log_spike_size():
    model, params = convex_logistic(0.2, backward_mode="relative")
    sizes = np.array([1e1, 3e1, 1e2, 3e2, 1e3, 3e3, 1e4])

    def run(size):
        spike = perturb.Perturbation(backward={-1: perturb.spike(t0=50, size=size)})
        return perturb.run_sgd(
            model, params, LX, LY, num_steps=300, learning_rate=0.5, perturbation=spike,
            t0=50, horizon=240,
        )  # fmt: skip

    result = jax.jit(jax.vmap(run))(jnp.asarray(sizes, jnp.float32))
    np.testing.assert_array_equal(result.outcome, perturb.RECOVERED)
    times = np.asarray(result.recovery_time, np.float64)
    slope, intercept = np.polyfit(np.log(sizes), times, 1)
    residual = times - (slope * np.log(sizes) + intercept)
    r2 = 1.0 - np.sum(residual**2) / np.sum((times - times.mean()) ** 2)
    # A criterion: integer recovery times over 7 sizes are linear in log S up to the
    # rounding of each time to a step (R^2 > 0.9 leaves room for that quantisation).
    assert slope > 0 and r2 > 0.9, (times, slope, r2)


def bias_rounding_bound(trace, sizes) -> np.ndarray:
    """``(sizes, steps)`` bound on ``|relative_grad_error / size - 1|`` in statement 7.

    The model is ``dense(4, tanh)`` then a logistic head on LX, LY (n = 64 examples,
    no regulariser), the bias ``size`` at the output cotangent ``c``. Both gradients of
    a step run the same forward operations on the same inputs (XLA merges them), so
    only the backward pass differs: ``g = B(c)`` and ``g_hat = B(c')`` with
    ``c' = fl(c - fl(size * c))``, and ``B`` is linear. With ``u = U = 2**-24``:

    * ``|c' - (1 - size) c| <= 2u |c|``;
    * each gradient element is a sum over the n examples of products of at most 8
      rounded factors, so ``|fl(B(a)) - B(a)| <= gamma(m) |B|(|a|)``, ``m = n + 8``;
      then ``fl(g_hat - g)`` adds one rounding, the norms a few (``8u``).

    Hence ``|fl(g_hat - g) + size g| <= (2u + (2 + size) gamma(m)) A`` with
    ``A = || |B|(|c|) ||`` (bounded from the trace: ``tanh_logistic_abs_gradient``),
    divided by ``size ||g||``, ``||g|| = grad_norm / |1 - size|``. At size 1, ``c' = 0``
    exactly, so ``g_hat = 0`` and the ratio is 1 up to the two norms' rounding (21
    squares each): ``64u``.
    """
    a = tanh_logistic_abs_gradient(trace, LX, hidden=4)
    s = np.asarray(sizes, np.float64)[:, None]
    exact = s == 1
    g = trace.grad_norm / np.where(exact, 1.0, np.abs(1 - s))
    m = LX.shape[0] + 8
    bound = (2 * U + (2 + s) * gamma(m)) * a / (s * np.where(exact, 1.0, g)) + 8 * U
    return np.where(exact, 64 * U, bound)


def test_statement_7_persistent_backward_bias_converges_only_below_one():
    # No regulariser: a bias at the output cotangent scales every block's gradient by
    # (1 - size), so the relative gradient error is exactly the size.
    model = perturb.Composite(
        [perturb.dense(4, "tanh"), perturb.logistic_head()],
        forward_mode="bias",
        backward_mode="bias",
    )
    params = jax.jit(model.init, static_argnums=1)(jax.random.key(1), 3)
    sizes = np.array([0.01, 0.1, 1.0, 2.0], np.float32)

    def run(size):
        bias = perturb.Perturbation(backward={-1: size})
        return perturb.run_sgd(
            model, params, LX, LY, num_steps=1000, learning_rate=0.5, perturbation=bias
        )

    result = jax.jit(jax.vmap(run))(jnp.asarray(sizes))
    trace = jax.tree.map(lambda v: np.asarray(v, np.float64), result.trace)
    relative = trace.relative_grad_error / sizes[:, None]
    np.testing.assert_array_less(np.abs(relative - 1), bias_rounding_bound(trace, sizes))
    loss = np.asarray(result.trace.loss)
    clean_final = float(result.trace.loss_clean[0, -1])
    assert clean_final < 0.5 * loss[0, 0]  # the clean run learns
    # Error << 1: converges with the clean run.
    for i in (0, 1):
        assert int(result.outcome[i]) == perturb.RECOVERED, (sizes[i], loss[i, -1], clean_final)
    # Error 1: no descent at all. Error 2: ascent, the run diverges.
    np.testing.assert_array_equal(loss[2], loss[2, 0])
    assert int(result.outcome[2]) == perturb.LINGERING
    assert int(result.outcome[3]) == perturb.DIVERGED and loss[3, -1] > 10 * loss[3, 0]
