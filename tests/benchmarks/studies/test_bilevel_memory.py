"""bilevel_memory on its tiny config: both sweeps, ratios against MA-SOBA, a resume."""

import study_checks

from benchmarks.studies import bilevel_memory


def test_reports_both_sweeps_and_resumes_bit_identically(tmp_path):
    config = study_checks.tiny("bilevel_memory")
    result, _ = study_checks.run_kept("bilevel_memory", config, tmp_path / "ck")
    summary = result["summary"]
    points = summary["points"]
    assert [(p["width"], p["batch"], p["sweeps"]) for p in points] == [
        (16, 8, ["width", "batch"]),
        (16, 16, ["batch"]),
    ]
    for point in points:
        assert list(point["methods"]) == ["ma_soba", "bros_r4", "bros_r4_naive"]
        assert point["methods"]["ma_soba"]["bytes_ratio"] == 1.0
    assert set(summary["largest_config_reduction"]) == {"bros_r4", "bros_r4_naive"}
    goals = {"bros_r4_saves_45pct_at_largest", "bros_r4_time_ratio_ok_at_largest"}
    assert goals <= set(summary["goal"])
    assert bilevel_memory.plot(result, tmp_path / "memory.png").exists()
    text = bilevel_memory.table(result)
    assert "bros_r4_naive" in text and "ma_soba" in text
    # Killed before the second point was saved: only it is measured again.
    study_checks.resumes_to_the_same_metrics(
        "bilevel_memory", config, tmp_path / "ck", result, lose=1
    )
