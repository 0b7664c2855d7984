"""Tests of optstab.checkpoint: bit-exact round trips of any pytree through orbax."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from optstab import checkpoint


def _key_data(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(x)
    return x


def assert_trees_equal(got, want):
    """Same structure, same leaf types and dtypes, bit-identical values."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert type(g) is type(w) or (isinstance(g, jax.Array) and isinstance(w, jax.Array)), (
            type(g),
            type(w),
        )
        assert np.asarray(_key_data(g)).dtype == np.asarray(_key_data(w)).dtype
        if isinstance(w, jax.Array) and jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            assert g.dtype == w.dtype
            assert jax.random.key_impl(g) == jax.random.key_impl(w)
        np.testing.assert_array_equal(np.asarray(_key_data(g)), np.asarray(_key_data(w)))


def _abstract(tree):
    return jax.eval_shape(lambda: tree)


def test_typed_and_legacy_keys_round_trip(tmp_path):
    state = {
        "key": jax.random.key(0),
        "keys": jax.random.split(jax.random.key(1), 3),
        "rbg": jax.random.key(2, impl="rbg"),
        "legacy": jax.random.PRNGKey(3),  # plain uint32 array
        "no_keys": jax.random.split(jax.random.key(4), 0),  # zero-size key array
    }
    checkpoint.save(tmp_path, 1, state)
    assert_trees_equal(checkpoint.restore(tmp_path, 1, _abstract(state)), state)
    assert_trees_equal(checkpoint.restore(tmp_path, 1, state), state)
    restored = checkpoint.restore(tmp_path, 1, _abstract(state))
    # The restored keys work as keys, with the same streams.
    np.testing.assert_array_equal(
        jax.random.uniform(restored["rbg"], (3,)), jax.random.uniform(state["rbg"], (3,))
    )


def test_nested_optax_states_round_trip(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2, jnp.bfloat16)}
    tx = optax.MultiSteps(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=1e-2),
        ),
        every_k_schedule=2,
    )
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    update = jax.jit(tx.update)
    for _ in range(3):
        _, opt_state = update(grads, opt_state, params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(3)}
    checkpoint.save(tmp_path / "c", 3, state)
    restored = checkpoint.restore(tmp_path / "c", 3, _abstract(state))
    assert_trees_equal(restored, state)
    assert isinstance(restored["opt_state"], optax.MultiStepsState)
    # The restored state produces the same next update.
    want = update(grads, opt_state, params)
    got = update(grads, restored["opt_state"], restored["params"])
    assert_trees_equal(got, want)


