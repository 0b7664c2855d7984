"""perturbed_sgd resumes bit-identically from its checkpoints and gives the same numbers
on 8 (simulated) devices as on one; overhead runs the same with checkpoints as without."""

import shutil
from pathlib import Path

import pytest
import study_checks
import tiny_overhead_perturbed as tiny

from benchmarks import overhead, perturbed_sgd, resume


def stages_by_age(directory: Path) -> list[Path]:
    """The finished stages of a checkpoint directory, oldest first."""
    return sorted(directory.glob("stage-*"), key=lambda path: path.stat().st_mtime_ns)


def test_perturbed_sgd_resumes_to_the_same_metrics(tmp_path):
    config = tiny.perturbed_config()
    config.sections = ("linearity", "recovery", "example")  # restored: a probe, codes
    directory = tmp_path / "ck"
    keep = resume.Checkpointer(directory, "perturbed_sgd", config, remove_when_done=False)
    first = perturbed_sgd.run(config, checkpoint_dir=keep, mesh=None)
    stages = stages_by_age(directory)
    assert [path.name for path in stages] == [f"stage-{name}" for name in config.sections]
    shutil.rmtree(stages[-1])  # killed while the last section ran

    again = resume.Checkpointer(directory, "perturbed_sgd", config, remove_when_done=False)
    resumed = perturbed_sgd.run(config, checkpoint_dir=again, mesh=None)
    assert again.restored == ["linearity", "recovery"]
    assert [s["id"] for s in resumed["summary"]["statements"]] == [3, 6]
    for key in ("outcome", "recovery_time"):  # metrics() drops keys named "*time*"
        assert resumed["raw"]["recovery"][key] == first["raw"]["recovery"][key]
    study_checks.assert_close(study_checks.metrics(resumed), study_checks.metrics(first))

    other = config.copy_and_resolve_references()
    other.seed += 1
    with pytest.raises(resume.ConfigMismatch):
        resume.Checkpointer(directory, "perturbed_sgd", other)


def test_overhead_with_checkpoints_matches_a_plain_run(tmp_path):
    config = tiny.overhead_config()
    directory = tmp_path / "ck"
    checkpointed = overhead.run(config, checkpoint_dir=directory, mesh=None)
    assert not directory.exists()  # removed when the run finished
    plain = overhead.run(config, mesh=None)
    # What is left without timings: compiled memory, parameter count, memory goals.
    assert study_checks.metrics(checkpointed)["summary"]["memory_bytes"]
    study_checks.assert_close(study_checks.metrics(checkpointed), study_checks.metrics(plain))
    assert len(checkpointed["raw"]["step_times_s"]["adamw"]) == config.step_repeats


def test_perturbed_sgd_on_eight_devices_matches_one_device(tmp_path):
    sharded, single = study_checks.eight_device_results(
        "perturbed_sgd",
        "tiny_overhead_perturbed:perturbed_mesh_config",
        tmp_path / "perturbed.json",
        timeout=400,
    )
    # Splitting the probe batch (statement 3) and the SGD minibatches (statement 5) over
    # 8 devices only reorders float32 sums over examples. Most figures then move by
    # about 1e-5 relative or less (300 SGD steps on a contracting convex problem). The
    # largest moves are in gradient *changes* at tiny relative sizes (1e-4): the
    # difference of two float32 gradients that agree to ~3e-5 loses that much
    # precision, so one ulp (6e-8) of either becomes ~2e-3 of the difference. Measured
    # on this config: at most 3e-4 relative (the forward curve at size 1e-4). rtol 2e-3
    # covers the worst case; any real change (a lost or doubled example) moves these
    # figures by percents, and the pass/fail of every statement must agree exactly.
    study_checks.assert_close(sharded, single, rtol=2e-3, atol=1e-7)
    passed = [[s["passed"] for s in r["summary"]["statements"]] for r in (sharded, single)]
    assert passed[0] == passed[1]
