"""bilevel_mixture on its tiny config: learned mixtures, a resume after a kill, and the
same numbers on 8 simulated devices as on one."""

import json

import numpy as np
import study_checks

from benchmarks.harness import reporting
from benchmarks.studies import bilevel_mixture


def test_reports_mixtures_and_resumes_bit_identically(tmp_path):
    config = study_checks.tiny("bilevel_mixture")
    result, _ = study_checks.run_kept("bilevel_mixture", config, tmp_path / "ck")
    summary = result["summary"]
    assert [d["spec"] for d in summary["domains"]] == list(config.domains)
    methods = summary["methods"]
    assert list(methods) == list(config.methods)
    num_domains = len(config.domains)
    for m in methods.values():
        assert {"target_acc", "mixture", "clean_weight", "mixture_per_seed"} <= set(m)
        assert 0.0 <= m["target_acc"] <= 1.0
        # The summary's mixture is renormalised in float64: it sums to 1 to ~1e-16.
        assert np.isclose(sum(m["mixture"]), 1.0, rtol=0, atol=1e-12)
        # Each seed's is a float32 softmax over K = 4 domains: its sum is within about
        # K u = 4 * 6e-8 of 1 (one rounding per exp ratio and per addition).
        per_seed = np.asarray(m["mixture_per_seed"])
        assert per_seed.shape == (config.num_seeds, num_domains)
        assert np.allclose(per_seed.sum(axis=1), 1.0, rtol=0, atol=4 * num_domains * 6e-8)
    assert methods["oracle_clean"]["mixture"] == [1.0] + [0.0] * (num_domains - 1)
    curve = np.asarray(result["raw"]["ma_soba"]["mixture_curve"])
    assert curve.shape == (config.num_seeds, config.num_steps // config.record_every, num_domains)
    # One compiled job per function: the baselines together, SOBA with MA-SOBA.
    assert list(result["timing_s"]["stages"]) == ["uniform+oracle_clean", "soba+ma_soba", "bros_r4"]
    path = reporting.write_json(result, tmp_path / "mixture.json")
    assert json.loads(path.read_text())["summary"]["methods"].keys() == methods.keys()
    assert bilevel_mixture.plot(result, tmp_path / "mixture.png").exists()
    assert all(name in bilevel_mixture.table(result) for name in config.methods)
    # Killed before the last two jobs (soba+ma_soba, bros_r4) were saved.
    study_checks.resumes_to_the_same_metrics(
        "bilevel_mixture", config, tmp_path / "ck", result, lose=2
    )


def curves_of(result: dict) -> dict:
    """Pops the rounded per-record curves out of a mixture result."""
    return {
        name: {key: raw.pop(key) for key in ("mixture_curve", "val_loss_curve")}
        for name, raw in result["raw"].items()
    }


def test_eight_devices_match_one(tmp_path):
    sharded, single = study_checks.eight_device_results("bilevel_mixture", tmp_path / "m.json")
    curves = [curves_of(result) for result in (sharded, single)]
    # Sharding a minibatch over 8 devices only changes the order in which its per-example
    # losses and gradients are summed (n = 8 per domain, 8 outer): each sum moves by at
    # most 2 (n - 1) u = 8.4e-7 relative (u = 6e-8), and over these T = 12 steps, if the
    # updates do not expand differences, by at most T times that: 1e-5. A wrong shard
    # or a dropped example moves these figures by percents.
    study_checks.assert_same(sharded, single, rtol=1e-5, atol=1e-7)
    # The curves are written rounded to 4 (mixture) or 5 (loss) significant digits, so a
    # difference of 1e-5 can move the last stored digit by one unit (1e-3 relative for
    # 4 digits): 2e-3.
    study_checks.assert_same(*curves, rtol=2e-3, atol=1e-7)
