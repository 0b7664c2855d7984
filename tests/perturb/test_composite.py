"""optstab.perturb.composite: operators, losses, Lipschitz constants and where the
forward and backward perturbations of a Composite reach the block gradients."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core
from jax.flatten_util import ravel_pytree
from perturb_data import (
    U,
    assert_within,
    dense_chain,
    gamma,
    lipschitz_slack,
    logistic_loss_bound,
    power_deficit_bound,
)

from optstab import perturb

# Module-level data and parameters come from numpy or one jitted init: eager JAX calls
# compile every primitive separately, which dominates the runtime of these tiny tests.
X = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
Y = (X[:, 0] - X[:, 1] > 0).astype(jnp.int32)
ROOT = jax.random.key(42)

# A tanh MLP (N = 3), for construction and loss tests.
MLP = perturb.Composite(
    [perturb.dense(5, "tanh"), perturb.dense(3, "tanh"), perturb.logistic_head()],
    regularizer="l2",
    reg_strength=1e-2,
)
MLP_PARAMS = jax.jit(MLP.init, static_argnums=1)(jax.random.key(1), 4)

# Deep linear factors interleaved with tanh layers (N = 5), square of width 4, with
# random perturbations: relative forward, absolute backward (||xi|| = size exactly).
# Every injection test runs through the one compiled `gradient` of this model.
DEEP = perturb.Composite(
    [
        perturb.linear(1.3),
        perturb.dense(4, "tanh"),
        perturb.linear(0.8),
        perturb.dense(4, "tanh"),
        perturb.logistic_head(),
    ],
    regularizer="l2",
    reg_strength=1e-2,
    forward_mode="relative",
    backward_mode="absolute",
)
DEEP_PARAMS = jax.jit(DEEP.init, static_argnums=1)(jax.random.key(2), 4)


@functools.partial(jax.jit, static_argnums=0)
def gradient(model, params, forward, backward, root):
    """Clean and perturbed block gradients; ``forward``/``backward``: (N,) sizes."""
    keys = perturb.operator_keys(root, 0, model.num_operators)
    injection = model.make_injection(keys, forward, backward)
    return model.gradient(params, X, Y), model.gradient(params, X, Y, injection)


def deep_gradient(forward, backward, root=ROOT):
    return gradient(DEEP, DEEP_PARAMS, forward, backward, root)


jacobian_norms = jax.jit(perturb.jacobian_norms, static_argnums=(0, 3, 5))


@functools.cache
def deep_exact_norms() -> tuple[np.ndarray, np.ndarray]:
    """``(L, M)`` of DEEP at (DEEP_PARAMS, X), exact, as float64."""
    lip, m = jacobian_norms(DEEP, DEEP_PARAMS, X, "exact", None, 20)
    return np.asarray(lip, np.float64), np.asarray(m, np.float64)


def one_hot_sizes(model, k, size):
    return jnp.zeros((model.num_operators,), jnp.float32).at[k].set(size)


def zeros(model):
    return jnp.zeros((model.num_operators,), jnp.float32)


def assert_trees_bitwise_equal(a, b):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(u).view(np.uint32), np.asarray(v).view(np.uint32))


def differs(a, b) -> bool:
    return any(
        not np.array_equal(u, v)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ------------------------------------------------------------------ construction


def test_init_gives_one_block_per_operator_with_chained_shapes():
    shapes = jax.tree.map(jnp.shape, MLP_PARAMS)
    assert shapes == (
        {"w": (4, 5), "b": (5,)},
        {"w": (5, 3), "b": (3,)},
        {"w": (3, 1), "b": (1,)},
    )
    assert MLP.num_operators == 3
    np.testing.assert_array_equal(MLP_PARAMS[0]["b"], 0.0)
    no_bias = perturb.Composite([perturb.dense(2, use_bias=False)])
    assert jax.tree.map(jnp.shape, jax.eval_shape(lambda k: no_bias.init(k, 3), ROOT)) == (
        {"w": (3, 2)},
    )


GAINS = (0.5, 1.0, 1.5)


@functools.cache
def linear_factors() -> list[np.ndarray]:
    init = jax.jit(lambda k: [perturb.linear(g).init(k, 6)[0]["w"] for g in GAINS])
    return [np.asarray(w) for w in init(jax.random.key(3))]


@pytest.mark.parametrize("index", range(len(GAINS)))
def test_linear_factor_has_spectral_norm_gain(index):
    w = linear_factors()[index]
    assert w.shape == (6, 6)
    # The factor is gain * Q with Q from a float32 Householder QR, orthogonal to within
    # about n**2 U (Higham, Thm 19.4; n = 6), plus one rounding of the product: the
    # singular values (computed in float64) are within 4 n**2 U of the gain.
    sigma = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    np.testing.assert_allclose(sigma, GAINS[index], rtol=4 * 36 * U)


def np_forward(params, x, activations) -> list[np.ndarray]:
    """The composition by hand, in float64."""
    z, outs = np.asarray(x, np.float64), []
    for block, act in zip(params, activations, strict=True):
        z = z @ np.asarray(block["w"], np.float64) + np.asarray(block["b"], np.float64)
        z = act(z)
        outs.append(z)
    return outs


MLP_ACTS = (np.tanh, np.tanh, lambda z: z)
MLP_ACT_NAMES = ("tanh", "tanh", None)


def test_activations_compose_the_operators():
    outs = jax.jit(MLP.activations)(MLP_PARAMS, X)
    # Each float32 output within the running error bound of the chain (dense_chain).
    for got, (want, bound) in zip(outs, dense_chain(MLP_PARAMS, X, MLP_ACT_NAMES), strict=True):
        assert_within(got, want, bound)
    relu = perturb.Composite([perturb.dense(5, "relu")])
    out = np.asarray(jax.jit(relu.apply)(MLP_PARAMS[:1], X))
    ((want, bound),) = dense_chain(MLP_PARAMS[:1], X, ["relu"])
    assert_within(out, want, bound)
    assert out.min() == 0.0


def test_make_injection_broadcasts_sizes():
    inj = MLP.make_injection(perturb.operator_keys(ROOT, 0, 3), forward=0.5)
    np.testing.assert_array_equal(inj.forward, [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(inj.backward, [0.0, 0.0, 0.0])
    assert inj.forward.dtype == jnp.float32 and inj.keys.shape == (3, 2)


# ------------------------------------------------------------------ losses


def _bce(z, y):
    z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
    return np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z))))


@functools.partial(jax.jit, static_argnums=0)
def loss_and_reg(model, params, x, y):
    return model.loss(params, x, y), model.regularization(params)


@pytest.mark.parametrize("regularizer", [None, "l2", "nonconvex"])
def test_logistic_loss_and_regularisers_match_hand_formulas(regularizer):
    lam = 0.03
    model = perturb.Composite(MLP.operators, "logistic", regularizer, lam)
    params = jax.tree.map(lambda p: p + 0.5, MLP_PARAMS)  # non-zero biases too
    w = np.concatenate([np.ravel(p) for p in jax.tree.leaves(params)]).astype(np.float64)
    reg = {None: 0.0, "l2": lam * np.sum(w**2), "nonconvex": lam * np.sum(w**2 / (1 + w**2))}
    z = np_forward(params, X, MLP_ACTS)[-1][:, 0]
    loss, got_reg = loss_and_reg(model, params, X, Y)
    # The regulariser: a float32 sum of P terms of up to 4 roundings each.
    reg_bound = gamma(w.size + 4) * reg[regularizer]
    assert_within(got_reg, reg[regularizer], reg_bound)
    bound = logistic_loss_bound(params, X, MLP_ACT_NAMES, reg[regularizer])
    bound += U * abs(float(loss))  # the sum of the data loss and R
    assert_within(loss, _bce(z, Y) + reg[regularizer], bound)


def test_softmax_loss_matches_hand_formula():
    model = perturb.Composite([perturb.dense(5, "tanh"), perturb.dense(3)], loss="softmax")
    params = MLP_PARAMS[:2]
    labels = jnp.arange(8) % 3
    z = np_forward(params, X, (np.tanh, lambda z: z))[-1]
    log_p = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    want = -np.mean(log_p[np.arange(8), np.asarray(labels)])
    # Softmax cross-entropy moves by at most 2 max|dz| per example (its gradient in z
    # has l1 norm <= 2); log-sum-exp of 3 logits and the mean of 8 add a few roundings of
    # terms <= max|z| + log 3.
    z_err = dense_chain(params, X, ("tanh", None))[-1][1]
    scale = np.abs(z).max() + np.log(3.0)
    bound = 2 * z_err.max() + (8 * U + gamma(8)) * scale
    assert_within(loss_and_reg(model, params, X, labels)[0], want, bound)


# ------------------------------------------------------------------ Lipschitz constants


def test_exact_lipschitz_of_linear_factors_is_the_gain_and_m_is_the_input_norm():
    lip, m = deep_exact_norms()
    # float32 error: the factor gain * Q is orthogonal to about n**2 U (n = 4; see
    # test_linear_factor_has_spectral_norm_gain) and the float32 SVD of the 32 x 32
    # Jacobian I (x) W^T is backward stable, within about 4 n U ||J|| (n = 32).
    svd_rtol = 4 * 32 * U
    np.testing.assert_allclose(lip[[0, 2]], [1.3, 0.8], rtol=4 * 16 * U + svd_rtol)
    # The head is a dense map without activation: L is the norm of its weight column.
    head = np.linalg.norm(np.asarray(DEEP_PARAMS[4]["w"], np.float64))
    np.testing.assert_allclose(lip[4], head, rtol=svd_rtol)
    # d(z W)/dW over the batch is I (x) z: its norm is the spectral norm of the input z.
    inputs = [X, *DEEP.activations(DEEP_PARAMS, X)[:-1]]
    want = [np.linalg.norm(np.asarray(inputs[i], np.float64), 2) for i in (0, 2)]
    np.testing.assert_allclose(m[[0, 2]], want, rtol=svd_rtol)
    # tanh contracts: its layers' L is below the spectral norm of their weights.
    for i in (1, 3):
        assert 0 < lip[i] < np.linalg.norm(np.asarray(DEEP_PARAMS[i]["w"]), 2)


@jax.jit
def deep_jacobians():
    """The exact Jacobians (wrt input, wrt block) of DEEP's operators at (DEEP_PARAMS, X)."""
    inputs = [X, *DEEP.activations(DEEP_PARAMS, X)[:-1]]
    out = []
    for i, op in enumerate(DEEP.operators):
        for fn, primal in (
            (lambda z, i=i, op=op: op.apply(DEEP_PARAMS[i], z), inputs[i]),
            (lambda w, i=i, op=op: op.apply(w, inputs[i]), DEEP_PARAMS[i]),
        ):
            flat, unravel = ravel_pytree(primal)
            out.append(jax.jacfwd(lambda v, fn=fn, u=unravel: fn(u(v)).ravel())(flat))
    return out


