"""The lowprec_lm study: a tiny end-to-end run, its stress schedule and metrics, the
corpus, and data parallelism on 8 simulated devices (structure, never the figures)."""

import json
from pathlib import Path

import conformance as cf
import numpy as np
import pytest
from lowprec_tiny import tiny_config

from benchmarks import lm, lowprec_lm, reporting


def test_tiny_run_reports_every_method(tmp_path):
    config = tiny_config()
    config.methods = (
        "reference", "none", "zclip", "gnmr_precision", "oracle_precision", "gnmr_amax_precision"
    )  # fmt: skip
    result = lowprec_lm.run(config)
    summary = result["summary"]
    methods = summary["methods"]
    assert list(methods) == list(config.methods)
    for row in methods.values():
        assert {"val_loss", "gap_closed", "recovery_rate", "spikes"} <= set(row)
        assert np.isfinite(row["val_loss"]) and 0.0 <= row["recovery_rate"] <= 1.0
    assert methods["reference"]["recovery_rate"] == 1.0
    assert methods["none"]["recovery_rate"] == 0.0
    assert summary["reference_val_loss"] == methods["reference"]["val_loss"]
    assert summary["none_val_loss"] == methods["none"]["val_loss"]
    assert 0.0 < methods["oracle_precision"]["recovery_rate"] < 1.0
    assert set(summary["persistent"]["methods"]) == {"reference", "none", "gnmr_precision"}
    path = reporting.write_json(result, tmp_path / "lowprec.json")
    assert json.loads(path.read_text())["summary"]["methods"].keys() == methods.keys()
    assert lowprec_lm.plot(result, tmp_path / "lowprec.png").exists()
    assert "gnmr_precision" in lowprec_lm.table(result)


def test_reference_ignores_the_outliers():
    """The float32 reference never sees the bursts: with and without them it trains the
    same bits, which is why the persistent regime reuses the bursts regime's run."""
    config = tiny_config()
    corpus = lm.stdlib_corpus(config.val_fraction)
    val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
    quant = lowprec_lm.lowprec.quant_config(**config.quant)
    runs = [
        lowprec_lm.train_method(
            "reference", config, quant, lowprec_lm.make_inputs(config, corpus, bursts), val
        )
        for bursts in (True, False)
    ]
    np.testing.assert_array_equal(runs[0]["val_curve"], runs[1]["val_curve"])
    np.testing.assert_array_equal(runs[0]["loss"], runs[1]["loss"])


def test_burst_schedule_is_seeded_and_within_bounds():
    config = tiny_config()
    config.num_steps = 400
    a, b = lowprec_lm.burst_schedule(config, 0), lowprec_lm.burst_schedule(config, 0)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.layer, lowprec_lm.burst_schedule(config, 1).layer)
    on = a.layer >= 0
    assert on.any() and not on[: config.burst_start].any()
    assert np.all((a.alpha[on] >= config.alpha_min) & (a.alpha[on] <= config.alpha_max))
    assert np.all(a.alpha[~on] == 1.0)
    # Each burst (a run of constant layer and alpha) lasts burst_length steps.
    change = np.flatnonzero((np.diff(a.layer) != 0) | (np.diff(a.alpha) != 0)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(a.layer)]])
    low, high = config.burst_length
    bursts = [(s, e) for s, e in zip(starts, ends, strict=True) if a.layer[s] >= 0]
    assert len(bursts) > 2
    for start, end in bursts[:-1]:
        assert low <= end - start <= high
    first = bursts[0][0]
    vectors = lowprec_lm.outlier_vectors(config, a.layer[first], a.channels[first], 7.0)
    hit = lm.layer_paths(config.depth)[a.layer[first]]
    for path, vector in vectors.items():
        expected = config.burst_channels if path == hit else 0
        assert int(np.sum(np.asarray(vector) == 7.0)) == expected


def test_oracle_mask_covers_the_burst_and_the_scale_lag():
    layer = np.array([-1, 2, 2, -1, -1, -1, 0, -1])
    mask = lowprec_lm.oracle_mask(layer, num_layers=3, lag=2)
    expected = np.zeros((8, 3), bool)
    expected[2:5, 2] = True  # one step late, and 2 steps of lag after the burst ends
    expected[7:8, 0] = True
    np.testing.assert_array_equal(mask, expected)


