"""spike_injection on its tiny config: what it reports, a resume after a kill, and the
same numbers on 8 simulated devices as on one (structure and agreement, never figures:
those come from ``make bench``)."""

import json

import pytest
import study_checks

from benchmarks.harness import reporting
from benchmarks.studies import spike_injection


def test_reports_every_method_and_resumes_bit_identically(tmp_path):
    config = study_checks.tiny("spike_injection")
    result, _ = study_checks.run_kept("spike_injection", config, tmp_path / "ck")
    methods = result["summary"]["methods"]
    assert list(methods) == list(config.methods)  # clean first: the clip bound needs it
    assert methods["none"]["spikes_injected"] > 0 and methods["clean"]["spikes_injected"] == 0
    assert 0.0 <= methods["gnmr_clip"]["recovery_rate"] <= 1.0
    assert all(0.0 <= m["test_acc"] <= 1.0 for m in methods.values())
    assert result["summary"]["clip_norm"] > 0
    assert set(result["timing_s"]["stages"]) == set(config.methods)
    path = reporting.write_json(result, tmp_path / "spike.json")
    assert json.loads(path.read_text())["summary"]["methods"].keys() == methods.keys()
    assert spike_injection.plot(result, tmp_path / "spike.png").exists()
    assert "gnmr_clip" in spike_injection.table(result)
    # Killed before clip_by_global_norm, gnmr_clip and gnmr_skip_budget2 were saved: the
    # rerun restores clean and none (and with clean the clip bound) and trains the rest.
    study_checks.resumes_to_the_same_metrics(
        "spike_injection", config, tmp_path / "ck", result, lose=3
    )


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path):
    sharded, single = study_checks.eight_device_results("spike_injection", tmp_path / "s.json")
    # Sharding a step's minibatch over 8 devices changes only the order in which its
    # n = 64 per-example losses and gradients are summed. Each way of summing is within
    # (n - 1) u sum|x_i| of the exact sum (u = 2^-24, float32's unit roundoff), so the
    # two differ by at most 2 (n - 1) u = 7.5e-6 relative for terms of one sign. If the
    # training map does not expand such differences (AdamW's step is bounded per element
    # and the loss is smooth), the T = 60 steps add them: 60 * 7.5e-6 = 4.5e-4, hence
    # rtol 5e-4 on the medians and losses. Counts (spikes injected and caught, recovered
    # unit-steps, divergences) and the spike schedule (drawn from the seed alone) are
    # integers and must agree exactly. atol covers goal gaps that are differences of
    # nearly equal accuracies.
    study_checks.assert_same(sharded["summary"], single["summary"], rtol=5e-4, atol=1e-6)
    # Per-step curves are stored rounded to 5 significant digits: rounding two values
    # that differ by 5e-4 relative can move the stored digits by one more unit of the
    # fifth digit (at most 1e-4 relative), so 1e-3.
    study_checks.assert_same(sharded["raw"], single["raw"], rtol=1e-3, atol=1e-6)
