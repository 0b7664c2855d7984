"""Units helpers: regex, depth and stacked-axis partitions."""

import jax.numpy as jnp
import pytest

from optstab import tree as ot
from optstab import units

PARAMS = {
    "layer0": {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)},
    "layer1": {"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)},
    "blocks": {"w": jnp.zeros((4, 3, 3))},
    "head": jnp.zeros((3, 2)),
}


def test_by_regex_groups_with_backreferences_and_defaults():
    spec = units.by_regex({r"^(layer\d+)/": r"\1", r"^head": "out"})
    assert ot.make_partition(PARAMS, spec).names == ("blocks/w", "layer0", "layer1", "out")
    spec = units.by_regex({r"^layer": "dense"}, default="rest")
    assert ot.make_partition(PARAMS, spec).names == ("dense", "rest")


def test_by_depth_and_bad_depth():
    assert ot.make_partition(PARAMS, units.by_depth(1)).names == (
        "blocks",
        "head",
        "layer0",
        "layer1",
    )
    with pytest.raises(ValueError, match="depth"):
        units.by_depth(0)


def test_stacked_splits_only_matching_leaves():
    spec = units.stacked(r"^blocks/", units.by_depth(1))
    names = ot.make_partition(PARAMS, spec).names
    assert names == ("blocks/0", "blocks/1", "blocks/2", "blocks/3", "head", "layer0", "layer1")
    assert spec(PARAMS)["head"] == "head"


def test_named_labels_are_taken_as_given():
    labels = {"layer0": {"w": "a", "b": "a"}, "layer1": {"w": "a", "b": "a"}}
    labels |= {"blocks": {"w": "b"}, "head": "b"}
    assert ot.make_partition(PARAMS, units.named(labels)).names == ("a", "b")


def test_a_none_rule_leaves_leaves_out_of_every_unit():
    spec = units.by_regex({r"^(layer\d+)/w$": r"\1", r".": None})
    partition = ot.make_partition(PARAMS, spec)
    assert partition.names == ("layer0", "layer1")
    assert [partition.leaf_paths[i] for i, u in enumerate(partition.leaf_units) if u is None] == [
        "blocks/w",
        "head",
        "layer0/b",
        "layer1/b",
    ]
    # stacked keeps a leaf that its base leaves out of every unit out, unsplit.
    split = units.stacked(r"^blocks/", units.by_regex({r"^head": "head", r".": None}))
    assert ot.make_partition(PARAMS, split).names == ("head",)