def test_power_iteration_agrees_with_the_exact_norms():
    iters = 1000
    lip, m = deep_exact_norms()
    power = jacobian_norms(DEEP, DEEP_PARAMS, X, "power", jax.random.key(7), iters)
    exact = np.stack([lip, m], axis=1).ravel()
    estimate = np.stack([np.asarray(power[0]), np.asarray(power[1])], axis=1).ravel()
    svd_rtol = 4 * 32 * U  # the "exact" norms are float32 SVDs (see above)
    for jac, est, want in zip(map(np.asarray, deep_jacobians()), estimate, exact, strict=True):
        floor = 64 * jac.shape[1] * U  # the float32 rounding of the iteration
        assert est <= want * (1 + floor + svd_rtol)  # power iteration estimates from below
        assert est >= want * (1 - power_deficit_bound(jac, iters) - svd_rtol), (est, want)


# ------------------------------------------------------------------ where perturbations reach


def assert_leaves_all_differ(a, b, context):
    """Every leaf (weights and biases) of block ``a`` differs from that of ``b``."""
    for (path, u), v in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        # Size-0.3 noise moves each leaf by O(1e-2) or more, far beyond allclose's 1e-5.
        assert not np.allclose(u, v), (context, jax.tree_util.keystr(path))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_backward_noise_at_operator_k_changes_exactly_blocks_up_to_k(k):
    clean, noisy = deep_gradient(zeros(DEEP), one_hot_sizes(DEEP, k, 0.3))
    for j in range(DEEP.num_operators):
        if j > k:
            assert_trees_bitwise_equal(noisy[j], clean[j])
        else:
            assert_leaves_all_differ(noisy[j], clean[j], (k, j))


