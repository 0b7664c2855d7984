"""overhead on its tiny config: ratios against adamw, and the same compiled bytes with
checkpoints (kept or through ``run(checkpoint_dir=...)``) as without."""

import numpy as np
import study_checks

from benchmarks.harness import compare
from benchmarks.studies import overhead


def test_ratios_against_adamw_and_the_same_bytes_with_checkpoints(tmp_path):
    config = study_checks.tiny("overhead")
    kept, _ = study_checks.run_kept("overhead", config, tmp_path / "kept")
    summary = kept["summary"]
    assert summary["time_ratio"]["adamw"] == 1.0 and summary["memory_ratio"]["adamw"] == 1.0
    assert np.isfinite(summary["memory_ratio"]["gnmr_wrap"])
    # gnmr_wrap keeps AdamW's state inside its own and selects per unit: never fewer bytes
    assert summary["memory_ratio"]["gnmr_wrap"] >= summary["memory_ratio"]["gnmr_chain"]
    assert len(kept["raw"]["step_times_s"]["adamw"]) == config.step_repeats
    assert set(kept["timing_s"]["stages"]) == {"step_times", "update_times"}
    assert overhead.plot(kept, tmp_path / "overhead.png").exists()
    assert "gnmr_wrap" in overhead.table(kept)
    # The public entry point with a directory: checkpoints while it runs, none after.
    plain = overhead.run(config, checkpoint_dir=tmp_path / "ck", mesh=None)
    assert not (tmp_path / "ck").exists()
    # What is left without timings: compiled bytes, parameter count, memory goals.
    assert compare.metrics(plain)["summary"]["memory_bytes"]
    study_checks.assert_same(compare.metrics(plain), compare.metrics(kept))
