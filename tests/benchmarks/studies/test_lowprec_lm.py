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


def tiny_inputs(config, layers=None, real=False):
    corpus = lm.stdlib_corpus(config.val_fraction)
    val = lm.val_windows(corpus.val, config.val_windows, config.context + 1)
    layers = config.quantizer_outliers.layers if layers is None else layers
    return stress.make_inputs(config, corpus, layers, real), val


def test_tiny_run_reports_every_regime(tmp_path):
    config = study_checks.tiny("lowprec_lm")
    result = lowprec_lm.run(config, mesh=None)
    summary = result["summary"]
    regimes = summary["regimes"]
    assert list(regimes) == ["quantizer_outliers", "model_outliers", "persistent"]
    for regime in ("quantizer_outliers", "model_outliers"):
        part = regimes[regime]
        assert list(part["methods"]) == list(config.methods)
        for row in part["methods"].values():
            assert {"val_loss", "gap_closed", "recovery_rate", "step_time_ratio"} <= set(row)
            assert np.isfinite(row["val_loss"]) and 0.0 <= row["recovery_rate"] <= 1.0
        assert part["methods"]["reference"]["recovery_rate"] == 1.0
        for name in ("none", "fine_grained"):  # nothing switches these to float32
            assert part["methods"][name]["recovery_rate"] == 0.0
        assert 0.0 < part["methods"]["oracle_precision"]["recovery_rate"] < 1.0
        assert part["reference_val_loss"] == part["methods"]["reference"]["val_loss"]
        assert part["none_val_loss"] == part["methods"]["none"]["val_loss"]
    # The old top-level keys are the quantizer_outliers regime's.
    assert summary["methods"] == regimes["quantizer_outliers"]["methods"]
    assert summary["goal"] == regimes["quantizer_outliers"]["goal"]
    # The rule kept exactly the layer types whose reference stayed within the tolerance.
    model = regimes["model_outliers"]
    clean = model["clean_reference_val_loss"]
    assert clean == regimes["quantizer_outliers"]["reference_val_loss"]
    for kind, split in model["by_layer_type"].items():
        within = abs(split["reference_val_loss"] - clean) <= model["reference_tolerance"] * clean
        assert split["kept"] == within == (kind in model["layers"])
    assert set(summary["persistent"]["methods"]) == set(config.persistent_methods)
    assert result["study"] == "lowprec_lm" and "lock_sha256" in result["environment"]
    path = reporting.write_json(result, tmp_path / "lowprec.json")
    assert json.loads(path.read_text())["summary"]["regimes"].keys() == regimes.keys()
    assert lowprec_lm.plot(result, tmp_path / "lowprec.png").exists()
    text = lowprec_lm.table(result)
    assert "gnmr_amax" in text and "split by layer type" in text


def test_reference_ignores_quantizer_outliers_but_not_model_outliers():
    """The float32 reference never sees quantizer-only outliers: with and without them it
    trains the same bits, which is why the clean run is reused as their reference. Real
    outliers change it."""
    config = study_checks.tiny("lowprec_lm")
    quant = lowprec.quant_config(**config.quant)
    programs = train.Programs(config)
    runs = []
    for layers, real in ((config.quantizer_outliers.layers, False), ((), False), (("up",), True)):
        inputs, val = tiny_inputs(config, layers, real)
        assert (inputs["layer"] >= 0).any() == bool(layers)
        runs.append(train.train_method("reference", config, quant, inputs, val,
                                       programs=programs))  # fmt: skip
    np.testing.assert_array_equal(runs[0]["val_curve"], runs[1]["val_curve"])
    np.testing.assert_array_equal(runs[0]["loss"], runs[1]["loss"])
    assert not np.array_equal(runs[0]["loss"], runs[2]["loss"])


def test_burst_schedule_is_seeded_and_within_bounds():
    config = study_checks.tiny("lowprec_lm", num_steps=400)
    layers = ("proj", "down")
    a, b = stress.burst_schedule(config, 0, layers), stress.burst_schedule(config, 0, layers)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.layer, stress.burst_schedule(config, 1, layers).layer)
    on = a.layer >= 0
    assert on.any() and not on[: config.burst_start].any()
    paths = lm.layer_paths(config.depth)
    assert {paths[i].split("/")[-1] for i in a.layer[on]} == set(layers)
    assert np.all((a.alpha[on] >= config.alpha_min) & (a.alpha[on] <= config.alpha_max))
    assert np.all(a.alpha[~on] == 1.0)
    assert not (stress.burst_schedule(config, 0, ()).layer >= 0).any()
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
    hit = paths[a.layer[first]]
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


def test_missed_layer_steps_name_the_cause():
    # One seed, 8 steps, 2 layers. Layer 0 is disturbed at steps 1-6: in float32 at
    # 1-2, then layer 1 holds the only float32 slot at 3-4, then nothing at 5-6. Layer 1
    # is disturbed at 7 and never switched.
    disturbed = np.zeros((1, 8, 2), bool)
    disturbed[0, 1:7, 0] = disturbed[0, 7, 1] = True
    flags = np.zeros((1, 8, 2), bool)
    flags[0, 1:3, 0] = flags[0, 3:5, 1] = True
    got = analysis.missed_layer_steps(flags, disturbed)
    assert got == {"slot_taken": 2, "released": 2, "not_detected": 1}


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


def test_recipe_costs_are_counted_per_layer():
    # The tiny model: one block, 8 x 16 = 128 tokens; (K, N) = qkv (16, 48), proj
    # (16, 16), up (16, 32), down (32, 16). Counts written out by hand.
    config = study_checks.tiny("lowprec_lm")
    delayed = analysis.recipe_cost(config, lowprec.quant_config(**config.quant))
    kn = 16 * 48 + 16 * 16 + 16 * 32 + 32 * 16  # sum of K * N
    assert delayed == {"scales": 4 * 2, "scale_bytes": 4 * (4 * 2 + 4 * 16),
                       "rescale_madds": 128 * (48 + 16 + 32 + 16),
                       "matmul_flops": 2 * 128 * kn}  # fmt: skip
    fine = analysis.recipe_cost(config, lowprec.quant_config("int8", "fine_grained", block_size=8))
    # Tiles per token: ceil(K / 8) = 2, 2, 2, 4; weight blocks 2x6, 2x2, 2x4, 4x2.
    assert fine["scales"] == 128 * (2 + 2 + 2 + 4) + (12 + 4 + 8 + 8)
    assert fine["rescale_madds"] == 128 * (48 * 2 + 16 * 2 + 32 * 2 + 16 * 4)
    # Layer-steps in float32 weighted by their FLOPs: qkv at step 0, down at step 1.
    flags = np.zeros((1, 2, 4), bool)
    flags[0, 0, 0] = flags[0, 1, 3] = True
    share = analysis.high_precision_flop_share(flags, config)
    assert share == (16 * 48 + 32 * 16) / (2 * kn)


def test_layer_rule_keeps_the_types_whose_reference_stays_within_tolerance():
    reference = {"qkv": 2.30, "proj": 2.245, "up": 2.21, "down": 2.26}  # +2.7, +0.2, -1.3, +0.9%
    assert analysis.admitted_layers(reference, clean=2.24, tolerance=0.01) == ["proj", "down"]


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
    programs = train.Programs(config)
    runs = [
        train.train_method("gnmr_both", config, q, inputs, val, programs=programs) for _ in range(2)
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
