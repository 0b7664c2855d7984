"""optstab.bilevel._core, through the public solvers: input checks at trace time and
the skipping of non-finite steps."""

import functools

import bilevel_data as bd
import conformance as cf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optstab import bilevel

SOLVERS = {
    "soba": lambda problem: bilevel.soba(problem, 0.2, 0.1),
    "ma_soba": lambda problem: bilevel.ma_soba(problem, 0.2, 0.1, average=0.5, radius=3.0),
    "bros": lambda problem: bilevel.bros(problem, 2, 0.2, 0.1, average=0.5, radius=3.0),
}
_BATCHES = jax.tree.map(lambda a: a[0], bd.mlp_batches(1))


def _raises_one_line(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


# ------------------------------------------------------------------ input checks


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_x_of_another_shape_or_structure_is_named(name, jit):
    tx = SOLVERS[name](bd.MLP)
    state = tx.init(bd.MLP_X)
    inner, outer = _BATCHES
    update = functools.partial(tx.update, inner_batch=inner, outer_batch=outer)
    update = jax.jit(update) if jit else update

    longer = {**bd.MLP_X, "shift": jnp.zeros(4)}
    message = _raises_one_line("params", update, longer, state, longer)
    assert "['shift']" in message and "(4,)" in message and "(3,)" in message
    missing = {"shift": bd.MLP_X["shift"]}
    _raises_one_line("tree structure", update, missing, state, missing)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_batch_the_loss_cannot_take_is_named(name):
    tx = SOLVERS[name](bd.MLP)
    state = tx.init(bd.MLP_X)
    inner, outer = _BATCHES
    narrow = (inner[0][:, :5], inner[1])  # 5 input features where w has 6 rows
    message = _raises_one_line(
        r"inner_loss\(x, y, inner_batch\)",
        tx.update, bd.MLP_X, state, bd.MLP_X, inner_batch=narrow, outer_batch=outer,
    )  # fmt: skip
    assert "TypeError" in message
    _raises_one_line(
        r"outer_loss\(x, y, outer_batch\)",
        tx.update, bd.MLP_X, state, bd.MLP_X, inner_batch=inner, outer_batch=(outer[0],),
    )  # fmt: skip


@pytest.mark.parametrize("name", list(SOLVERS))
def test_a_loss_that_is_not_a_scalar_is_named(name):
    per_example = lambda x, y, b: bd.mlp_outer(x, y, b) * jnp.ones(3)
    tx = SOLVERS[name](bd.MLP._replace(outer_loss=per_example))
    state = tx.init(bd.MLP_X)
    inner, outer = _BATCHES
    message = _raises_one_line(
        "outer_loss must return a real scalar",
        tx.update, bd.MLP_X, state, bd.MLP_X, inner_batch=inner, outer_batch=outer,
    )  # fmt: skip
    assert "(3,)" in message


# ------------------------------------------------------------ non-finite steps


def _poisoned(batch, where):
    """The batch with one input entry replaced by ``where`` (nan or inf)."""
    a, t = batch
    return a.at[0, 0].set(where), t


@functools.partial(jax.jit, static_argnames=("name", "poison"))
def _three_updates(name, poison):
    """Updates with batches 0, (1 or a poisoned copy of 1), 2 from a noisy state."""
    tx = SOLVERS[name](bd.MLP)
    state = bd.mlp_state(tx, seed=3)
    inner, outer = bd.mlp_batches(3, seed=5)
    outputs, states = [], []
    for i in range(3):
        ib, ob = jax.tree.map(lambda a, i=i: a[i], (inner, outer))
        if i == 1 and poison == "inner_nan":
            ib = _poisoned(ib, jnp.nan)
        elif i == 1 and poison == "outer_inf":
            ob = _poisoned(ob, jnp.inf)
        out, state = tx.update(bd.MLP_X, state, bd.MLP_X, inner_batch=ib, outer_batch=ob)
        outputs.append(out)
        states.append(state)
    return outputs, states


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("poison", ["inner_nan", "outer_inf"])
def test_a_non_finite_step_is_skipped_and_counted(name, poison):
    clean_out, clean = _three_updates(name, "none")
    outs, states = _three_updates(name, poison)
    # Step 0 is shared; step 1 saw the poisoned batch and kept y, z, w bit for bit.
    cf.assert_trees_equal((outs[0], states[0]), (clean_out[0], clean[0]))
    before, skipped = states[0], states[1]
    cf.assert_trees_equal((skipped.y, skipped.z, skipped.w), (before.y, before.z, before.w))
    for leaf in jax.tree.leaves(outs[1]):
        np.testing.assert_array_equal(leaf, 0.0)  # x does not move
    assert int(skipped.nonfinite) == 1 and int(skipped.count) == int(before.count) + 1
    assert int(clean[1].nonfinite) == 0
    # Step 2 is a clean step again from the same y, z, w: everything finite, and the
    # counter stays at one.
    assert cf.all_finite((outs[2], states[2])) and int(states[2].nonfinite) == 1
    assert not np.allclose(states[2].y["w"], before.y["w"])
