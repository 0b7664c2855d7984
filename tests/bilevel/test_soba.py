"""optstab.bilevel.soba / ma_soba: convergence to a closed-form solution, the update
rule's parts (average, radius, schedules, inner_init), pytrees, validation, and
finding the bilevel state inside composed optimizers."""

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

# ---------------------------------------------------------------- convergence


@pytest.mark.parametrize(
    ("make", "steps"),
    [
        (lambda: bilevel.soba(bd.QUAD, 0.4, 0.4), 300),
        (lambda: bilevel.ma_soba(bd.QUAD, 0.4, 0.4, average=0.5), 400),
    ],
    ids=["soba", "ma_soba"],
)
def test_reaches_the_closed_form_solution(make, steps):
    # Deterministic oracles: the iteration on (x, y, z, w) is linear with the solution
    # as fixed point. Its spectral radius (float64, from the formulas) is 0.907 for
    # SOBA and 0.956 for MA-SOBA, so the transient is <= 0.956^400 * |x*| ~ 3e-8 (times
    # a modest non-normality factor). In float32 each step rounds by ~4 * 2^-24 of
    # |v| ~ 1.6, and ||(I - J)^-1|| ~ 10 turns that into a fixed-point offset of
    # ~10 * 4 * 6e-8 * 1.6 = 4e-6. atol 2e-5 covers both with a factor ~5.
    x_star, y_star, z_star = bd.quad_solution()
    tx = optax.chain(make(), optax.sgd(0.3))
    x, opt_state = bd.run_steps(tx, jnp.zeros(bd.QUAD_X), steps)
    state = bilevel.find_bilevel_state(opt_state)
    np.testing.assert_allclose(x, x_star, atol=2e-5)
    np.testing.assert_allclose(state.y, y_star, atol=2e-5)  # y -> y*(x*)
    np.testing.assert_allclose(state.z, z_star, atol=2e-5)  # z -> A^{-1} grad_y f
    np.testing.assert_allclose(state.w, 0.0, atol=2e-5)  # the hypergradient vanishes
    assert int(state.count) == steps


def test_soba_is_ma_soba_with_average_one():
    got = bd.run_steps(optax.chain(bilevel.soba(bd.QUAD, 0.4, 0.4), optax.sgd(0.3)), jnp.ones(3), 5)
    want = bd.run_steps(
        optax.chain(bilevel.ma_soba(bd.QUAD, 0.4, 0.4, average=1.0), optax.sgd(0.3)),
        jnp.ones(3),
        5,
    )
    cf.assert_trees_equal(got, want)


# ---------------------------------------------------------- parts of one update


_BATCHES = jax.tree.map(lambda a: a[0], bd.mlp_batches(1))


@functools.partial(jax.jit, static_argnames=("factory",))
def _update(state, hyper, factory="ma_soba"):
    """One update of the MLP problem at ``state``. The hyperparameters are traced
    arguments (arrays are not validated), so one compile serves many values; a
    ``None`` radius is part of the static structure."""
    if factory == "bros":
        tx = bilevel.bros(bd.MLP, 2, **hyper, key=1)
    else:
        tx = bilevel.ma_soba(bd.MLP, **hyper)
    inner, outer = _BATCHES
    return tx.update(bd.MLP_X, state, bd.MLP_X, inner_batch=inner, outer_batch=outer)


def _hyper(inner_lr=0.1, aux_lr=0.1, average=1.0, radius=None):
    return {"inner_lr": inner_lr, "aux_lr": aux_lr, "average": average, "radius": radius}


def _state(seed, count=0, factory="ma_soba"):
    """A state with nonzero y, z, w; BROS's also holds its (zero) curvature statistics."""
    tx = (
        bilevel.bros(bd.MLP, 2, 0.1, 0.1)
        if factory == "bros"
        else bilevel.ma_soba(bd.MLP, 0.1, 0.1)
    )
    return bd.mlp_state(tx, seed=seed, count=count)


