"""Smoke tests of the studies on tiny configs: they run, report and write what they say.

They assert the structure of results, not the figures: the figures come from
``make bench`` and are reported, never asserted by tests.
"""

import json
import subprocess
import sys

import numpy as np

from benchmarks import overhead, reporting, spike_injection
from configs import overhead as overhead_config
from configs import spike_injection as spike_config


def test_spike_injection_runs_on_a_tiny_config(tmp_path):
    config = spike_config.get_config("quick")
    config.methods = ("clean", "none", "clip_by_global_norm", "gnmr_clip", "gnmr_skip_budget2")
    config.num_seeds, config.num_steps, config.spike_start = 2, 60, 10
    config.hidden = (16,)
    result = spike_injection.run(config)
    methods = result["summary"]["methods"]
    assert set(methods) == set(config.methods)
    assert methods["none"]["spikes_injected"] > 0 and methods["clean"]["spikes_injected"] == 0
    assert 0.0 <= methods["gnmr_clip"]["recovery_rate"] <= 1.0
    assert all(0.0 <= m["test_acc"] <= 1.0 for m in methods.values())
    path = reporting.write_json(result, tmp_path / "spike.json")
    assert json.loads(path.read_text())["summary"]["methods"].keys() == methods.keys()
    assert spike_injection.plot(result, tmp_path / "spike.png").exists()
    assert "gnmr_clip" in spike_injection.table(result)


def test_overhead_reports_ratios_against_adamw(tmp_path):
    config = overhead_config.get_config("quick")
    config.methods = ("adamw", "gnmr_chain", "gnmr_wrap")
    config.sizes, config.batch_size = (32, 64, 10), 8
    config.warmup_rounds, config.step_repeats, config.update_repeats = 1, 2, 2
    result = overhead.run(config)
    summary = result["summary"]
    assert summary["time_ratio"]["adamw"] == 1.0 and summary["memory_ratio"]["adamw"] == 1.0
    assert np.isfinite(summary["memory_ratio"]["gnmr_wrap"])
    assert summary["memory_ratio"]["gnmr_wrap"] >= summary["memory_ratio"]["gnmr_chain"]
    assert overhead.plot(result, tmp_path / "overhead.png").exists()


def test_cli_rejects_an_unknown_study_in_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "nonsense"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "unknown study" in done.stderr


def test_perturbed_sgd_reports_every_statement(tmp_path):
    from benchmarks import perturbed_sgd
    from configs import perturbed_sgd as perturbed_config

    config = perturbed_config.get_config("quick")
    config.num_seeds, config.num_operators, config.probe_keys, config.probe_batch = 2, 3, 2, 8
    config.rate_steps, config.rate_seeds, config.optimum_steps = 300, 2, 300
    config.plateau_sizes, config.plateau_window = (0.1, 0.4), 20
    config.spike_steps, config.spike_t0, config.spike_sizes = 200, 20, (1.0, 10.0, 100.0)
    config.threshold_steps, config.threshold_sizes = 60, (0.5, 2.0)
    config.timing_repeats = 3
    result = perturbed_sgd.run(config)
    statements = result["summary"]["statements"]
    assert [s["id"] for s in statements] == [0, 1, 2, 3, 4, 5, 6, "7a", "7b"]
    for s in statements:
        assert set(s) == {"id", "claim", "measured", "expected", "passed"}
        assert isinstance(s["passed"], bool)
    # Statement 1 is exact on any problem: later blocks compare equal bit for bit.
    assert statements[1]["measured"]["later_blocks_exactly_unchanged"] is True
    assert statements[0]["measured"]["identity_bits"] is True
    path = reporting.write_json(result, tmp_path / "perturbed_sgd.json")
    assert len(json.loads(path.read_text())["summary"]["statements"]) == 9
    assert perturbed_sgd.plot(result, tmp_path / "perturbed_sgd.png").exists()
    assert "statements pass" in perturbed_sgd.table(result)


def test_bilevel_cleaning_runs_on_a_tiny_config(tmp_path):
    from benchmarks import bilevel_cleaning
    from configs import bilevel_cleaning as cleaning_config

    config = cleaning_config.get_config("quick")
    config.methods = ("no_cleaning", "oracle", "ma_soba", "bros_r4")
    config.memory_only_methods = ("bros_r4_naive",)
    config.hidden, config.num_seeds, config.num_steps, config.eval_every = (16, 16), 2, 6, 3
    config.warmup_rounds, config.step_repeats = 0, 1
    result = bilevel_cleaning.run(config)
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


def test_bilevel_memory_runs_on_a_tiny_config(tmp_path):
    from benchmarks import bilevel_memory
    from configs import bilevel_memory as memory_config

    config = memory_config.get_config("quick")
    config.widths, config.batch_size = (16,), 4
    config.batches, config.batch_width = (4, 8), 16
    config.ranks, config.naive_ranks, config.time_naive = (4,), (4,), True
    config.warmup_rounds, config.step_repeats = 0, 1
    result = bilevel_memory.run(config)
    summary = result["summary"]
    points = summary["points"]
    assert [(p["width"], p["batch"], p["sweeps"]) for p in points] == [
        (16, 4, ["width", "batch"]),
        (16, 8, ["batch"]),
    ]
    for point in points:
        assert list(point["methods"]) == ["ma_soba", "bros_r4", "bros_r4_naive"]
        assert point["methods"]["ma_soba"]["bytes_ratio"] == 1.0
    assert set(summary["largest_config_reduction"]) == {"bros_r4", "bros_r4_naive"}
    assert {"bros_r4_saves_45pct_at_largest", "bros_r4_time_ratio_ok_at_largest"} <= set(
        summary["goal"]
    )
    assert bilevel_memory.plot(result, tmp_path / "memory.png").exists()
    text = bilevel_memory.table(result)
    assert "bros_r4_naive" in text and "ma_soba" in text
