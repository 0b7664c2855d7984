"""Helpers for the study tests: tiny configs, a run whose checkpoints are kept, and a
study on 8 simulated devices against one."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

from benchmarks import studies
from benchmarks.harness import Context, compare, resume

HERE = Path(__file__).resolve().parent


def tiny(study: str, **overrides: Any):
    """``configs/<study>.py``'s tiny size, with ``overrides`` set."""
    config = importlib.import_module(f"configs.{study}").get_config("tiny")
    for key, value in overrides.items():
        config[key] = value
    return config


def assert_same(got: Any, want: Any, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Same structure and equal leaves (floats within ``atol + rtol * |want|``)."""
    found = compare.differences(got, want, rtol, atol)
    assert not found, "\n".join(found[:20])


def run_kept(study: str, config, directory: Path, mesh=None) -> tuple[dict, resume.Checkpointer]:
    """Runs ``study`` as the CLI does, with a checkpointer whose directory is kept."""
    checkpointer = resume.Checkpointer(directory, study, config, remove_when_done=False)
    return run_with(study, config, checkpointer, mesh), checkpointer


def run_with(study: str, config, checkpointer: resume.NoCheckpoint, mesh=None) -> dict:
    """``prepare`` then ``execute``, the two steps of the runner, with ``checkpointer``."""
    found = studies.load(study)
    plan = found.check(config, mesh)
    return found.execute(plan, Context(study, config, mesh, False, checkpointer))


def stages_by_age(directory: Path) -> list[Path]:
    """The finished stages of a checkpoint directory, oldest first."""
    return sorted(directory.glob("stage-*"), key=lambda path: path.stat().st_mtime_ns)


def resumes_to_the_same_metrics(study: str, config, directory: Path, first: dict, lose):
    """Deletes stages as a kill would have lost them (``lose``: the newest ``lose``
    stages, or a list of stage names), runs again from the directory, and checks that
    the kept stages were restored, the lost ones computed again, and the metrics are
    bit-identical. Returns the resumed result."""
    stages = stages_by_age(directory)
    if isinstance(lose, int):
        assert len(stages) > lose, stages
        lost = stages[-lose:]
    else:
        lost = [directory / f"stage-{name}" for name in lose]
    for path in lost:
        shutil.rmtree(path)
    again = resume.Checkpointer(directory, study, config, remove_when_done=False)
    assert again.resuming
    resumed = run_with(study, config, again)
    kept = {path.name.removeprefix("stage-") for path in stages if path not in lost}
    assert set(again.restored) == kept
    assert {path.name for path in stages_by_age(directory)} == {path.name for path in stages}
    assert_same(compare.metrics(resumed), compare.metrics(first))
    other = config.copy_and_resolve_references()
    other.size = "other"
    try:
        resume.Checkpointer(directory, study, other)
    except resume.ConfigMismatch:
        pass
    else:
        raise AssertionError("a directory of another config was not refused")
    return resumed


def eight_device_results(study: str, out: Path, *overrides: str, timeout: int = 600):
    """Runs ``study``'s tiny config (with ``KEY=VALUE`` overrides) on 8 simulated
    devices and on one (``_study_on_devices.py``), and returns the two results'
    :func:`benchmarks.harness.compare.metrics`, after checking that the sharded run had
    8 devices on its mesh and really split its batches."""
    import conformance  # only in the test process (the worker imports this module too)
    import pytest

    worker = HERE / "_study_on_devices.py"
    payload = conformance.run_on_eight_devices(worker, out, timeout, args=(study, *overrides))
    if "error" in payload:
        pytest.fail(f"8-device worker raised:\n{payload['error']}", pytrace=False)
    assert payload["devices"] == 8
    assert payload["sharded"]["mesh"] == {"devices": 8, "axes": {"data": 8}}
    assert payload["single"]["mesh"] == {"devices": 1, "axes": {}}
    assert payload["batch_shardings"] > 0, "the study never split a batch over the mesh"
    return compare.metrics(payload["sharded"]), compare.metrics(payload["single"])