@pytest.mark.parametrize("m", [0, 2, 4])
def test_forward_noise_at_operator_m_changes_every_block(m):
    clean, noisy = deep_gradient(one_hot_sizes(DEEP, m, 0.3), zeros(DEEP))
    for j in range(DEEP.num_operators):
        assert_leaves_all_differ(noisy[j], clean[j], (m, j))


def test_zero_sizes_give_the_clean_gradient_bit_for_bit():
    clean, noisy = deep_gradient(zeros(DEEP), zeros(DEEP))
    assert_trees_bitwise_equal(noisy, clean)


def test_noise_depends_on_the_key():
    sizes = jnp.full((5,), 0.1, jnp.float32)
    _, a = deep_gradient(sizes, sizes, jax.random.key(1))
    _, b = deep_gradient(sizes, sizes, jax.random.key(1))
    _, c = deep_gradient(sizes, sizes, jax.random.key(2))
    assert gradient._cache_size() == 1
    assert_trees_bitwise_equal(a, b)
    assert differs(a, c)


def test_forward_perturbation_of_the_loss_value_changes_no_gradient():
    def perturbed_loss(params):
        return perturb.forward(MLP.loss(params, X, Y), ROOT, 0.5, "relative")

    both = jax.jit(
        lambda p: (jax.value_and_grad(perturbed_loss)(p), jax.value_and_grad(MLP.loss)(p, X, Y))
    )
    (value, grads), (clean_value, clean) = both(MLP_PARAMS)
    # |delta| = 0.5 |loss| for a scalar (relative mode), up to noise_norm_rtol(1, ...):
    # a few roundings and one of loss + delta, relative to 0.5 |loss|.
    np.testing.assert_allclose(
        abs(float(value) - float(clean_value)), 0.5 * float(clean_value), rtol=16 * U + 3 * U
    )
    assert_trees_bitwise_equal(grads, clean)


