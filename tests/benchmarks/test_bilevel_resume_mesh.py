"""The bilevel studies resume bit-identically from their checkpoints and give the same
numbers on a mesh of 8 (simulated) devices as on one."""

import importlib
import shutil
from pathlib import Path

import pytest
import study_checks
import tiny_bilevel

from benchmarks import resume

CONFIGS = {
    "bilevel_cleaning": tiny_bilevel.cleaning_config,
    "bilevel_mixture": tiny_bilevel.mixture_config,
    "bilevel_memory": tiny_bilevel.memory_config,
}


def stages_by_age(directory: Path) -> list[Path]:
    """The finished stages of a checkpoint directory, oldest first."""
    return sorted(directory.glob("stage-*"), key=lambda path: path.stat().st_mtime_ns)


@pytest.mark.parametrize("study", list(CONFIGS))
def test_a_killed_run_resumes_to_the_same_metrics(study, tmp_path):
    run = importlib.import_module(f"benchmarks.{study}").run
    config = CONFIGS[study]()
    directory = tmp_path / "ck"
    keep = resume.Checkpointer(directory, study, config, remove_when_done=False)
    first = run(config, checkpoint_dir=keep, mesh=None)
    stages = stages_by_age(directory)
    assert len(stages) >= 2 and not keep.restored
    # A run killed before its last stages finished: they never reached the disk.
    lost = stages[-2:] if len(stages) > 2 else stages[-1:]
    for path in lost:
        shutil.rmtree(path)

    again = resume.Checkpointer(directory, study, config, remove_when_done=False)
    resumed = run(config, checkpoint_dir=again, mesh=None)
    kept = {path.name.removeprefix("stage-") for path in stages if path not in lost}
    assert set(again.restored) == kept
    assert {path.name for path in stages_by_age(directory)} == {path.name for path in stages}
    study_checks.assert_close(study_checks.metrics(resumed), study_checks.metrics(first), rtol=0.0)

    other = config.copy_and_resolve_references()
    other.seed += 1
    with pytest.raises(resume.ConfigMismatch):
        resume.Checkpointer(directory, study, other)


def test_mixture_on_eight_devices_matches_one_device(tmp_path):
    sharded, single = study_checks.eight_device_results(
        "bilevel_mixture", "tiny_bilevel:mixture_config", tmp_path / "mixture.json"
    )
    curves = [curves_of(result) for result in (sharded, single)]
    # Sharding a minibatch over 8 devices only changes the order in which its per-example
    # losses and gradients are summed: float32 reassociation. Over these twelve steps the
    # largest difference measured was 1.4e-7 relative (one or two float32 ulps; the
    # accuracies are equal). rtol 1e-5 allows some 80 ulps and still catches any real
    # change (a wrong shard or a dropped example moves these figures by percents).
    study_checks.assert_close(sharded, single, rtol=1e-5, atol=1e-7)
    # The curves are written rounded to 4 (mixture) or 5 (loss) significant digits, so
    # one ulp can flip their last digit: allow one unit there.
    study_checks.assert_close(*curves, rtol=2e-3, atol=1e-7)


def curves_of(result: dict) -> dict:
    """Pops the rounded per-record curves out of a mixture result."""
    return {
        name: {key: raw.pop(key) for key in ("mixture_curve", "val_loss_curve")}
        for name, raw in result["raw"].items()
    }
