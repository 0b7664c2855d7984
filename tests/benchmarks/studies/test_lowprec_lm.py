"""lowprec_lm: a tiny end-to-end run, its stress schedule and metrics, and data
parallelism and FSDP on 8 simulated devices (structure and agreement, never the figures)."""

import json
from pathlib import Path

import conformance as cf
import numpy as np
import pytest
import study_checks

from benchmarks.harness import reporting
from benchmarks.problems import lm
from benchmarks.studies import lowprec_lm
from benchmarks.studies.lowprec_lm import analysis, stress, train
from optstab import lowprec


def tiny_inputs(config, bursts=True):
    corpus = lm.stdlib_corpus(config.val_fraction)
    val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
    return stress.make_inputs(config, corpus, bursts), val


def test_tiny_run_reports_every_method(tmp_path):
    config = study_checks.tiny("lowprec_lm")
    result = lowprec_lm.run(config, mesh=None)
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
    assert result["study"] == "lowprec_lm" and "lock_sha256" in result["environment"]
    path = reporting.write_json(result, tmp_path / "lowprec.json")
    assert json.loads(path.read_text())["summary"]["methods"].keys() == methods.keys()
    assert lowprec_lm.plot(result, tmp_path / "lowprec.png").exists()
    assert "gnmr_precision" in lowprec_lm.table(result)


def test_reference_ignores_the_outliers():
    """The float32 reference never sees the bursts: with and without them it trains the
    same bits, which is why the persistent regime reuses the bursts regime's run."""
    config = study_checks.tiny("lowprec_lm")
    quant = lowprec.quant_config(**config.quant)
    runs = []
    for bursts in (True, False):
        inputs, val = tiny_inputs(config, bursts)
        runs.append(train.train_method("reference", config, quant, inputs, val, mesh=None))
    np.testing.assert_array_equal(runs[0]["val_curve"], runs[1]["val_curve"])
    np.testing.assert_array_equal(runs[0]["loss"], runs[1]["loss"])


def test_burst_schedule_is_seeded_and_within_bounds():
    config = study_checks.tiny("lowprec_lm", num_steps=400)
    a, b = stress.burst_schedule(config, 0), stress.burst_schedule(config, 0)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.layer, stress.burst_schedule(config, 1).layer)
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
    vectors = stress.outlier_vectors(config, a.layer[first], a.channels[first], 7.0)
    hit = lm.layer_paths(config.depth)[a.layer[first]]
    for path, vector in vectors.items():
        expected = config.burst_channels if path == hit else 0
        assert int(np.sum(np.asarray(vector) == 7.0)) == expected


def test_oracle_mask_covers_the_burst_and_the_scale_lag():
    layer = np.array([-1, 2, 2, -1, -1, -1, 0, -1])
    mask = stress.oracle_mask(layer, num_layers=3, lag=2)
    expected = np.zeros((8, 3), bool)
    expected[2:5, 2] = True  # one step late, and 2 steps of lag after the burst ends
    expected[7:8, 0] = True
    np.testing.assert_array_equal(mask, expected)


def test_count_spikes_counts_runs_once():
    loss = np.ones(40)
    loss[25:28] = 3.0  # one run of three steps
    loss[33] = np.nan  # a non-finite step counts
    assert analysis.count_spikes(loss, window=20, factor=1.5) == 2
    assert analysis.count_spikes(np.ones(40), window=20, factor=1.5) == 0


def test_gap_closed():
    assert analysis.gap_closed(2.0, none=3.0, reference=1.0) == 0.5
    assert analysis.gap_closed(3.5, none=3.0, reference=1.0) == -0.25
    assert analysis.gap_closed(float("inf"), none=3.0, reference=1.0) is None
    assert analysis.gap_closed(2.0, none=float("inf"), reference=1.0) == 1.0
    assert analysis.gap_closed(2.0, none=1.0, reference=1.0) is None


