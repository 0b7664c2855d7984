"""Helpers for the study tests: tiny configs and comparisons of two results."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from configs import spike_injection as spike_config

# Result keys that are measurements of the machine, not of the method.
MACHINE_KEYS = frozenset({"environment", "mesh", "ratio_size_0", "ratio_size_small"})
TIMING_WORDS = ("time_ratio", "step_time", "update_time", "compile_time", "_times")


def tiny_spike_config():
    """A ``spike_injection`` config that trains in seconds (batch divisible by 8)."""
    config = spike_config.get_config("quick")
    config.methods = ("clean", "none", "clip_by_global_norm", "gnmr_clip")
    config.num_seeds, config.num_steps, config.spike_start = 2, 60, 10
    config.hidden = (16,)
    return config


def is_machine_key(key: str, ignore: frozenset = MACHINE_KEYS) -> bool:
    """Keys holding timings or machine facts: listed, ``*_s`` (seconds), step/update/
    compile times and time ratios (``recovery_time``, a step count, is a metric)."""
    return key in ignore or key.endswith("_s") or any(word in key for word in TIMING_WORDS)


def metrics(result: Any, ignore: frozenset = MACHINE_KEYS) -> Any:
    """``result`` without its machine measurements (timings, environment, mesh)."""
    if isinstance(result, dict):
        return {k: metrics(v, ignore) for k, v in result.items() if not is_machine_key(k, ignore)}
    if isinstance(result, list | tuple):
        return [metrics(v, ignore) for v in result]
    return result


def assert_close(got: Any, want: Any, rtol: float = 0.0, atol: float = 0.0, path: str = ""):
    """Same structure and equal leaves (numbers within ``rtol``/``atol``; NaN == NaN)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (path, got.keys() ^ want.keys())
        for key in want:
            assert_close(got[key], want[key], rtol, atol, f"{path}/{key}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, rtol, atol, f"{path}[{i}]")
    elif isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        if math.isnan(want):
            assert math.isnan(got), (path, got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=path)
    else:
        assert got == want, (path, got, want)


def eight_device_results(study: str, config_fn: str, out: Path, timeout: int = 600):
    """Runs ``study`` on 8 simulated devices and on one (``_study_on_devices.py``) and
    returns the two results' :func:`metrics`, after checking that the sharded run had
    8 devices on its mesh and really split its batches."""
    import conformance  # only in the test process (the worker imports this module too)
    import pytest

    worker = Path(__file__).resolve().parent / "_study_on_devices.py"
    payload = conformance.run_on_eight_devices(worker, out, timeout, args=(study, config_fn))
    if "error" in payload:
        pytest.fail(f"8-device worker raised:\n{payload['error']}", pytrace=False)
    assert payload["devices"] == 8
    assert payload["sharded"]["mesh"] == {"devices": 8, "axes": {"data": 8}}
    assert payload["single"]["mesh"] == {"devices": 1, "axes": {}}
    assert payload["batch_shardings"] > 0, "the study never split a batch over the mesh"
    return metrics(payload["sharded"]), metrics(payload["single"])