@pytest.mark.parametrize("k", [0, 2, 4])
def test_backward_error_obeys_the_lipschitz_bound(k):
    size = 0.7  # absolute mode: ||xi|| = size
    lip, m = deep_exact_norms()
    clean, noisy = deep_gradient(zeros(DEEP), one_hot_sizes(DEEP, k, size))
    errors = np.asarray(perturb.block_errors(noisy, clean), np.float64)
    for j in range(k + 1):
        bound = m[j] * np.prod(lip[j + 1 : k + 1]) * size
        slack = lipschitz_slack(batch=8, entries=40, svds=5, svd_size=32)
        assert 0.0 < errors[j] <= bound * (1 + slack), (j, errors[j], bound)
    np.testing.assert_array_equal(errors[k + 1 :], 0.0)


def test_gradient_error_is_linear_in_small_forward_sizes():
    sizes = np.array([1e-4, 1e-3, 1e-2])
    errors = []
    for s in sizes:
        clean, noisy = deep_gradient(jnp.full((5,), s, jnp.float32), zeros(DEEP))
        errors.append(float(jnp.linalg.norm(perturb.block_errors(noisy, clean))))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    # A criterion, as in test_statements' statement 3: +-0.1 in the log-log slope.
    assert 0.9 <= slope <= 1.1, (slope, errors)