def test_unknown_method_is_rejected_before_anything_runs():
    config = study_checks.tiny("lowprec_lm", methods=("reference", "none", "adam_but_better"))
    with pytest.raises(ValueError, match="adam_but_better"):
        lowprec_lm.STUDY.check(config, None)


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
    config = study_checks.tiny("lowprec_lm")
    config.quant.update(quant)
    inputs, val = tiny_inputs(config)
    q = lowprec.quant_config(**config.quant)
    model = train.model_fns(config, q)
    runs = [
        train.train_method("gnmr_precision", config, q, inputs, val, mesh=None, model=model)
        for _ in range(2)
    ]
    assert np.all(np.isfinite(runs[0]["loss"]))
    np.testing.assert_array_equal(runs[0]["loss"], runs[1]["loss"])
    np.testing.assert_array_equal(runs[0]["val_curve"], runs[1]["val_curve"])


WORKER = Path(__file__).resolve().parents[1] / "_lowprec_sharded_worker.py"
U = 2.0**-24  # float32 unit roundoff


def traces(r: dict, label: str, name: str, key: str) -> list[np.ndarray]:
    """The sharded and the single-device trace (seeds, steps or evals)."""
    return [
        r[f"{label}/{name}/{where}/{key}"].astype(np.float64) for where in ("sharded", "single")
    ]


def within_quantization_effect(r: dict, label: str, name: str, key: str) -> None:
    """An int8 run on 8 devices against one (see the argument in the test)."""
    sharded, single = traces(r, label, name, key)
    effect = np.abs(single - traces(r, label, "reference", key)[1]).max()
    assert effect > 0, "the int8 run is the float32 run: nothing was quantized"
    assert np.abs(sharded - single).max() <= effect, (label, name, key)


def test_data_parallel_and_fsdp_match_one_device(tmp_path):
    r = cf.run_on_eight_devices(WORKER, tmp_path / "lowprec_sharded.npz", timeout=600)
    if "error" in r:
        pytest.fail(f"8-device worker raised:\n{r['error']}", pytrace=False)
    config = study_checks.tiny("lowprec_lm")
    tokens = config.batch_size * config.context  # the terms of one step's mean loss
    assert int(r["fsdp/split_leaves"]) >= 4  # embedding, head, and the 64 x 256 kernels
    # What sharding the batch changes: the order of the sums over the batch (the mean
    # loss, the gradient sums). The forward pass of each example is the same computation
    # (the per-tensor amax of a quantizer is a max, which is exact), so at step 0, before
    # any update, only the mean over the n = 128 tokens is reassociated: each order is
    # within (n - 1) u of the exact mean of these positive terms, the two within
    # 2 (n - 1) u = 1.5e-5 relative, int8 or not.
    step0 = 2 * (tokens - 1) * U
    for name in ("reference", "none"):
        sharded, single = traces(r, "dp", name, "loss")
        np.testing.assert_allclose(sharded[:, 0], single[:, 0], rtol=step0, err_msg=name)
    # float32 (reference): every step reassociates its sums again, and the validation
    # loss is a mean too. If training does not expand the differences (AdamW's step is
    # bounded per element), T steps add T times the per-step bound.
    float32_rtol = (config.num_steps + 1) * step0
    for key in ("loss", "val_curve"):
        np.testing.assert_allclose(*traces(r, "dp", "reference", key), rtol=float32_rtol)
    # int8: from step 1 on the parameters differ by reassociation, so an activation close
    # to a rounding boundary of its quantizer may round the other way: a change of one
    # quantization step (amax / 127) instead of a float32 ulp, which training then
    # carries (two to four orders of magnitude above the float32 difference). Both are still
    # int8 runs of the same model on the same data, differing only in which few values
    # rounded which way; so their difference cannot exceed what all the roundings did
    # together: the int8 run's largest distance from the float32 run.
    for key in ("loss", "val_curve"):
        within_quantization_effect(r, "dp", "none", key)
    # FSDP also splits large kernels: the down projection's contraction over its K
    # inputs becomes 8 partial sums, a reassociation of 2 (K - 1) u relative in its
    # outputs on top of the batch mean's (to first order the loss moves by no more).
    fsdp_step = step0 + 2 * (int(r["fsdp/mlp_width"]) - 1) * U
    for name in ("reference", "none"):
        sharded, single = traces(r, "fsdp", name, "loss")
        np.testing.assert_allclose(sharded[:, 0], single[:, 0], rtol=fsdp_step, err_msg=name)
    for key in ("loss", "val_curve"):
        rtol = (config.num_steps + 1) * fsdp_step
        np.testing.assert_allclose(*traces(r, "fsdp", "reference", key), rtol=rtol)
        within_quantization_effect(r, "fsdp", "none", key)
