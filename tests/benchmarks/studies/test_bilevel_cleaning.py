"""bilevel_cleaning on its tiny config: what it reports, and a resume after a kill."""

import json

import study_checks

from benchmarks.harness import reporting
from benchmarks.studies import bilevel_cleaning
from benchmarks.studies.bilevel_cleaning.report import time_to_target


def test_reports_every_method_and_resumes_bit_identically(tmp_path):
    config = study_checks.tiny("bilevel_cleaning")
    result, _ = study_checks.run_kept("bilevel_cleaning", config, tmp_path / "ck")
    summary = result["summary"]
    methods = summary["methods"]
    assert list(methods) == [*config.methods, "bros_r4_naive"]
    for m in methods.values():
        assert {"test_acc", "detect_f1", "peak_bytes", "step_time_s"} <= set(m)
    assert methods["no_cleaning"]["detect_f1"] is None and methods["oracle"]["detect_f1"] is None
    assert 0.0 <= methods["bros_r4"]["detect_f1"] <= 1.0
    assert methods["bros_r4_naive"]["test_acc"] is None  # memory columns only
    assert "memory_reduction_vs_ma_soba" in summary
    assert {"bros_r4_within_1pt_of_ma_soba", "bros_r4_time_ratio_ok"} <= set(summary["goal"])
    assert set(summary["time_to_target"]) == set(config.methods)
    for found in summary["time_to_target"].values():
        assert set(found) == {"steps", "seconds"}
    assert summary["target_val_acc"] == methods["ma_soba"]["val_acc"] - config.goal_accuracy_gap
    path = reporting.write_json(result, tmp_path / "cleaning.json")
    assert json.loads(path.read_text())["study"] == "bilevel_cleaning"
    assert bilevel_cleaning.plot(result, tmp_path / "cleaning.png").exists()
    text = bilevel_cleaning.table(result)
    assert all(name in text for name in methods)
    # Killed before the last two method x seed trainings were saved.
    study_checks.resumes_to_the_same_metrics(
        "bilevel_cleaning", config, tmp_path / "ck", result, lose=2
    )


def test_time_to_target_is_the_median_first_hit_over_seeds():
    # Hand-made curves: target 0.9 - 0.01 = 0.89. "fast" reaches it at steps 10, 20, 20
    # (median 20; 20 x 0.5 s = 10 s); "slow" on one seed of three (median: never).
    config = study_checks.tiny("bilevel_cleaning")
    config.goal_accuracy_gap = 0.01
    steps = [0, 10, 20, 30]
    curve = lambda accs: {"step": steps, "val_acc": accs}
    curves = {
        "ma_soba": [curve([0.1, 0.5, 0.8, 0.9])] * 3,
        "fast": [curve([0.1, 0.95, 0.95, 0.95]), curve([0.1, 0.5, 0.89, 0.9])] * 1
        + [curve([0.1, 0.2, 0.9, 0.7])],
        "slow": [curve([0.1, 0.2, 0.3, 0.95]), curve([0.1] * 4), curve([0.1] * 4)],
    }
    rows = {
        "ma_soba": {"val_acc": 0.9, "step_time_s": 1.0},
        "fast": {"val_acc": 0.7, "step_time_s": 0.5},
        "slow": {"val_acc": 0.1, "step_time_s": 0.5},
    }
    target, found = time_to_target(curves, rows, config)
    assert abs(target - 0.89) < 1e-12
    assert found["fast"] == {"steps": 20.0, "seconds": 10.0}
    assert found["slow"] == {"steps": None, "seconds": None}
    assert found["ma_soba"] == {"steps": 30.0, "seconds": 30.0}