def test_one_update_matches_the_formulas():
    # y <- y - beta grad_y g; z <- z - gamma (H z - grad_y f); D = grad_x f - J z;
    # w <- (1 - theta) w + theta D, on dense derivatives of the MLP problem.
    beta, gamma, theta = 0.3, 0.2, 0.4
    tx = bilevel.ma_soba(bd.MLP, beta, gamma, average=theta)
    state = bd.mlp_state(tx, seed=4, count=3)
    inner, outer = _BATCHES
    updates, new = jax.jit(tx.update)(
        bd.MLP_X, state, bd.MLP_X, inner_batch=inner, outer_batch=outer
    )
    parts = bd.flat_hessian_parts(bd.MLP, bd.MLP_X, state.y, inner, outer)
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0], np.float64)
    y, z, w = flat(state.y), flat(state.z), flat(state.w)
    hessian, cross = np.asarray(parts["hessian"], np.float64), np.asarray(parts["cross"])
    want_y = y - beta * np.asarray(parts["grad_y_g"])
    want_z = z - gamma * (hessian @ z - np.asarray(parts["grad_y_f"]))
    want_w = (1 - theta) * w + theta * (np.asarray(parts["grad_x_f"]) - cross @ z)
    # float32 library against float64 formulas on float32 dense derivatives: the
    # derivatives are sums of <= ~100 products (batch 16 x 6 inputs, the 21 x 21
    # Hessian), <= 100 * 2^-24 = 6e-6 of their scale apart in another order; the
    # update adds ~1e-7. rtol 2e-5 of the largest entry leaves ~3x for cancellation.
    for got, want in ((new.y, want_y), (new.z, want_z), (new.w, want_w)):
        np.testing.assert_allclose(flat(got), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    cf.assert_trees_equal(updates, new.w)


def test_average_mixes_the_new_hypergradient_into_w():
    state = _state(seed=5)
    direction, _ = _update(state, _hyper(average=1.0))  # theta = 1: the estimate D
    updates, new = _update(state, _hyper(average=0.3))
    want = jax.tree.map(lambda w, d: 0.7 * w + 0.3 * d, state.w, direction)
    # Both float32: (1 - 0.3) is rounded once more in the library than 0.7 here, and
    # each side rounds a product and a sum: <= 4 * 2^-24 = 2.4e-7 of |w| + |D| (~3).
    tol = lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
    jax.tree.map(tol, new.w, want)
    cf.assert_trees_equal(updates, new.w)
    assert not np.allclose(new.w["shift"], direction["shift"])


def test_radius_projects_z_onto_the_ball():
    state = _state(seed=6)
    _, free = _update(state, _hyper())
    free_norm = float(optax.tree.norm(free.z))
    radius = 0.25 * free_norm
    _, projected = _update(state, _hyper(radius=radius))
    # The norm of 21 float32 entries is within 21 * 2^-24 = 1.3e-6 of exact (the sum of
    # squares; the square root halves it), computed once in the library and once here.
    assert float(optax.tree.norm(projected.z)) <= radius * (1 + 3e-6)
    # Projection onto a ball: the same direction, scaled to the radius (the scale
    # factor carries the norm's 1.3e-6, then one product rounds).
    jax.tree.map(
        lambda p, f: np.testing.assert_allclose(p, f * radius / free_norm, rtol=3e-6, atol=1e-7),
        projected.z,
        free.z,
    )
    # The projection is of z only; y and w are those of the unprojected update.
    cf.assert_trees_equal((projected.y, projected.w), (free.y, free.w))
    _, inside = _update(state, _hyper(radius=2 * free_norm))
    cf.assert_trees_equal(inside.z, free.z)


@pytest.mark.parametrize("factory", ["ma_soba", "bros"])
def test_schedules_are_evaluated_at_the_state_count(factory):
    inner_lr = optax.linear_schedule(0.4, 0.0, 10)  # 0.4 - 0.04 * count
    aux_lr = lambda count: 0.1 * (count + 1)
    if factory == "bros":
        scheduled = bilevel.bros(bd.MLP, 2, inner_lr, aux_lr, average=0.5, key=1)
    else:
        scheduled = bilevel.ma_soba(bd.MLP, inner_lr, aux_lr, average=0.5)
    update = jax.jit(
        functools.partial(scheduled.update, inner_batch=_BATCHES[0], outer_batch=_BATCHES[1])
    )
    for count in (0, 5):
        state = _state(seed=7, count=count, factory=factory)
        _, got = update(bd.MLP_X, state, bd.MLP_X)
        hyper = _hyper(0.4 - 0.04 * count, 0.1 * (count + 1), average=0.5)
        _, want = _update(state, hyper, factory=factory)
        # The same arithmetic with step sizes from a schedule instead of traced
        # arguments: only XLA's order of sums may differ, <= 96 * 2^-24 = 6e-6 of the
        # values' scale per sum (batch 16 x 6 inputs), two chained sums: 1.2e-5.
        jax.tree.map(
            lambda g, w: np.testing.assert_allclose(g, w, rtol=1.5e-5, atol=1e-6),
            (got.y, got.z, got.w),
            (want.y, want.z, want.w),
        )
        assert not np.allclose(got.y["w"], state.y["w"])


def test_inner_init_callable_or_pytree():
    tx = bilevel.ma_soba(bd.MLP, 0.1, 0.1)
    for x in (bd.MLP_X, jax.tree.map(lambda a: a + 1.0, bd.MLP_X)):
        state = tx.init(x)
        cf.assert_trees_equal(state.y, bd.mlp_init_y(x))
        # z has y's structure, w has x's; both start at float32 zeros.
        assert jax.tree.structure(state.z) == jax.tree.structure(state.y)
        assert jax.tree.structure(state.w) == jax.tree.structure(x)
        for leaf in jax.tree.leaves((state.z, state.w)):
            assert leaf.dtype == jnp.float32 and not np.any(np.asarray(leaf))
        assert state.count.dtype == jnp.int32 and int(state.count) == 0
    fixed = {"w": jnp.ones((bd.MLP_IN, bd.MLP_OUT)), "b": jnp.zeros(bd.MLP_OUT)}
    tx = bilevel.ma_soba(bd.MLP._replace(inner_init=fixed), 0.1, 0.1)
    cf.assert_trees_equal(tx.init(bd.MLP_X).y, fixed)


# ------------------------------------------------------- pytrees and minibatches


def _noisy_inner(x, y, noise):
    return bd.quad_inner(x, y, None) - jnp.sum(y * noise)


def _noisy_outer(x, y, noise):
    return bd.quad_outer(x, y, None) - jnp.sum(y * noise)


def _join_x(x):
    first, rest = x
    return jnp.concatenate([first[None], rest["tail"]])


def _join_y(y):
    return jnp.concatenate([y["top"], y["more"]["rest"][0]], axis=0)


FLAT = bilevel.BilevelProblem(_noisy_inner, _noisy_outer, jnp.zeros((bd.QUAD_ROWS, 2)))
# The same problem with x = (scalar, {"tail": (2,)}) and y = {"top": (3, 2),
# "more": {"rest": ((5, 2),)}}.
NESTED = bilevel.BilevelProblem(
    lambda x, y, b: _noisy_inner(_join_x(x), _join_y(y), b),
    lambda x, y, b: _noisy_outer(_join_x(x), _join_y(y), b),
    {"top": jnp.zeros((3, 2)), "more": {"rest": (jnp.zeros((5, 2)),)}},
)
NESTED_X = (jnp.float32(0.5), {"tail": jnp.array([-0.5, 1.0])})


def _noise(steps, seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(0.3 * rng.standard_normal((steps, bd.QUAD_ROWS, 2)), jnp.float32)


@pytest.mark.parametrize("factory", ["soba", "ma_soba"])
def test_nested_pytrees_follow_the_flat_problem_under_jit(factory):
    kw = {} if factory == "soba" else {"average": 0.3, "radius": 2.0}
    make = lambda problem: optax.chain(
        getattr(bilevel, factory)(problem, 0.3, 0.3, **kw), optax.sgd(0.2)
    )
    inner, outer = _noise(6, 0), _noise(6, 1)
    flat_tx, nested_tx = make(FLAT), make(NESTED)
    x_flat, s_flat, u_flat = bd.run(
        flat_tx, _join_x(NESTED_X), flat_tx.init(_join_x(NESTED_X)), inner, outer
    )
    x_nest, s_nest, u_nest = bd.run(nested_tx, NESTED_X, nested_tx.init(NESTED_X), inner, outer)
    assert jax.tree.structure(x_nest) == jax.tree.structure(NESTED_X)
    assert jax.tree.structure(u_nest) == jax.tree.structure(NESTED_X)
    inner_nest, inner_flat = bilevel.find_bilevel_state(s_nest), bilevel.find_bilevel_state(s_flat)
    assert jax.tree.structure(inner_nest.y) == jax.tree.structure(NESTED.inner_init)
    # The nested problem concatenates leaves and then runs the flat problem's ops: sums
    # over the 16 x 2 entries of y may be ordered differently, <= 32 * 2^-24 = 2e-6 of
    # their scale per sum, ~3 chained sums per step, 6 contracting steps: 3.6e-5.
    close = functools.partial(np.testing.assert_allclose, rtol=4e-5, atol=1e-6)
    close(_join_x(x_nest), x_flat)
    close(_join_y(inner_nest.y), inner_flat.y)
    close(_join_y(inner_nest.z), inner_flat.z)
    close(_join_x(inner_nest.w), inner_flat.w)
    # Every step's update (stacked by the scan) follows the flat run's as well.
    close(jax.vmap(_join_x)(u_nest), u_flat)
    # The minibatches matter: other noise gives another run.
    other = bd.run(flat_tx, _join_x(NESTED_X), flat_tx.init(_join_x(NESTED_X)), outer, inner)
    assert not np.allclose(other[0], x_flat)


def test_bros_runs_on_nested_pytrees_under_jit():
    tx = optax.chain(bilevel.bros(NESTED, 2, 0.1, 0.05, average=0.5), optax.sgd(0.2))
    x, opt_state, updates = bd.run(tx, NESTED_X, tx.init(NESTED_X), _noise(4, 0), _noise(4, 1))
    state = bilevel.find_bilevel_state(opt_state)
    assert jax.tree.structure(x) == jax.tree.structure(NESTED_X)
    assert jax.tree.structure(state.y) == jax.tree.structure(NESTED.inner_init)
    for before, after in zip(jax.tree.leaves(NESTED_X), jax.tree.leaves(x), strict=True):
        assert after.shape == np.shape(before) and np.all(np.isfinite(after))
        assert not np.array_equal(after, before)
    assert cf.all_finite(state.z) and float(optax.tree.norm(state.z)) > 0


# ------------------------------------------------------------------ validation

FACTORIES = {
    "soba": lambda problem, **kw: bilevel.soba(problem, **{"inner_lr": 0.1, "aux_lr": 0.1, **kw}),
    "ma_soba": lambda problem, **kw: bilevel.ma_soba(
        problem, **{"inner_lr": 0.1, "aux_lr": 0.1, **kw}
    ),
    "bros": lambda problem, **kw: bilevel.bros(
        problem, **{"rank": 2, "inner_lr": 0.1, "aux_lr": 0.1, **kw}
    ),
}
BAD = [
    ("inner_lr", 0.0),
    ("inner_lr", -0.1),
    ("aux_lr", 0.0),
    ("aux_lr", -1),
    ("radius", 0.0),
    ("radius", -1.0),
    ("average", 0.0),
    ("average", 1.5),
    ("average", -0.2),
]


@pytest.mark.parametrize(
    ("factory", "argument", "value"),
    [(f, a, v) for f in FACTORIES for a, v in BAD if not (f == "soba" and a == "average")],
)
def test_bad_configuration_raises_value_error_naming_it(factory, argument, value):
    with pytest.raises(ValueError, match=argument):
        FACTORIES[factory](bd.MLP, **{argument: value})


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_problem_must_be_a_bilevel_problem(factory):
    with pytest.raises(ValueError, match="problem"):
        FACTORIES[factory]((bd.mlp_inner, bd.mlp_outer, bd.mlp_init_y))
    with pytest.raises(ValueError, match="outer_loss"):
        FACTORIES[factory](bd.MLP._replace(outer_loss=None))


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_arrays_are_not_validated(factory):
    # Traced hyperparameters cannot be checked; arrays pass through construction.
    kw = {"inner_lr": jnp.float32(-1.0), "aux_lr": jnp.asarray(0.0), "radius": jnp.asarray(-1.0)}
    if factory != "soba":
        kw["average"] = jnp.asarray(1.5)
    FACTORIES[factory](bd.MLP, **kw)


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_update_needs_params_and_both_batches(factory):
    tx = FACTORIES[factory](bd.MLP)
    state = tx.init(bd.MLP_X)
    batch = jax.tree.map(lambda a: a[0], bd.mlp_batches(1)[0])
    with pytest.raises(ValueError, match="params"):
        tx.update(bd.MLP_X, state, inner_batch=batch, outer_batch=batch)
    with pytest.raises(ValueError, match="inner_batch"):
        tx.update(bd.MLP_X, state, bd.MLP_X, outer_batch=batch)
    with pytest.raises(ValueError, match="outer_batch"):
        tx.update(bd.MLP_X, state, bd.MLP_X, inner_batch=batch)
    # None is a valid batch (deterministic problems): QUAD ignores its batches.
    quad = FACTORIES[factory](bd.QUAD)
    x = jnp.ones(bd.QUAD_X)
    update = jax.jit(functools.partial(quad.update, inner_batch=None, outer_batch=None))
    updates, _ = update(x, quad.init(x), x)
    assert updates.shape == x.shape


# ----------------------------------------------------- finding the bilevel state


def test_find_bilevel_state_in_composed_optimizers():
    x = bd.MLP_X
    inner_batch, outer_batch = jax.tree.map(lambda a: a[0], bd.mlp_batches(1))
    chained = optax.chain(optax.clip(1.0), bilevel.ma_soba(bd.MLP, 0.2, 0.1), optax.sgd(0.1))
    injected = optax.chain(
        optax.inject_hyperparams(bilevel.ma_soba, static_args=("key",))(
            bd.MLP, inner_lr=0.2, aux_lr=0.1
        ),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
    )
    for tx in (chained, injected, bilevel.ma_soba(bd.MLP, 0.2, 0.1)):
        opt_state = tx.init(x)
        cf.assert_trees_equal(bilevel.inner_params(opt_state), bd.mlp_init_y(x))
        _, opt_state = jax.jit(tx.update)(
            x, opt_state, x, inner_batch=inner_batch, outer_batch=outer_batch
        )
        state = bilevel.find_bilevel_state(opt_state)
        assert isinstance(state, bilevel.BilevelState) and int(state.count) == 1
        cf.assert_trees_equal(bilevel.inner_params(opt_state), state.y)
        assert not np.allclose(state.y["w"], bd.mlp_init_y(x)["w"])
    wrapped = {"opt": chained.init(x), "step": jnp.int32(0)}  # any pytree around it
    assert isinstance(bilevel.find_bilevel_state(wrapped), bilevel.BilevelState)


def test_find_bilevel_state_raises_when_absent_or_ambiguous():
    x = bd.MLP_X
    for opt_state in (optax.adam(0.1).init(x), (), None):
        with pytest.raises(ValueError, match="found 0"):
            bilevel.find_bilevel_state(opt_state)
        with pytest.raises(ValueError, match="bilevel state"):
            bilevel.inner_params(opt_state)
    two = optax.chain(bilevel.ma_soba(bd.MLP, 0.1, 0.1), bilevel.soba(bd.MLP, 0.1, 0.1))
    with pytest.raises(ValueError, match="found 2"):
        bilevel.find_bilevel_state(two.init(x))
