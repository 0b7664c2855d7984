"""Plain results stored through optstab.checkpoint and read back without a target:
containers, dict key order, leaf types and dtypes, bit for bit; atomic steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.harness import store


def test_plain_containers_round_trip_without_a_target(tmp_path):
    value = {
        "curves": {"loss": np.arange(6, dtype=np.float32).reshape(2, 3), "empty": np.zeros((0, 2))},
        "runs": [1.5, 2, True, (jnp.ones(2, jnp.bfloat16), None)],
        "scalar": np.float64(0.1),
        "counts": np.arange(3, dtype=np.int64),
    }
    store.save(tmp_path, 0, value)
    restored = store.restore(tmp_path)
    assert jax.tree.structure(restored) == jax.tree.structure(value)
    assert restored["runs"][:3] == [1.5, 2, True]
    assert [type(v) for v in restored["runs"][:3]] == [float, int, bool]
    assert isinstance(restored["runs"][3], tuple) and restored["runs"][3][1] is None
    bf16 = restored["runs"][3][0]  # a jax array comes back as numpy, its dtype kept
    assert isinstance(bf16, np.ndarray) and bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored["curves"]["loss"], value["curves"]["loss"])
    assert restored["curves"]["empty"].shape == (0, 2)
    assert type(restored["scalar"]) is np.float64 and restored["scalar"] == value["scalar"]
    assert restored["counts"].dtype == np.int64


def test_dict_key_order_is_kept(tmp_path):
    value = {"zeta": 1.0, "alpha": {"b": np.ones(2), "a": 2}, "mid": [3]}
    store.save(tmp_path, 0, value)
    restored = store.restore(tmp_path, 0)
    assert list(restored) == ["zeta", "alpha", "mid"]
    assert list(restored["alpha"]) == ["b", "a"]


def test_only_plain_values_are_stored(tmp_path):
    assert store.is_plain({"x": [np.ones(2), 3, None]})
    for value in ({"name": "adam"}, {1: np.ones(2)}, optax.adam(0.1).init(jnp.zeros(2)),
                  {"key": jax.random.key(0)}):  # fmt: skip
        assert not store.is_plain(value)
        with pytest.raises(TypeError, match="no strings"):
            store.save(tmp_path / "bad", 0, value)
    assert store.latest_step(tmp_path / "bad") is None


def test_keep_prunes_steps_and_their_indexes(tmp_path):
    for step in (1, 2, 3):
        store.save(tmp_path, step, [np.full(2, step)], keep=2)
    assert store.all_steps(tmp_path) == [2, 3] and store.latest_step(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.glob("index-*.json")) == [
        "index-2.json",
        "index-3.json",
    ]
    np.testing.assert_array_equal(store.restore(tmp_path, 2)[0], [2, 2])


def test_an_index_without_leaves_is_no_step(tmp_path):
    """A run killed between the index and the leaves: the step does not exist, and
    saving it again works."""
    (tmp_path / "index-0.json").write_text('{"structure": {"list": []}, "leaves": []}')
    assert store.latest_step(tmp_path) is None
    with pytest.raises(FileNotFoundError):
        store.restore(tmp_path)
    store.save(tmp_path, 0, {"a": 1.0})
    assert store.restore(tmp_path) == {"a": 1.0}
