"""The method registry: every name builds, hyperparameters come from the config, the
library's own errors fire at construction, and the bilevel names parse."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax
import pytest

from benchmarks.problems import methods
from configs import lowprec_lm, spike_injection


@pytest.mark.parametrize("name", list(methods.RECIPES))
def test_every_method_builds_and_updates(name):
    config = spike_injection.get_config("tiny")
    method = methods.optimizer(name, config, clip_norm=1.0)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    tx = method.transform
    # An external-signal GNMR needs a value per unit (one unit per leaf by default).
    extra = {"unit_signal": {"w": 1.0, "b": 1.0}} if methods.watches_external(name) else {}
    updates, _ = tx.update(params, tx.init(params), params, **extra)
    assert jax_tree_finite(updates)
    assert methods.watches_external(name) == name.endswith(("_external", "_both"))


def jax_tree_finite(tree) -> bool:
    import jax

    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


def test_config_groups_reach_the_transforms():
    config = spike_injection.get_config("tiny")
    config.gnmr.threshold = -1.0
    with pytest.raises(ValueError, match="threshold"):
        methods.optimizer("gnmr_clip", config)
    with pytest.raises(ValueError, match="threshold"):  # the wrapper form too
        methods.optimizer("gnmr_skip_budget2", config)
    config = spike_injection.get_config("tiny")
    config.zclip.alpha = 2.0
    with pytest.raises(ValueError, match="alpha"):
        methods.optimizer("zclip", config)


def test_roles_and_gnmr_names():
    config = lowprec_lm.get_config("tiny")
    roles = {"reference": "adamw"}
    assert methods.optimizer("reference", config, roles=roles).pre is None
    with pytest.raises(ValueError, match="unknown method 'reference'"):
        methods.optimizer("reference", config)
    gnmr = {name for name in methods.RECIPES if methods.uses_gnmr(name)}
    assert gnmr == {name for name in methods.RECIPES if name.startswith("gnmr")}
    assert not set(methods.PEERS) & gnmr


def test_adamw_takes_only_the_settings_a_config_has():
    bare = ml_collections.ConfigDict({"learning_rate": 0.1, "weight_decay": 0.0})
    full = ml_collections.ConfigDict(
        {"learning_rate": 0.1, "weight_decay": 0.0, "b1": 0.9, "b2": 0.999, "eps": 1e-8}
    )
    params = {"w": jnp.linspace(-1.0, 1.0, 5)}
    grads = {"w": jnp.linspace(0.5, -0.3, 5)}
    # optax's defaults are b1 0.9, b2 0.999, eps 1e-8: both configs give its updates.
    want, _ = optax.adamw(0.1, weight_decay=0.0).update(
        grads, optax.adamw(0.1).init(params), params
    )
    for config in (bare, full):
        tx = methods.adamw(config)
        got, _ = tx.update(grads, tx.init(params), params)
        assert bool(jnp.all(got["w"] == want["w"]))


def test_bilevel_names():
    assert methods.bros_rank("bros_r16") == 16 and methods.bros_rank("bros_r16_naive") == 16
    assert methods.bros_rank("ma_soba") is None
    assert methods.bros_names([4, 8], naive=True) == ["bros_r4_naive", "bros_r8_naive"]
    methods.check_bilevel(["soba", "ma_soba", "bros_r4", "oracle"], baselines=("oracle",))
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        methods.check_bilevel(["sgd"])
    with pytest.raises(ValueError, match="cannot read a rank"):
        methods.check_bilevel(["bros_rx"])
