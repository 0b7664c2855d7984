"""optstab.bilevel.subspace: Rademacher probes, the bi-probe estimator and factored
evaluation of losses with projected leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jex

from optstab import bilevel
from optstab.bilevel import subspace

# ----------------------------------------------------------------------------- probes


def test_probes_cover_exactly_the_2d_leaves_with_more_rows_than_the_rank():
    y = {
        "tall": jnp.zeros((7, 4)),
        "square_at_rank": jnp.zeros((3, 5)),  # rows == rank: kept in full space
        "narrow": jnp.zeros((9, 3)),  # few columns: projected all the same
        "bias": jnp.zeros(9),
        "cube": jnp.zeros((8, 2, 2)),
        "pair": (jnp.zeros((4, 5)), jnp.zeros(())),
    }
    probes = subspace.draw_probes(jax.random.key(0), y, rank=3)
    for side in (probes.left, probes.right):
        assert side["square_at_rank"] is None and side["bias"] is None
        assert side["narrow"].shape == (9, 3)
        assert side["cube"] is None and side["pair"][1] is None
        assert side["tall"].shape == (7, 3) and side["pair"][0].shape == (4, 3)
        for p in (side["tall"], side["pair"][0]):
            assert p.dtype == jnp.float32
            np.testing.assert_array_equal(np.abs(np.asarray(p)), 1.0 / np.sqrt(np.float32(3)))
    # P and Q are different draws, and different leaves get different probes.
    assert not np.array_equal(probes.left["tall"], probes.right["tall"])
    assert not np.array_equal(probes.left["tall"][:4], probes.left["pair"][0])
    # Coordinates: r x n for projected leaves, the leaf's own shape otherwise.
    zeros = subspace.zero_coordinates(probes.left, y)
    assert zeros["tall"].shape == (3, 4) and zeros["square_at_rank"].shape == (3, 5)
    assert zeros["cube"].shape == (8, 2, 2) and zeros["bias"].dtype == jnp.float32


def test_restrict_and_lift_are_adjoint_projections():
    y = {"w": jnp.zeros((6, 3)), "b": jnp.zeros(2)}
    rng = np.random.default_rng(0)
    t = {"w": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32), "b": jnp.ones(2)}
    probes = subspace.draw_probes(jax.random.key(1), y, rank=2)
    p = np.asarray(probes.left["w"], np.float64)
    coords = subspace.restrict(probes.left, t)
    # float32 sums of 6 products of size <= 3 / sqrt(2) = 2.1 (|t| <= ~3), against
    # float64 on the same (float32) probes: <= 6 * 2^-24 * (6 * 2.1) = 4.6e-6 per entry
    # at worst, hence atol 5e-6; P P^T t chains two such sums (atol 1e-5).
    np.testing.assert_allclose(coords["w"], p.T @ np.asarray(t["w"]), rtol=1e-6, atol=5e-6)
    np.testing.assert_array_equal(coords["b"], t["b"])  # full-space leaf: unchanged
    lifted = subspace.lift(probes.left, coords)
    np.testing.assert_allclose(lifted["w"], p @ p.T @ np.asarray(t["w"]), rtol=1e-5, atol=1e-5)
    # lift_descend: t - 0.5 P B by rank-one updates (2 roundings per entry) against the
    # float32 lift above (one product of 2 terms): a few 2^-24 of |t| + |P B| (~5).
    stepped = subspace.lift_descend(probes.left, t, coords, jnp.float32(0.5))
    np.testing.assert_allclose(stepped["w"], t["w"] - 0.5 * lifted["w"], rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(stepped["b"], 0.5 * np.ones(2))


def test_low_rank_descent_runs_in_place_and_matches_the_product():
    m, n, r = 256, 128, 8
    rng = np.random.default_rng(2)
    t = rng.standard_normal((m, n)).astype(np.float32)
    p = np.asarray(subspace.rademacher(jax.random.key(5), m, r))
    b = rng.standard_normal((r, n)).astype(np.float32)
    update = jax.jit(
        lambda t_, p_, b_: subspace.subtract_low_rank(t_, p_, b_, 0.3), donate_argnums=0
    )
    got = update(jnp.asarray(t), p, b)
    want = t.astype(np.float64) - 0.3 * p.astype(np.float64) @ b
    # r float32 rank-one updates, each rounding once (<= eps/2 of |t| + |0.3 p_k b_k|):
    # |error| <= r * eps * (|t| + 0.3 |b| / sqrt(r)) ~ 8 * 1.2e-7 * 4 = 4e-6.
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-6 * np.abs(want).max())
    # In place: XLA needs no m x n temporary (a matrix product P @ B would need one).
    stats = update.lower(jnp.asarray(t), p, b).compile().memory_analysis()
    assert stats.temp_size_in_bytes < m * n * 4 // 4, stats.temp_size_in_bytes
    assert stats.alias_size_in_bytes == m * n * 4


# ------------------------------------------------------------- estimator statistics
#
# Every check below compares a Monte Carlo mean over NUM_DRAWS probe draws with its
# expectation, entry by entry, in units of the entry's standard error. The draws are
# fixed keys, so the test is deterministic; the bound is chosen so that a correct
# implementation would also pass for almost any other keys: for ~100 entries that are
# (by the CLT, 2000 draws) standard normal, P(max |score| > 4.5) <= 100 * 6.8e-6
# = 7e-4 (union bound). A wrong expectation of size ~1/r shifts scores by > 50 here.

NUM_DRAWS, ROWS, COLS, RANK = 2000, 10, 10, 3
MAX_SCORE = 4.5


def _estimator_setup():
    rng = np.random.default_rng(3)
    u = rng.standard_normal((ROWS, ROWS))
    h = (u @ u.T / ROWS + np.eye(ROWS)).astype(np.float32)  # SPD, distinct diagonal
    z = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    return h, z


@jax.jit
def _probe_samples(keys, h, z):
    y = {"w": jnp.zeros((ROWS, COLS))}

    def one(key):
        probes = subspace.draw_probes(key, y, RANK)
        p, q = probes.left["w"], probes.right["w"]
        bi = p @ (p.T @ (h @ (q @ (q.T @ z))))
        single = p @ (p.T @ (h @ (p @ (p.T @ z))))
        return bi, single, p @ p.T

    return jax.vmap(one)(keys)


@pytest.fixture(scope="module")
def estimator_samples():
    h, z = _estimator_setup()
    keys = jax.random.split(jax.random.key(42), NUM_DRAWS)
    bi, single, ppt = (np.asarray(a, np.float64) for a in _probe_samples(keys, h, z))
    return h.astype(np.float64), z.astype(np.float64), bi, single, ppt


def _scores(samples, expected):
    mean = samples.mean(axis=0)
    stderr = samples.std(axis=0, ddof=1) / np.sqrt(len(samples))
    return np.abs(mean - expected) / np.maximum(stderr, 1e-30)


def test_probe_outer_product_has_identity_mean(estimator_samples):
    *_, ppt = estimator_samples
    # The diagonal of P P^T is exactly sum_k (1/sqrt r)^2 = 1 for Rademacher probes; in
    # float32, 1/sqrt(3) is rounded and 3 squares summed: within 3 * 2^-24 = 2e-7.
    diagonal = ppt[:, np.arange(ROWS), np.arange(ROWS)]
    np.testing.assert_allclose(diagonal, 1.0, rtol=1e-6)
    off = ~np.eye(ROWS, dtype=bool)
    scores = _scores(ppt, np.eye(ROWS))[off]
    assert scores.max() < MAX_SCORE, scores.max()
    # The off-diagonal entries really are random: their std is 1/sqrt(3) = 0.577, and
    # a sample std over 2000 draws is within 5 standard errors (5 / sqrt(2 * 2000) = 8%)
    # of it for all 90 entries, so > 0.53 > 0.3.
    assert ppt.std(axis=0)[off].min() > 0.3


def test_probe_second_moment_is_k_times_identity(estimator_samples):
    # E[(P P^T)^2] = k I with k = 1 + (m - 1) / r (the rank rule of bros), scored like
    # the means above (the same union bound over the 100 entries).
    *_, ppt = estimator_samples
    squares = ppt @ ppt
    k = subspace.second_moment(ROWS, RANK)
    assert k == 1 + (ROWS - 1) / RANK
    scores = _scores(squares, k * np.eye(ROWS))
    assert scores.max() < MAX_SCORE, scores.max()
    # The single-probe bias prediction below uses the general E[M X M]; with X = I it
    # is this k I.


def test_bi_probe_estimator_is_unbiased(estimator_samples):
    h, z, bi, _, _ = estimator_samples
    scores = _scores(bi, h @ z)
    assert scores.max() < MAX_SCORE, f"max score {scores.max():.2f} over {scores.size} entries"


def test_single_probe_estimator_has_the_predicted_bias(estimator_samples):
    h, z, _, single, _ = estimator_samples
    r = RANK
    predicted = (1 + 1 / r) * h @ z + (np.trace(h) / r) * z - (2 / r) * np.diag(h)[:, None] * z
    scores = _scores(single, predicted)
    assert scores.max() < MAX_SCORE, f"max score {scores.max():.2f} against the predicted mean"
    # ... and that mean is clearly not H z: the bias is resolved by a wide margin.
    assert _scores(single, h @ z).max() > 10 * MAX_SCORE


# -------------------------------------------------------------- factored evaluation

M, N, R = 40, 24, 4
_RNG = np.random.default_rng(0)
W = jnp.asarray(_RNG.standard_normal((M, N)), jnp.float32)
A2 = jnp.asarray(_RNG.standard_normal((5, M)), jnp.float32)
A3 = jnp.asarray(_RNG.standard_normal((2, 3, M)), jnp.float32)
P1 = subspace.rademacher(jax.random.key(1), M, R)
P2 = subspace.rademacher(jax.random.key(2), M, R)
B1 = jnp.asarray(0.1 * _RNG.standard_normal((R, N)), jnp.float32)
B2 = jnp.asarray(0.1 * _RNG.standard_normal((R, N)), jnp.float32)
A3_COLS = jnp.asarray(_RNG.standard_normal((2, 3, N)), jnp.float32)  # contracts W's columns


def _bf16_layer(w):
    h = A2.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)
    return jnp.sum(jnp.tanh(h).astype(jnp.float32))


# Uses that call_factored keeps factored: no intermediate as large as W depends on B.
FACTORED_USES = {
    "matmul_2d": lambda w: jnp.sum(jnp.tanh(A2 @ w)),
    "matmul_3d": lambda w: jnp.sum(jnp.tanh(A3 @ w)),
    "vector_matmul": lambda w: jnp.sum(jnp.tanh(A2[0] @ w)),
    "nested_jit": lambda w: jnp.sum(jnp.tanh(jax.jit(lambda a, v: a @ v)(A2, w))),
    "bf16_cast": _bf16_layer,
    "sum_pow2": lambda w: jnp.sum(w**2),
    "sum_square": lambda w: jnp.sum(jnp.square(w)),
    "sum_mul_self": lambda w: jnp.sum(w * w),
    "layer_and_decay": lambda w: jnp.sum(jnp.tanh(A2 @ w)) + 0.1 * jnp.sum(w**2),
    # W contracted on its columns, W on either side of the product, transposes:
    "transpose": lambda w: jnp.sum(jnp.tanh(A3_COLS[0] @ w.T)),
    "transpose_left": lambda w: jnp.sum(jnp.tanh(w.T @ A2.T)),
    "einsum_rows": lambda w: jnp.sum(jnp.tanh(jnp.einsum("bnm,mk->bnk", A3, w))),
    "einsum_rows_w_first": lambda w: jnp.sum(jnp.tanh(jnp.einsum("mk,bnm->bkn", w, A3))),
    "einsum_columns": lambda w: jnp.sum(jnp.tanh(jnp.einsum("bnk,mk->bnm", A3_COLS, w))),
    "einsum_columns_w_first": lambda w: jnp.sum(jnp.tanh(jnp.einsum("mk,bnk->mbn", w, A3_COLS))),
    "dot_general_columns": lambda w: jnp.sum(
        jnp.tanh(jax.lax.dot_general(w, A3_COLS, (((1,), (2,)), ((), ()))))
    ),
}
# Uses that must fall back to the dense sum (still exact).
DENSE_USES = {
    "row_lookup": lambda w: jnp.sum(jnp.tanh(w[0])),
    "partial_sum_of_squares": lambda w: jnp.sum(jnp.sqrt(jnp.sum(w**2, axis=0))),
    "elementwise": lambda w: jnp.sum(jnp.sin(w)),
    "batch_axis_on_w": lambda w: jnp.sum(jnp.tanh(jnp.einsum("mk,mk->m", w, jnp.cos(W)))),
}


def _factored_loss(fn, two_factors):
    def loss(b1, b2):
        factors = ((P1, b1), (P2, b2)) if two_factors else ((P1, b1),)
        return subspace.call_factored(fn, subspace.Factored(W, factors))

    return loss


def _largest_b_dependent_value(closed: jex.ClosedJaxpr) -> int:
    """The size of the largest intermediate of ``closed`` that depends on its inputs
    (the coordinates), looking inside nested jitted calls."""

    def visit(jaxpr, tainted):
        largest = 0
        for eqn in jaxpr.eqns:
            hits = [not isinstance(v, jex.Literal) and v in tainted for v in eqn.invars]
            if not any(hits):
                continue
            for param in eqn.params.values():
                sub = param.jaxpr if isinstance(param, jex.ClosedJaxpr) else param
                if isinstance(sub, jex.Jaxpr) and len(sub.invars) == len(eqn.invars):
                    inner = {v for v, hit in zip(sub.invars, hits, strict=True) if hit}
                    largest = max(largest, visit(sub, inner))
            for out in eqn.outvars:
                tainted.add(out)
                largest = max(largest, int(np.prod(out.aval.shape)))
        return largest

    return visit(closed.jaxpr, set(closed.jaxpr.invars))


# BROS's inner pass holds projected leaves with two factors (P, B1), (Q, B2); these
# uses exercise what differs with two: the dot loop, the cross terms of the sum of
# squares, casts of both factors, and the dense fallback.
TWO_FACTOR_USES = ["matmul_2d", "bf16_cast", "sum_pow2", "layer_and_decay", "transpose"]
TWO_FACTOR_USES += ["einsum_rows_w_first", "einsum_columns", "row_lookup"]
CASES = [(use, False) for use in list(FACTORED_USES) + list(DENSE_USES)]
CASES += [(use, True) for use in TWO_FACTOR_USES]


@pytest.mark.parametrize(
    ("use", "two_factors"), CASES, ids=[f"{u}-{'two' if t else 'one'}" for u, t in CASES]
)
def test_call_factored_matches_dense_value_and_projected_gradient(use, two_factors):
    fn = {**FACTORED_USES, **DENSE_USES}[use]
    loss = _factored_loss(fn, two_factors)
    b2 = B2 if two_factors else jnp.zeros_like(B2)
    shifted = W + P1 @ B1 + (P2 @ b2 if two_factors else 0.0)
    value, (grad1, grad2) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(B1, B2)
    dense_value, dense_grad = jax.jit(jax.value_and_grad(fn))(shifted)
    dense_grad = np.asarray(dense_grad, np.float64)
    # float32: both paths sum the same products in another order (a W0 + (a P) B vs
    # a (W0 + P B)): sums of <= M + 2R = 48 terms per entry, <= 48 * 2^-24 = 3e-6 of the
    # terms' scale, then tanh (Lipschitz 1) and the backward products of the same
    # length: ~6e-6, and rtol/atol 2e-5/1e-5 of the scale leave ~3x for cancellation.
    # bf16: the inputs of the product are rounded to 8 significant bits (2^-9 = 2e-3)
    # in different places (W0 and P B apart, or their sum); an entry of a 40-term
    # product with random signs then moves by ~sqrt(40) * 2e-3 = 1.3% of the terms'
    # scale, <= 5% of the largest entry; the value, a sum of 120 tanh of such entries,
    # averages the errors (rtol 1e-2).
    bf16 = use == "bf16_cast"
    np.testing.assert_allclose(value, dense_value, rtol=1e-2 if bf16 else 2e-5)
    tol = {"rtol": 0.0, "atol": 5e-2} if bf16 else {"rtol": 2e-5, "atol": 1e-5}
    scale = np.abs(dense_grad).max()
    np.testing.assert_allclose(
        grad1 / scale, np.asarray(P1, np.float64).T @ dense_grad / scale, **tol
    )
    if two_factors:
        np.testing.assert_allclose(
            grad2 / scale, np.asarray(P2, np.float64).T @ dense_grad / scale, **tol
        )

    # Mechanism: the value and gradient are computed without any W-sized array that
    # depends on the coordinates, unless the use must fall back to the dense sum.
    closed = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(B1, B2)
    largest = _largest_b_dependent_value(closed)
    if use in FACTORED_USES:
        assert largest < M * N, f"{use}: a W-sized ({largest}) array depends on B"
    else:
        assert largest >= M * N, f"{use}: expected the dense fallback"


def test_bf16_sum_of_squares_is_evaluated_from_factors():
    w16 = W.astype(jnp.bfloat16)
    fn = lambda w: jnp.sum(w**2)

    def loss(b):
        return subspace.call_factored(fn, subspace.Factored(w16, ((P1, b),)))

    value, grad = jax.jit(jax.value_and_grad(loss))(B1)
    shifted = w16 + (P1 @ B1).astype(jnp.bfloat16)
    # A sum of positive squares: each side rounds inputs and squares to bf16 (2^-9 =
    # 2e-3 each), no cancellation: <= 3 * 2e-3 = 6e-3 relative. The gradient 2 P^T W:
    # 40 signed terms whose inputs were rounded differently, as in the test above (5%).
    np.testing.assert_allclose(value, fn(shifted), rtol=1e-2)
    want = np.asarray(P1, np.float64).T @ np.asarray(jax.grad(fn)(shifted), np.float64)
    np.testing.assert_allclose(grad, want, atol=5e-2 * np.abs(want).max())
    largest = _largest_b_dependent_value(jax.make_jaxpr(jax.value_and_grad(loss))(B1))
    assert largest < M * N, f"a W-sized ({largest}) array depends on B"


def test_call_factored_passes_pytrees_and_plain_leaves_through():
    def fn(params, scale):
        return scale * jnp.sum(jnp.tanh(A2 @ params["w"] + params["b"])), params["b"]

    b = jnp.arange(N, dtype=jnp.float32) / N
    factored = subspace.Factored(W, ((P1, B1),))
    out, bias = subspace.call_factored(fn, {"w": factored, "b": b}, 2.0)
    want, _ = fn({"w": factored.dense(), "b": b}, 2.0)
    # As in the float32 cases above: ~6e-6 of the scale; the sum of 120 tanh keeps it.
    np.testing.assert_allclose(out, want, rtol=1e-5)
    np.testing.assert_array_equal(bias, b)
    # A factored leaf returned as is comes back dense.
    np.testing.assert_allclose(subspace.call_factored(lambda w: w, factored), factored.dense())


# ------------------------------------------------- a transformer block written with einsum
#
# A pre-norm attention block plus MLP, its projections written the ways models write
# them: einsum with the weight on either side, contracted on its rows or (weights
# stored output-first) its columns, a plain matmul, and a transposed weight. Tokens
# and widths are chosen so that every activation (3 x 48 at most) is smaller than the
# smallest weight (24 x 32): a B-dependent array of a weight's size would be a dense
# m x n product of a projected leaf.

WIDTH, HEAD, HIDDEN, TOKENS, BLOCK_RANK = 32, 24, 48, 3, 4
BLOCK_SHAPES = {
    "wq": (WIDTH, HEAD),  # einsum('bnd,dh->bnh', x, wq)
    "wk": (HEAD, WIDTH),  # stored output-first: einsum('bnd,hd->bnh', x, wk)
    "wv": (WIDTH, HEAD),  # weight first, head-major result: einsum('dh,bnd->bhn', wv, x)
    "wo": (HEAD, WIDTH),  # einsum('bnh,hd->bnd', attended, wo)
    "w1": (WIDTH, HIDDEN),  # x @ w1
    "w2": (WIDTH, HIDDEN),  # used transposed: h @ w2.T
}


def _block(params, x):
    def norm(a):
        return (a - a.mean(-1, keepdims=True)) * jax.lax.rsqrt(a.var(-1, keepdims=True) + 1e-5)

    h = norm(x)
    q = jnp.einsum("bnd,dh->bnh", h, params["wq"])
    k = jnp.einsum("bnd,hd->bnh", h, params["wk"])
    v = jnp.einsum("dh,bnd->bhn", params["wv"], h)
    weights = jax.nn.softmax(jnp.einsum("bnh,bmh->bnm", q, k) / np.sqrt(HEAD), axis=-1)
    attended = jnp.einsum("bnm,bhm->bnh", weights, v)
    x = x + jnp.einsum("bnh,hd->bnd", attended, params["wo"])
    x = x + jax.nn.gelu(norm(x) @ params["w1"]) @ params["w2"].T
    return jnp.sum(jnp.tanh(x)) + 1e-3 * sum(jnp.sum(w**2) for w in params.values())


def _block_setup():
    rng = np.random.default_rng(7)
    base = {
        name: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[0]), jnp.float32)
        for name, shape in BLOCK_SHAPES.items()
    }
    probes = subspace.draw_probes(jax.random.key(3), base, BLOCK_RANK)
    coordinates = [
        {
            name: jnp.asarray(0.1 * rng.standard_normal((BLOCK_RANK, shape[1])), jnp.float32)
            for name, shape in BLOCK_SHAPES.items()
        }
        for _ in range(2)
    ]
    x = jnp.asarray(rng.standard_normal((1, TOKENS, WIDTH)), jnp.float32)
    return base, probes, coordinates, x


def test_einsum_transformer_block_keeps_every_projection_factored():
    base, probes, (first, second), x = _block_setup()
    assert all(p is not None for p in jax.tree.leaves(probes.left))  # all projected

    def factored_loss(b1, b2):
        shifted = subspace.shifted(base, probes, b1, b2, factored=True)
        return subspace.call_factored(_block, shifted, x)

    value, (grad1, grad2) = jax.jit(jax.value_and_grad(factored_loss, argnums=(0, 1)))(
        first, second
    )
    # The dense path: the shifted weights formed, the block differentiated as written.
    shifted = subspace.shifted(base, probes, first, second, factored=False)
    dense_value, dense_grad = jax.jit(jax.value_and_grad(_block))(shifted, x)
    # float32 reassociation: both paths sum the same products in another order (x W0 +
    # (x P) B vs x (W0 + P B)), sums of at most ~100 terms of size ~1 per layer, over
    # 6 layers and a softmax (Lipschitz ~1): ~6 * 100 * 6e-8 = 4e-5 of the scale.
    np.testing.assert_allclose(value, dense_value, rtol=1e-4)
    for name in BLOCK_SHAPES:
        g = np.asarray(dense_grad[name], np.float64)
        scale = np.abs(g).max()
        for coords_grad, probe in ((grad1, probes.left), (grad2, probes.right)):
            want = np.asarray(probe[name], np.float64).T @ g
            np.testing.assert_allclose(
                coords_grad[name] / scale, want / scale, rtol=0, atol=1e-4, err_msg=name
            )

    closed = jax.make_jaxpr(jax.value_and_grad(factored_loss, argnums=(0, 1)))(first, second)
    smallest_weight = min(int(np.prod(shape)) for shape in BLOCK_SHAPES.values())
    largest = _largest_b_dependent_value(closed)
    assert largest < smallest_weight, f"a weight-sized ({largest}) array depends on B"


# ----------------------------------------------------------- memory of a BROS step

WIDE = (64, 1024, 1024, 10)
WIDE_BATCH = 32


def _wide_mlp(y, a):
    h = a
    for i in range(3):
        h = h @ y[f"w{i}"] + y[f"b{i}"]
        h = jax.nn.relu(h) if i < 2 else h
    return h


def _wide_inner(x, y, batch):
    a, t = batch
    per_example = optax.softmax_cross_entropy_with_integer_labels(_wide_mlp(y, a), t)
    decay = sum(jnp.sum(y[f"w{i}"] ** 2) for i in range(3))
    return jnp.mean(jax.nn.sigmoid(x) * per_example) + 1e-3 * decay


def _wide_outer(x, y, batch):
    a, t = batch
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_wide_mlp(y, a), t))


def _compiled_bytes(tx):
    x = jax.ShapeDtypeStruct((WIDE_BATCH,), jnp.float32)
    batch = (
        jax.ShapeDtypeStruct((WIDE_BATCH, WIDE[0]), jnp.float32),
        jax.ShapeDtypeStruct((WIDE_BATCH,), jnp.int32),
    )
    state = jax.eval_shape(tx.init, x)
    step = jax.jit(
        lambda s, x, ib, ob: tx.update(x, s, x, inner_batch=ib, outer_batch=ob),
        donate_argnums=(0,),
    )
    stats = step.lower(state, x, batch, batch).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def test_factored_bros_step_needs_less_memory_than_ma_soba():
    # Compiled, never run: the numbers are XLA's buffer assignment for this program.
    # Every method holds the donated state (y and z: 2 x 4.3 MiB, mostly the 1024 x
    # 1024 leaf, 4 MiB each). MA-SOBA must also hold that leaf's grad_y g and H z
    # (produced by one pass, consumed together by the updates): >= 8 MiB more. Factored
    # BROS holds r x n coordinates and 32 x 1024 activations (< 1 MiB). So factored /
    # MA-SOBA <= (8.6 + 1) / (8.6 + 8) = 0.58, below the bound 0.8; the naive variant
    # forms y + P B and its gradient densely, like MA-SOBA (>= 0.8).
    y0 = {}
    for i in range(3):
        y0[f"w{i}"] = jnp.zeros(WIDE[i : i + 2], jnp.float32)
        y0[f"b{i}"] = jnp.zeros(WIDE[i + 1], jnp.float32)
    problem = bilevel.BilevelProblem(_wide_inner, _wide_outer, y0)
    reference = _compiled_bytes(bilevel.ma_soba(problem, 0.1, 0.1))
    factored = _compiled_bytes(bilevel.bros(problem, 16, 0.1, 0.1))
    naive = _compiled_bytes(bilevel.bros(problem, 16, 0.1, 0.1, factored=False))
    assert factored < 0.8 * reference, (factored, reference)
    assert naive >= 0.8 * reference, (naive, reference)
