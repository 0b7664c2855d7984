"""gnmr_calibration: its rule against hand computations and against the compiled
controller, and the tiny study's structure and resume (structure, never figures: those
come from ``make bench``)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import study_checks

import optstab
from benchmarks.harness import reporting
from benchmarks.studies import gnmr_calibration
from benchmarks.studies.gnmr_calibration import rule

F32 = np.float32


def test_replayed_score_is_the_compiled_controllers_bit_for_bit():
    # Bars off powers of two, so that every product with a reciprocal rounds; five
    # one-element units whose norms wander around their level, under jit as in training.
    bars = dict(threshold=2.7, delta_threshold=1.9, delta_gate=1.3)
    tx = optstab.gnmr(**bars, max_recover=0, warmup_steps=2, action="precision")
    names = [f"u{i}" for i in range(5)]
    state = tx.init({name: jnp.zeros(()) for name in names})
    norms = np.exp(np.random.default_rng(0).normal(0.0, 0.6, (40, 5))).astype(F32)

    def step(state, norm):
        _, state = tx.update({name: norm[i] for i, name in enumerate(names)}, state)
        t = state.telemetry
        return state, (t.gnmr[0], t.delta_gnmr[0], t.score)

    _, (g, d, score) = jax.jit(lambda s, n: jax.lax.scan(step, s, n))(state, norms)
    replayed = rule.scores(np.asarray(g), np.asarray(d), **bars)
    np.testing.assert_array_equal(replayed, np.asarray(score))
    assert np.sum(replayed > 1) > 0  # the check covers units over a bar too


def test_the_rule_picks_the_bars_a_hand_count_picks():
    # 1000 unit-updates at G = D = 1, except u0 with G = D = 2.2 and u1 with G = 1.2,
    # D = 2.6 (every threshold's watcher sees the same ratios). At risk: G > t, or
    # D > dt while G > gate. By hand, per candidate (t, dt, gate):
    #   u0 is at risk when t = 2 (G > 2), or t = 2.5 with dt = 2 (D > 2, G > gate);
    #   u1 is at risk when gate = 1 (D = 2.6 > dt for both dt, G = 1.2 > 1 only).
    n = 1000
    g, d = np.ones(n, F32), np.ones(n, F32)
    g[0], d[0], g[1], d[1] = 2.2, 2.2, 1.2, 2.6
    both = lambda x: np.stack([x, x])  # noqa: E731
    grids = {"threshold_grid": (2.0, 2.5), "delta_threshold_grid": (2.0, 2.5),
             "delta_gate_min": 1.0, "delta_gate_step": 0.5}  # fmt: skip
    rows = rule.evaluate({"p": rule.Ratios(both(g), both(d), both(g))}, grids)
    rates = {(r["threshold"], r["delta_threshold"], r["delta_gate"]): r["rates_per_1000"]["p"]
             for r in rows}  # fmt: skip
    assert rates == {(2.0, 2.0, 1.0): 2.0, (2.0, 2.0, 1.5): 1.0, (2.0, 2.5, 1.0): 2.0,
                     (2.0, 2.5, 1.5): 1.0, (2.5, 2.0, 1.0): 2.0, (2.5, 2.0, 1.5): 1.0,
                     (2.5, 2.0, 2.0): 1.0, (2.5, 2.5, 1.0): 1.0, (2.5, 2.5, 1.5): 0.0,
                     (2.5, 2.5, 2.0): 0.0}  # fmt: skip
    # Feasible at 1 per 1000: the rates <= 1. S* = min(t / G, max(dt / D, gate / G)) is
    # min(t, max(dt, gate)) on the bulk: 2 for (2, 2, 1.5), (2, 2.5, 1.5), (2.5, 2, 1.5)
    # and (2.5, 2, 2), 2.5 for the rest. On u1 the first three give max(dt / 2.6,
    # 1.5 / 1.2) = 1.25 and (2.5, 2, 2) gives 2 / 1.2; on u0 all four give 2 / 2.2. So the
    # first three tie exactly, at rate 1 each, and the larger threshold wins the tie.
    chosen = rule.choose(rows, budget=1.0)
    assert (chosen["threshold"], chosen["delta_threshold"], chosen["delta_gate"]) == (2.5, 2, 1.5)
    assert chosen["num_feasible"] == 7 and chosen["num_candidates"] == 10
    with pytest.raises(ValueError, match="no candidate"):
        rule.choose(rows, budget=-1.0)


def test_reports_both_settings_and_resumes_bit_identically(tmp_path):
    config = study_checks.tiny("gnmr_calibration")
    result, _ = study_checks.run_kept("gnmr_calibration", config, tmp_path / "ck")
    summary = result["summary"]
    assert set(summary["problems"]) == set(config.problems)
    for problem, entry in summary["problems"].items():
        for setting in ("old_defaults", "new_defaults"):
            held = entry[setting]
            assert held["unit_updates"] > 0 and held["triggers"] >= 0
            expected = 1000.0 * held["triggers"] / held["unit_updates"]
            assert held["false_triggers_per_1000"] == pytest.approx(expected, rel=1e-12)
        calib = summary["calibration"][problem]
        assert calib["replay_max_abs_diff"] == 0.0  # the replay is the controller's score
        assert calib["old_defaults"]["rate_per_1000"] >= 0.0
    picked = summary["calibrated"]
    assert picked["threshold"] in config.rule.threshold_grid
    assert max(summary["rule_pick"]["rates_per_1000"].values()) <= config.rule.budget_per_1000
    assert summary["library_defaults"] == {
        k: float(v) for k, v in gnmr_calibration.train.library_bars().items()
    }
    path = reporting.write_json(result, tmp_path / "calibration.json")
    assert json.loads(path.read_text())["summary"]["calibrated"] == picked
    assert gnmr_calibration.plot(result, tmp_path / "calibration.png").exists()
    assert "new_defaults" in gnmr_calibration.table(result)
    # Lose the MLP's acting stage (its cheapest): the rerun restores the rest.
    study_checks.resumes_to_the_same_metrics(
        "gnmr_calibration", config, tmp_path / "ck", result, lose=["mlp_gnmr_clip"]
    )