def test_block_norms_and_errors():
    a = ({"w": jnp.array([3.0, 4.0])}, {"w": jnp.ones((2, 2)), "b": jnp.zeros(1)}, {})
    b = jax.tree.map(jnp.zeros_like, a)
    # sqrt(25) and sqrt(4): exact in float32.
    np.testing.assert_array_equal(perturb.block_norms(a), [5.0, 2.0, 0.0])
    np.testing.assert_array_equal(perturb.block_errors(a, b), [5.0, 2.0, 0.0])


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: perturb.Composite([]), "operators"),
        (lambda: perturb.Composite([perturb.logistic_head()], loss="mse"), "loss"),
        (lambda: perturb.Composite([perturb.logistic_head()], regularizer="l1"), "regularizer"),
        (lambda: perturb.Composite([perturb.logistic_head()], reg_strength=-1.0), "reg_strength"),
        (lambda: perturb.Composite([perturb.logistic_head()], forward_mode="x"), "mode"),
        (lambda: perturb.Composite([perturb.logistic_head()], backward_mode="x"), "mode"),
        (lambda: perturb.Composite([perturb.logistic_head()], fmt="float16"), "fmt"),
        (lambda: perturb.Composite([perturb.logistic_head()], rounding="up"), "rounding"),
        (lambda: perturb.linear(0.0), "gain"),
        (lambda: perturb.dense(3, "gelu"), "activation"),
        (lambda: perturb.jacobian_norms(MLP, MLP_PARAMS, X, method="svd"), "method"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make, name):
    with pytest.raises(ValueError, match=name):
        make()


# ------------------------------------------------------------------ idle points


def primitives(jaxpr, counts=None) -> collections.Counter:
    """Every primitive of a jaxpr and of the jaxprs nested in it (cond branches, jit...)."""
    counts = collections.Counter() if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                if isinstance(sub, jex_core.ClosedJaxpr):
                    primitives(sub.jaxpr, counts)
                elif isinstance(sub, jex_core.Jaxpr):
                    primitives(sub, counts)
    return counts


def gradient_primitives(model, params, injection) -> collections.Counter:
    return primitives(jax.make_jaxpr(model.gradient)(params, X, Y, injection).jaxpr)


RANDOM = ("random_bits", "random_wrap", "random_split", "random_fold_in", "threefry2x32")


def test_points_that_are_not_built_add_no_operation():
    keys = perturb.operator_keys(ROOT, 0, DEEP.num_operators)
    n = DEEP.num_operators
    none_built = DEEP.make_injection(keys, 0.3, 0.3, perturb.Points((False,) * n, (False,) * n))
    clean = gradient_primitives(DEEP, DEEP_PARAMS, None)
    assert gradient_primitives(DEEP, DEEP_PARAMS, none_built) == clean
    assert clean["cond"] == 0 and not any(clean[p] for p in RANDOM)
    # One built point (backward at operator 2): one cond; its noise and its select are
    # the only additions; the other 2N - 1 points add nothing.
    one = perturb.Points((False,) * n, (False, False, True, False, False))
    with_one = gradient_primitives(DEEP, DEEP_PARAMS, DEEP.make_injection(keys, 0.3, 0.3, one))
    assert with_one["cond"] == 1 and with_one["random_bits"] == 1
    every = gradient_primitives(DEEP, DEEP_PARAMS, DEEP.make_injection(keys, 0.3, 0.3))
    assert every["cond"] == 2 * n and every["random_bits"] == 2 * n


@pytest.mark.parametrize("k", [0, 4])
def test_a_named_point_gives_the_same_bits_with_or_without_idle_points_built(k):
    """Building the other 2N - 1 points at size 0 (exact identities) changes no bit."""
    keys = perturb.operator_keys(ROOT, 3, DEEP.num_operators)
    n = DEEP.num_operators
    only_k = perturb.Points((False,) * n, tuple(i == k for i in range(n)))
    sizes = one_hot_sizes(DEEP, k, 0.3)

    @jax.jit
    def both(params):
        all_built = DEEP.make_injection(keys, zeros(DEEP), sizes)
        one_built = DEEP.make_injection(keys, zeros(DEEP), sizes, only_k)
        return DEEP.gradient(params, X, Y, all_built), DEEP.gradient(params, X, Y, one_built)

    all_built, one_built = both(DEEP_PARAMS)
    assert_trees_bitwise_equal(one_built, all_built)
    assert differs(one_built, deep_gradient(zeros(DEEP), zeros(DEEP))[0])


def test_points_must_cover_every_operator():
    keys = perturb.operator_keys(ROOT, 0, 3)
    with pytest.raises(ValueError, match="points must name 3 operators"):
        MLP.make_injection(keys, points=perturb.Points((True,), (True,) * 3))
