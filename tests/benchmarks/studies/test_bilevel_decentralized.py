"""bilevel_decentralized on its tiny config: structure, the complete graph is the
centralized run, a resume after a kill, and the same numbers on 8 simulated devices
(one node per device, shard_map + ppermute) as on one."""

import conformance
import numpy as np
import pytest
import study_checks

from benchmarks.studies import bilevel_decentralized

U = 2.0**-24  # float32 unit roundoff


def test_reports_transients_and_the_complete_graph_is_the_centralized_run(tmp_path):
    config = study_checks.tiny("bilevel_decentralized")
    result, _ = study_checks.run_kept("bilevel_decentralized", config, tmp_path / "ck")
    summary, raw = result["summary"], result["raw"]
    names = [r.name for r in bilevel_decentralized.all_runs(config)]
    assert list(summary["runs"]) == names
    for name in names:
        run = summary["runs"][name]
        assert 0.0 <= run["test_acc"] <= 1.0 and run["nonfinite_steps"] == 0
        if run["graph"] != "centralized":
            assert list(run["transient_steps"]) == ["1.1", "1.5", "2"]
            for steps in run["transient_steps"].values():
                assert steps is None or steps % config.eval_every == 0
            assert run["bytes_per_node_step"] > 0
    for fits in summary["fits"].values():
        assert set(fits) == {"inverse_gap", "nodes", "heterogeneity"}

    # W = 11^T / n keeps every node's x, y and z equal to their means, and the mean of the
    # nodes' local steps is the centralized step on the pooled minibatch: the same run up
    # to float32 reassociation of the batch sums (64 terms: 2 * 64 u = 7.6e-6 relative per
    # step), accumulated over the 40 steps if the iteration does not expand it (3e-4),
    # doubled by squaring the norm: rtol 1e-3.
    suffix = f"n{config.num_nodes}-h{config.sweep_heterogeneity:g}"
    complete = np.asarray(raw[f"complete-so-{suffix}"]["curves"]["hypergradient_sq"])
    central = np.asarray(raw[f"centralized-{suffix}"]["curves"]["hypergradient_sq"])
    np.testing.assert_allclose(complete, central, rtol=1e-3)
    assert summary["runs"][f"complete-so-{suffix}"]["consensus_x"] < 1e-10
    # The ring has to mix: its nodes disagree.
    assert summary["runs"][f"ring-so-{suffix}"]["consensus_x"] > 1e-6
    assert f"ring-so-{suffix}" in bilevel_decentralized.table(result)
    assert bilevel_decentralized.plot(result, tmp_path / "dec.png").exists()
    study_checks.resumes_to_the_same_metrics(
        "bilevel_decentralized", config, tmp_path / "ck", result, lose=2
    )


@pytest.fixture(scope="module")
def on_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("dec") / "dec.json"
    worker = study_checks.HERE / "_study_on_devices.py"
    overrides = ("node_counts=()", "first_order=()", "topologies=ring", "num_seeds=1")
    payload = conformance.run_on_eight_devices(
        worker, out, 600, args=("bilevel_decentralized", *overrides)
    )
    if "error" in payload:
        pytest.fail(f"8-device worker raised:\n{payload['error']}", pytrace=False)
    return payload


def test_eight_devices_one_node_each_match_one_device(on_devices):
    sharded, single = on_devices["sharded"], on_devices["single"]
    assert on_devices["devices"] == 8
    meshed = {n: r["on_mesh"] for n, r in sharded["summary"]["runs"].items()}
    assert meshed == {
        "centralized-n8-h0.5": False,  # MA-SOBA on the pooled data: one device
        "ring-so-n8-h0.5": True,
    }
    assert not any(r["on_mesh"] for r in single["summary"]["runs"].values())
    # The mesh and the one-device run do the same arithmetic in the same order (one
    # ppermute or one roll per shift); XLA may contract a multiply-add differently,
    # 1 ulp per mix, three mixes per step: 40 steps -> 120 ulps = 7e-6 relative if not
    # expanded, doubled by the squared norm, and the exact hypergradient's solve adds
    # its own reassociation (a 65 x 65 system, ~65 u per reduction): rtol 1e-4.
    for name in meshed:
        got = np.asarray(sharded["raw"][name]["curves"]["hypergradient_sq"])
        want = np.asarray(single["raw"][name]["curves"]["hypergradient_sq"])
        np.testing.assert_allclose(got, want, rtol=1e-4)
