"""Shared pytest setup: CPU-only JAX, 32-bit defaults, hypothesis profiles, and the
8-device subprocess whose results the sharding tests read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Must be set before jax is imported anywhere in the test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")  # figures are written to files, never shown
# The tests run tiny programs, so XLA compile time dominates on CPU: skipping LLVM's
# optimisation passes halves the suite's time. It does change float results: LLVM no
# longer contracts multiply-adds or reassociates the same way (statement 7's deviation
# is 1.17e-4 with it, 7.95e-5 without). So no test may depend on it: a comparison runs
# both sides under the same flags and its tolerance covers float32 reassociation, and
# the suite must also pass with OPTSTAB_TEST_FULL_OPT=1, which keeps XLA's default.
if os.environ["JAX_PLATFORMS"] == "cpu" and not os.environ.get("OPTSTAB_TEST_FULL_OPT"):
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

# One on-disk cache of compiled programs for the whole session (every xdist worker and
# the 8-device subprocesses, which inherit the variable): a study's resume test, for
# one, compiles again exactly what its first run compiled. The first process of the
# session makes a fresh directory and removes it at the end, so nothing outlives a
# run; OPTSTAB_TEST_NO_CACHE=1 turns it off. A cached executable is the compiled one
# (same bits, same memory_analysis); an unreadable entry is recompiled with a warning.
_CACHE_DIR = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = None
if not os.environ.get("OPTSTAB_TEST_NO_CACHE"):
    if _CACHE_DIR not in os.environ and not os.environ.get("PYTEST_XDIST_WORKER"):
        _OWN_CACHE = os.environ[_CACHE_DIR] = tempfile.mkdtemp(prefix="optstab-jax-cache-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parent
# Make `import conformance` (tests/) and `import study_checks` (tests/benchmarks/, used
# from its subfolders) work whatever pytest's import mode is. One conftest for both:
# a second file named conftest.py clashes with this one under --doctest-modules.
for _path in (TESTS_DIR / "benchmarks", TESTS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

jax.config.update("jax_enable_x64", False)
if os.environ.get(_CACHE_DIR) and not os.environ.get("OPTSTAB_TEST_NO_CACHE"):
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_DIR])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# Hypothesis: one profile everywhere (CI and laptops alike), so a developer's run and
# CI's draw examples the same way. No deadline (JIT compilation makes the first example
# slow). `make test` fixes the seed (--hypothesis-seed=0); other seeds must pass too
# (`make test HYPOTHESIS_SEED=7`), and `HYPOTHESIS_PROFILE=thorough` draws 10x more.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
settings.register_profile("optstab", max_examples=10, **_COMMON)
settings.register_profile("thorough", max_examples=100, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "optstab"))

SHARDED_WORKER = TESTS_DIR / "_sharded_worker.py"
SHARDED_DEVICES = 8
SHARDED_TIMEOUT_S = 400
SHARDED_FIXTURE = "sharded_results"


def _sharded_dir(config: pytest.Config) -> Path:
    """A directory shared by all pytest-xdist workers of this session."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None:
        base = factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            base = base.parent  # each worker's basetemp is <session basetemp>/popen-gwN
    else:
        run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
        base = Path(tempfile.gettempdir()) / f"optstab-pytest-{run_id}"
    path = base / "optstab_sharded"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _launch_sharded_worker(path: Path) -> None:
    """Starts ``_sharded_worker.py`` in the background, once per session.

    The first caller (of all xdist workers) wins; the others return at once. The
    subprocess writes ``sharded.npz`` and then its exit status to ``rc``.
    """
    try:
        os.close(os.open(path / "launched", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={SHARDED_DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["OPTSTAB_SHARDED_TIMEOUT_S"] = str(SHARDED_TIMEOUT_S)
    command = '"$0" "$1" "$2" "$3"; echo $? > "$4.tmp" && mv "$4.tmp" "$4"'
    args = [sys.executable, SHARDED_WORKER, path / "sharded.npz", path / "ckpt", path / "rc"]
    with open(path / "log.txt", "w") as log:
        subprocess.Popen(
            ["/bin/sh", "-c", command, *map(str, args)],
            env=env,
            cwd=str(TESTS_DIR.parent),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts the 8-device worker early, so it runs while other tests do."""
    if any(SHARDED_FIXTURE in getattr(item, "fixturenames", ()) for item in session.items):
        _launch_sharded_worker(_sharded_dir(session.config))


@pytest.fixture(scope="session")
def sharded_results(request: pytest.FixtureRequest) -> dict[str, np.ndarray]:
    """Results of ``tests/_sharded_worker.py`` on 8 simulated CPU devices.

    The worker is one subprocess per test session (JAX start-up and the 8-device
    compiles are paid once), started at collection by whichever xdist worker gets
    there first; every test process reads the ``.npz`` it writes.
    """
    path = _sharded_dir(request.config)
    _launch_sharded_worker(path)  # no-op when collection already started it
    deadline = time.monotonic() + SHARDED_TIMEOUT_S + 30
    while not (path / "rc").exists():
        if time.monotonic() > deadline:
            pytest.fail(f"the 8-device worker did not finish in {SHARDED_TIMEOUT_S}s")
        time.sleep(0.1)
    rc = (path / "rc").read_text().strip()
    npz = path / "sharded.npz"
    if rc != "0" or not npz.exists():
        log = (path / "log.txt").read_text()[-8000:]
        pytest.fail(f"the 8-device worker failed (exit status {rc}):\n{log}", pytrace=False)
    with np.load(npz, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
