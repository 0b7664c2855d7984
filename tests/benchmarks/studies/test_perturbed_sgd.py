"""perturbed_sgd on its tiny config: every statement reported, a resume after a kill,
and the same numbers on 8 simulated devices as on one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import study_checks

from benchmarks.harness import reporting
from benchmarks.studies import perturbed_sgd
from benchmarks.studies.perturbed_sgd import runs


def test_reports_every_statement_and_resumes_bit_identically(tmp_path):
    config = study_checks.tiny("perturbed_sgd")
    result, _ = study_checks.run_kept("perturbed_sgd", config, tmp_path / "ck")
    statements = result["summary"]["statements"]
    assert [s["id"] for s in statements] == [0, 1, 2, 3, 4, 5, 6, "7a", "7b"]
    for s in statements:
        assert set(s) == {"id", "claim", "measured", "expected", "passed"}
        assert isinstance(s["passed"], bool)
    # Statement 1 is exact on any problem: later blocks compare equal bit for bit.
    assert statements[1]["measured"]["later_blocks_exactly_unchanged"] is True
    # Statement 0's bits hold on any machine: idle points are not built, so the step is
    # the step without points; points named at size 0 return their input exactly.
    assert statements[0]["measured"]["idle_same_bits"] is True
    assert statements[0]["measured"]["named_0_identity_bits"] is True
    assert statements[-1]["measured"]["predicted_error"] > 0
    path = reporting.write_json(result, tmp_path / "perturbed_sgd.json")
    assert len(json.loads(path.read_text())["summary"]["statements"]) == 9
    assert perturbed_sgd.plot(result, tmp_path / "perturbed_sgd.png").exists()
    assert "statements pass" in perturbed_sgd.table(result)
    # As if example had never reached the disk (zero_cost stays: statement 0's
    # pass/fail is a timing, which a rerun would measure again); recovery is restored,
    # its outcome codes become names again, and threshold's per-run arrays and
    # prediction come back from the store unchanged.
    resumed = study_checks.resumes_to_the_same_metrics(
        "perturbed_sgd", config, tmp_path / "ck", result, lose=["example"]
    )
    assert resumed["raw"]["recovery"]["outcome"] == result["raw"]["recovery"]["outcome"]
    assert isinstance(resumed["raw"]["recovery"]["outcome"][0], str)


def test_eight_devices_match_one(tmp_path):
    sharded, single = study_checks.eight_device_results(
        "perturbed_sgd", tmp_path / "perturbed.json", "sections=linearity,rates", timeout=400
    )
    # Splitting the probe batch (statement 3) and the SGD minibatches (statement 5) over
    # 8 devices only reorders float32 sums over examples: each sum moves by at most
    # 2 (n - 1) u ~ 4e-6 relative (n = 32, u = 6e-8). Most figures then move by that
    # order (300 SGD steps on a contracting convex problem do not amplify it). The
    # largest moves are in gradient *changes* at tiny relative sizes (1e-4): the
    # difference of two float32 gradients that agree to ~3e-5 loses that much
    # precision, so one ulp (6e-8) of either becomes ~6e-8 / 3e-5 = 2e-3 of the
    # difference. rtol 2e-3 is that worst case; a lost or doubled example moves these
    # figures by percents, and the pass/fail of every statement must agree exactly.
    study_checks.assert_same(sharded, single, rtol=2e-3, atol=1e-7)
    passed = [[s["passed"] for s in r["summary"]["statements"]] for r in (sharded, single)]
    assert passed[0] == passed[1]


class _Quadratic:
    """``loss = w.A.w / 2``: its Hessian is ``A`` (duck-types the model's ``loss``)."""

    def __init__(self, eigenvalues, seed=0):
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
        self.a = jnp.asarray(q @ np.diag(eigenvalues) @ q.T, jnp.float32)

    def loss(self, w, x, y):
        del x, y
        return 0.5 * w @ self.a @ w


def test_top_curvature_finds_the_largest_eigenvalue_when_a_negative_one_dominates():
    # Statement 7b's L: the largest eigenvalue (3), not the largest in magnitude (-5),
    # which plain power iteration would return. Both iterations contract by 3/5 (plain)
    # and 6/8 (shifted by 5) per step, so 200 steps converge far below float32; what is
    # left is rounding in 8-term matrix-vector products, ~ 8 * 6e-8 * 5 = 2.4e-6 per
    # product: 1e-4 leaves 40x room.
    model = _Quadratic([-5.0, 3.0, 1.0, 0.5, 0.0, -1.0, -2.0, 2.0])
    top, rho, residual = runs.top_curvature(
        model, jnp.ones(8, jnp.float32), None, None, jax.random.key(0), 200
    )
    assert abs(float(top) - 3.0) <= 1e-4
    assert abs(float(rho) - 5.0) <= 1e-4
    assert float(residual) <= 1e-4
