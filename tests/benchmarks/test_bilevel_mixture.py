"""Smoke test of the data-mixture study on a tiny config: structure only, no figures."""

import json

import numpy as np

from benchmarks import bilevel_mixture, reporting
from configs import bilevel_mixture as mixture_config


def test_bilevel_mixture_runs_on_a_tiny_config(tmp_path):
    config = mixture_config.get_config("quick")
    config.methods = ("uniform", "oracle_clean", "soba", "ma_soba", "bros_r4")
    config.num_seeds, config.num_steps, config.record_every = 2, 12, 4
    config.hidden, config.batch_size, config.outer_batch_size = (16,), 8, 8
    result = bilevel_mixture.run(config)

    assert {"study", "config", "environment", "summary"} <= set(result)
    summary = result["summary"]
    assert [d["spec"] for d in summary["domains"]] == list(config.domains)
    methods = summary["methods"]
    assert set(methods) == set(config.methods)
    num_domains = len(config.domains)
    for m in methods.values():
        assert {"target_acc", "mixture", "clean_weight", "mixture_per_seed"} <= set(m)
        assert 0.0 <= m["target_acc"] <= 1.0
        assert len(m["mixture"]) == num_domains
        assert np.isclose(sum(m["mixture"]), 1.0, atol=1e-5)
        per_seed = np.asarray(m["mixture_per_seed"])
        assert per_seed.shape == (config.num_seeds, num_domains)
        assert np.allclose(per_seed.sum(axis=1), 1.0, atol=1e-5)
    assert methods["oracle_clean"]["mixture"] == [1.0] + [0.0] * (num_domains - 1)
    curve = np.asarray(result["raw"]["ma_soba"]["mixture_curve"])
    assert curve.shape == (config.num_seeds, config.num_steps // config.record_every, num_domains)

    path = reporting.write_json(result, tmp_path / "mixture.json")
    assert json.loads(path.read_text())["summary"]["methods"].keys() == methods.keys()
    assert bilevel_mixture.plot(result, tmp_path / "mixture.png").exists()
    text = bilevel_mixture.table(result)
    assert all(name in text for name in config.methods)