def test_count_spikes_counts_runs_once():
    loss = np.ones(40)
    loss[25:28] = 3.0  # one run of three steps
    loss[33] = np.nan  # a non-finite step counts
    assert lowprec_lm.count_spikes(loss, window=20, factor=1.5) == 2
    assert lowprec_lm.count_spikes(np.ones(40), window=20, factor=1.5) == 0


def test_gap_closed():
    assert lowprec_lm.gap_closed(2.0, none=3.0, reference=1.0) == 0.5
    assert lowprec_lm.gap_closed(3.5, none=3.0, reference=1.0) == -0.25
    assert lowprec_lm.gap_closed(float("inf"), none=3.0, reference=1.0) is None
    assert lowprec_lm.gap_closed(2.0, none=float("inf"), reference=1.0) == 1.0
    assert lowprec_lm.gap_closed(2.0, none=1.0, reference=1.0) is None


def test_corpus_is_offline_and_split():
    corpus = lm.stdlib_corpus(0.1)
    total = len(corpus.train) + len(corpus.val)
    assert total > 500_000 and abs(len(corpus.val) / total - 0.1) < 1e-3
    assert len(corpus.sha256) == 64
    with pytest.raises(ValueError, match="val_fraction"):
        lm.stdlib_corpus(1.0)


def test_unknown_method_is_rejected():
    config = tiny_config()
    config.methods = ("reference", "none", "adam_but_better")
    with pytest.raises(ValueError, match="adam_but_better"):
        lowprec_lm.run(config)


WORKER = Path(__file__).resolve().parent / "_lowprec_sharded_worker.py"


def test_data_parallel_matches_one_device(tmp_path):
    r = cf.run_on_eight_devices(WORKER, tmp_path / "lowprec_sharded.npz", timeout=600)
    if "error" in r:
        pytest.fail(f"8-device worker raised:\n{r['error']}", pytrace=False)
    for name in ("none", "gnmr_precision"):
        for key in ("val_curve", "loss"):
            # Not bit-exact: the sharded batch mean sums per-device partial sums.
            np.testing.assert_allclose(
                r[f"{name}/sharded/{key}"], r[f"{name}/single/{key}"], rtol=2e-4, err_msg=key
            )
        np.testing.assert_array_equal(
            r[f"{name}/sharded/high_precision"], r[f"{name}/single/high_precision"]
        )
    assert int(r["fsdp/split_leaves"]) >= 4  # the block's four 64 x 256 / 256 x 64 kernels
    np.testing.assert_allclose(r["fsdp/sharded/val_curve"], r["fsdp/single/val_curve"], rtol=2e-4)


@pytest.mark.parametrize(
    "quant",
    [
        {"fmt": "float8_e4m3", "scaling": "per_token", "scale_mode": "current",
         "rounding": "stochastic", "backward_fmt": "float8_e5m2"},
        {"fmt": "float4_e2m1", "scaling": "per_tensor", "scale_mode": "delayed",
         "rounding": "nearest", "backward_fmt": None},
    ],
)  # fmt: skip
def test_stress_knobs_run_through_the_study(quant):
    """Other formats, scalings, rounding and a low-precision backward pass train finite
    and stay reproducible (same seed, same bits)."""
    config = tiny_config()
    config.quant.update(quant)
    corpus = lm.stdlib_corpus(config.val_fraction)
    val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
    inputs = lowprec_lm.make_inputs(config, corpus, bursts=True)
    q = lowprec_lm.lowprec.quant_config(**config.quant)
    runs = [lowprec_lm.train_method("gnmr_precision", config, q, inputs, val) for _ in range(2)]
    assert np.all(np.isfinite(runs[0]["loss"]))
    np.testing.assert_array_equal(runs[0]["loss"], runs[1]["loss"])
    np.testing.assert_array_equal(runs[0]["val_curve"], runs[1]["val_curve"])
