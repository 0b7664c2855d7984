"""bilevel_cleaning on its tiny config: what it reports, and a resume after a kill."""

import json

import study_checks

from benchmarks.harness import reporting
from benchmarks.studies import bilevel_cleaning


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
    path = reporting.write_json(result, tmp_path / "cleaning.json")
    assert json.loads(path.read_text())["study"] == "bilevel_cleaning"
    assert bilevel_cleaning.plot(result, tmp_path / "cleaning.png").exists()
    text = bilevel_cleaning.table(result)
    assert all(name in text for name in methods)
    # Killed before the last two method x seed trainings were saved.
    study_checks.resumes_to_the_same_metrics(
        "bilevel_cleaning", config, tmp_path / "ck", result, lose=2
    )
