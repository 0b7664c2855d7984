"""Unit partitions and per-unit reductions shared by every method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optstab import tree as ot

PARAMS = {"c": {"w": jnp.arange(6.0).reshape(3, 2), "b": jnp.ones(2)}, "s": jnp.ones((4, 5))}
# Sums of squares of small integers are exact in float32 and sqrt is correctly rounded
# (EPS32 / 2 relative): norms of integer trees get rtol EPS32.
EPS32 = 2.0**-23


def test_default_units_are_key_paths_sorted():
    partition = ot.make_partition(PARAMS)
    assert partition.names == ("c/b", "c/w", "s")
    assert ot.key_path_name((jax.tree_util.SequenceKey(2), jax.tree_util.GetAttrKey("w"))) == "2/w"


def test_norms_match_numpy_and_are_float32_for_bf16():
    partition = ot.make_partition(PARAMS)
    norms = jax.jit(lambda t: ot.unit_norms(partition, t))(PARAMS)
    np.testing.assert_allclose(norms, [np.sqrt(2), np.sqrt(55), np.sqrt(20)], rtol=EPS32)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
    assert ot.unit_norms(partition, bf16).dtype == jnp.float32


def test_split_labels_give_per_row_units_and_scaling():
    labels = {"c": {"w": "c", "b": "c"}, "s": ["s/0", "s/1", "s/2", "s/3"]}
    partition = ot.make_partition(PARAMS, lambda _: labels)
    assert partition.names == ("c", "s/0", "s/1", "s/2", "s/3")
    norms = ot.unit_norms(partition, PARAMS)
    np.testing.assert_allclose(norms, [np.sqrt(57), *[np.sqrt(5)] * 4], rtol=EPS32)
    scaled = ot.scale_units(partition, PARAMS, jnp.array([2.0, 0.0, 1.0, 0.0, 3.0]))
    np.testing.assert_array_equal(scaled["s"][:, 0], [0.0, 1.0, 0.0, 3.0])
    np.testing.assert_array_equal(scaled["c"]["w"], 2.0 * PARAMS["c"]["w"])


def test_zero_units_drops_nan_and_keeps_dtype():
    partition = ot.make_partition(PARAMS)
    poisoned = {**PARAMS, "s": jnp.full((4, 5), jnp.nan, jnp.bfloat16)}
    zeroed = ot.zero_units(partition, poisoned, jnp.array([False, False, True]))
    assert zeroed["s"].dtype == jnp.bfloat16 and np.all(np.asarray(zeroed["s"]) == 0)
    np.testing.assert_array_equal(zeroed["c"]["w"], PARAMS["c"]["w"])


def test_bad_labels_raise_value_error():
    with pytest.raises(ValueError, match="units"):
        ot.make_partition(PARAMS, "everything")
    with pytest.raises(ValueError, match="axis 0"):
        ot.make_partition(PARAMS, lambda _: {"c": {"w": "c", "b": "c"}, "s": ["a", "b"]})
    with pytest.raises(ValueError, match="structure"):
        ot.make_partition(PARAMS, lambda _: {"c": "c", "s": "s", "x": "x"})
    partition = ot.make_partition(PARAMS)
    with pytest.raises(ValueError, match="structure"):
        ot.unit_norms(partition, {"s": jnp.ones(2)})


def test_a_pytree_without_leaves_has_no_units():
    # optax.tree.map_params initialises every transform on such a placeholder.
    for empty in ({}, (), {"a": {}}):
        partition = ot.make_partition(empty)
        assert partition.names == () and partition.num_units == 0
        assert ot.unit_norms(partition, empty).shape == (0,)


def test_complex_leaves_count_by_modulus():
    tree = {"z": jnp.array([[3 + 4j, 0], [1 - 2j, 2j]], jnp.complex64), "r": jnp.ones(2)}
    partition = ot.make_partition(tree, lambda _: {"z": ["z/0", "z/1"], "r": "r"})
    norms = ot.unit_norms(partition, tree)
    assert norms.dtype == jnp.float32
    # |3+4j| = 5; sqrt(|1-2j|^2 + |2j|^2) = 3; sqrt(2): integer trees, rtol EPS32.
    np.testing.assert_allclose(norms, [np.sqrt(2.0), 5.0, 3.0], rtol=EPS32)
    np.testing.assert_allclose(ot.global_norm(tree), np.sqrt(2.0 + 25.0 + 9.0), rtol=EPS32)
    scaled = ot.scale_units(partition, tree, jnp.array([1.0, 0.5, 2.0]))
    assert scaled["z"].dtype == jnp.complex64
    np.testing.assert_array_equal(scaled["z"], [[1.5 + 2j, 0], [2 - 4j, 4j]])


def test_leaves_labelled_none_belong_to_no_unit():
    labels = {"c": {"w": "c", "b": None}, "s": None}
    partition = ot.make_partition(PARAMS, lambda _: labels)
    assert partition.names == ("c",) and partition.num_units == 1
    assert partition.leaf_units == (None, 0, None)  # c/b, c/w, s in flattening order
    poisoned = {"c": {"w": PARAMS["c"]["w"], "b": jnp.full(2, jnp.nan)}, "s": PARAMS["s"]}
    # Not measured: only c/w counts, sum of squares 0 + 1 + ... + 25 = 55 (exact).
    np.testing.assert_allclose(ot.unit_norms(partition, poisoned), [np.sqrt(55.0)], rtol=EPS32)
    scaled = ot.scale_units(partition, poisoned, jnp.array([2.0]))
    zeroed = ot.zero_units(partition, poisoned, jnp.array([True]))
    for tree in (scaled, zeroed):  # unlabelled leaves pass through every operation
        np.testing.assert_array_equal(tree["c"]["b"], np.full(2, np.nan))
        np.testing.assert_array_equal(tree["s"], PARAMS["s"])
    np.testing.assert_array_equal(scaled["c"]["w"], 2.0 * PARAMS["c"]["w"])
    assert np.all(np.asarray(zeroed["c"]["w"]) == 0)
    assert ot.leaf_values(partition, jnp.array([7.0]))[0] is None
    # All None: no units, like a pytree without leaves.
    nothing = ot.make_partition(PARAMS, lambda p: jax.tree.map(lambda _: None, p))
    assert nothing.names == () and ot.unit_norms(nothing, PARAMS).shape == (0,)
    with pytest.raises(ValueError, match="None"):
        ot.make_partition(PARAMS, lambda _: {"c": {"w": "c", "b": "c"}, "s": ["a", None] * 2})