@jax.tree_util.register_static
class _StaticNames(tuple):
    """A pytree node with no children: static data only (like GNMR's unit names)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _WithStatic:
    stats: jax.Array
    names: _StaticNames


def test_scalars_zero_size_numpy_python_and_static_nodes(tmp_path):
    state = {
        "scalar": jnp.float32(1.5),
        "empty": jnp.zeros((0, 4)),
        "empty_int": jnp.zeros((3, 0), jnp.int32),
        "np": np.arange(5, dtype=np.int64),
        "np_scalar": np.float32(2.5),
        "py_int": 7,
        "py_float": 0.25,
        "py_bool": True,
        "node": _WithStatic(jnp.arange(3.0), _StaticNames(("a", "b", "c"))),
        "none": None,
        "empty_dict": {},
    }
    checkpoint.save(tmp_path, 0, state)
    restored = checkpoint.restore(tmp_path, 0, state)
    assert_trees_equal(restored, state)
    assert restored["node"].names == ("a", "b", "c")
    assert isinstance(restored["py_int"], int) and restored["py_int"] == 7
    assert isinstance(restored["np"], np.ndarray) and restored["np"].dtype == np.int64
    # An abstract target turns Python scalars into jax scalars: they restore as such.
    abstract = checkpoint.restore(tmp_path, 0, _abstract(state))
    assert abstract["py_int"].dtype == jnp.int32 and int(abstract["py_int"]) == 7
    # ... and numpy int64 leaves into eval_shape's canonical int32.
    np.testing.assert_array_equal(abstract["np"], np.arange(5))


def test_state_without_leaves(tmp_path):
    state = {"a": None, "b": (), "names": _StaticNames(("x",))}
    checkpoint.save(tmp_path, 5, state)
    assert checkpoint.restore(tmp_path, 5, state) == state


def test_flax_nnx_state_round_trip(tmp_path):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    checkpoint.save(tmp_path, 1, state)
    other = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    restored = checkpoint.restore(tmp_path, 1, nnx.state(other))
    assert_trees_equal(restored, state)
    nnx.update(other, restored)
    x = jnp.ones((1, 3))
    np.testing.assert_array_equal(other(x), model(x))


def test_keep_prunes_old_steps_and_latest_step(tmp_path):
    path = tmp_path / "run"
    assert checkpoint.latest_step(path) is None
    state = {"x": jnp.zeros(2)}
    for step in (1, 2, 3, 4):
        checkpoint.save(path, step, {"x": state["x"] + step}, keep=2)
    assert checkpoint.latest_step(path) == 4
    assert sorted(os.listdir(path)) == ["3", "4"]
    np.testing.assert_array_equal(checkpoint.restore(path, None, state)["x"], [4.0, 4.0])
    np.testing.assert_array_equal(checkpoint.restore(path, 3, state)["x"], [3.0, 3.0])
    with pytest.raises(FileNotFoundError, match="step 1"):
        checkpoint.restore(path, 1, state)
    checkpoint.save(path, 5, state)  # keep=None keeps everything
    assert sorted(os.listdir(path)) == ["3", "4", "5"]
    with pytest.raises(ValueError, match="already exists"):
        checkpoint.save(path, 5, {"x": jnp.ones(2)})
    checkpoint.save(path, 2, {"x": jnp.full(2, 2.0)})  # below the latest: still saved
    np.testing.assert_array_equal(checkpoint.restore(path, 2, state)["x"], [2.0, 2.0])
    assert checkpoint.latest_step(path) == 5
    with pytest.raises(ValueError, match="keep"):
        checkpoint.save(path, 6, state, keep=0)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.restore(missing, None, {"x": jnp.zeros(1)})
    assert not missing.exists()  # restoring must not create the directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        checkpoint.restore(tmp_path / "empty", None, {"x": jnp.zeros(1)})
    assert checkpoint.latest_step(tmp_path / "empty") is None


@pytest.mark.parametrize(
    ("like", "match"),
    [
        ({"a": jnp.zeros(3)}, "2 leaves but `like` has 1"),
        ({"a": jnp.zeros(3), "b": jnp.zeros((2, 3))}, r"shape \(2, 2\) in the checkpoint"),
        ({"a": jnp.zeros(3), "b": jnp.zeros((2, 2), jnp.bfloat16)}, "dtype float32"),
        ({"a": jnp.zeros(3), "c": jnp.zeros((2, 2))}, "key path"),
        ({"a": jnp.zeros(3), "b": jax.random.split(jax.random.key(0), 2)}, "PRNG key"),
    ],
    ids=["num_leaves", "shape", "dtype", "key_path", "key_vs_array"],
)
def test_mismatched_target_raises_value_error(tmp_path, like, match):
    checkpoint.save(tmp_path, 0, {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    with pytest.raises(ValueError, match=match):
        checkpoint.restore(tmp_path, 0, like)


def test_strict_false_ignores_key_paths(tmp_path):
    checkpoint.save(tmp_path, 0, {"a": jnp.arange(3.0)})
    restored = checkpoint.restore(tmp_path, 0, {"renamed": jnp.zeros(3)}, strict=False)
    np.testing.assert_array_equal(restored["renamed"], [0.0, 1.0, 2.0])


def test_unsupported_leaf_type_raises(tmp_path):
    with pytest.raises(TypeError, match="str"):
        checkpoint.save(tmp_path, 0, {"name": "not an array"})


def test_sharded_restore_keeps_sharding(sharded_results):
    """Runs inside the 8-device worker (tests/_sharded_worker.py)."""
    r = sharded_results
    if "ckpt/error" in r:
        pytest.fail(f"8-device worker raised:\n{r['ckpt/error']}", pytrace=False)
    assert str(r["ckpt/problems"]) == "", str(r["ckpt/problems"])
    assert bool(r["ckpt/w_sharded"]), "w did not come back sharded as P('d')"


def test_restore_needs_a_target(tmp_path):
    """A checkpoint records shapes and dtypes, not Python types: restoring without a
    target is refused before the directory is even looked at."""
    checkpoint.save(tmp_path, 0, {"losses": [1.5, 2.5]})
    with pytest.raises(ValueError, match="needs `like`"):
        checkpoint.restore(tmp_path)
    with pytest.raises(ValueError, match="needs `like`"):
        checkpoint.restore(tmp_path / "missing", 0)
