"""Resumable study runs: checkpointed stages and loops, and the fingerprint of a run.

A study splits its work into named *stages* (one method's training, one sweep point,
one section of a lab) and, inside a long stage, a *loop* of equal chunks. With a
:class:`Checkpointer` every finished stage is saved (:mod:`benchmarks.harness.store`),
and a loop saves its carried state after a chunk once ``save_interval_s`` seconds have
passed since its last save (:mod:`optstab.checkpoint`: atomic writes, the newest
``keep`` kept). Run again with the same study, config, code and devices, the study
restores what was done and goes on from there. Because every stage and every chunk is a
deterministic function of its inputs (explicit PRNG keys, the same compiled programs,
the same chunk boundaries), a run that was killed and resumed ends with bit-identical
metrics to one that was never interrupted. Only wall-clock timings differ.

Layout of a checkpoint directory::

    run.json              the fingerprint: study, config, code version, devices and
                          versions (a resume must match all of them)
    stage-<name>/         a finished stage's result (a store, step 0)
    loop-<name>/<k>/      a loop's carried state after k chunks (newest `keep`)
    loop-<name>-out/      the outputs of chunks 0..k-1 (a store, newest `keep` + 1)

The code version (:func:`code_version`) covers optstab and the study's own modules with
every ``benchmarks`` module they import, found from their import statements: editing
one study leaves the checkpoints of the others valid.

``NoCheckpoint`` has the same interface and does nothing, so a study's code is the
same with and without checkpointing. The harness owns both: it makes the checkpointer
before a study runs and finishes it once the result is safe (see
:mod:`benchmarks.harness.study`).

Example:

    >>> import tempfile, numpy as np, ml_collections
    >>> from benchmarks.harness import resume
    >>> config = ml_collections.ConfigDict({"steps": 3})
    >>> root = tempfile.mkdtemp() + "/run"
    >>> def advance(x, k):  # one chunk: new state, chunk output
    ...     return x * 2, {"k": k}
    >>> ck = resume.Checkpointer(root, "demo", config, save_interval_s=0)
    >>> ck.stage("setup", lambda: {"w": np.ones(2)})["w"]
    array([1., 1.])
    >>> state, outputs = ck.loop("train", np.float32(1), config.steps, advance)
    >>> float(state), outputs
    (8.0, [{'k': 0}, {'k': 1}, {'k': 2}])
    >>> again = resume.Checkpointer(root, "demo", config)  # e.g. after a kill
    >>> state, outputs = again.loop("train", np.float32(1), config.steps, advance)
    >>> float(state), again.restored  # only the last chunk ran again
    (8.0, ['train/loop'])
    >>> again.finish()  # the run is complete: its checkpoints are removed
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

import optstab
from benchmarks.harness import store
from optstab import checkpoint

__all__ = ["Checkpointer", "ConfigMismatch", "NoCheckpoint", "code_version", "run_context"]

PyTree = Any
Advance = Callable[[PyTree, int], tuple[PyTree, PyTree]]  # (state, k) -> (state, output)
Looped = tuple[PyTree, list]  # the final state and every chunk's output
RUN_FILE = "run.json"
ROOT = Path(__file__).resolve().parents[2]  # the repository root, which holds benchmarks/


class ConfigMismatch(ValueError):
    """The checkpoint directory holds a run of another study, config, code or device set."""


# ---------------------------------------------------------------------------
# Fingerprint


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(name: str, path: Path) -> list[str]:
    """Absolute names of what module ``name`` (file ``path``) imports, functions included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + [base] * bool(base))
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return found


def benchmark_modules(module: str) -> list[str]:
    """``module`` and every ``benchmarks`` module it imports, transitively, with their
    parent packages (sorted). Read from the import statements; nothing is run."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None or name.split(".")[0] != "benchmarks":
            continue
        seen.add(name)
        parents = [name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)]
        todo += parents + _imports(name, path)
    return sorted(seen)


def study_module(study: str) -> str:
    """The module of study ``study``; the harness alone for a name that is no study."""
    name = f"benchmarks.studies.{study}"
    return name if importlib.util.find_spec(name) is not None else "benchmarks.harness"


@functools.cache
def code_version(study: str) -> str:
    """SHA-256 of the code a study's results depend on: every optstab source, and the
    files of :func:`benchmark_modules` of the study's module."""
    library = Path(optstab.__file__).parent
    files = sorted(library.rglob("*.py"))
    files += [_module_file(name) for name in benchmark_modules(study_module(study))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_context(mesh: Any, fsdp: bool) -> dict:
    """What else a resumed run must share with the interrupted one to give its bits:
    the devices, FSDP, the backend and the jax, jaxlib and orbax versions."""
    import jax
    import jaxlib
    import orbax.checkpoint

    from benchmarks.harness import parallel

    return {
        "devices": parallel.describe(mesh),
        "fsdp": fsdp,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "orbax": getattr(orbax.checkpoint, "__version__", "unknown"),
    }


def fingerprint(study: str, config: Any, context: dict | None, code: str) -> dict:
    """What a resume must match: the study, its full config, the code and ``context``."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    run = {"study": study, "config": as_dict, "code": code, "context": context}
    # JSON round trip: tuples become lists, as they will be when read back.
    return json.loads(json.dumps(run, sort_keys=True, default=str))


def check_writable(directory: Path, what: str = "checkpoint directory") -> None:
    """Creates ``directory`` and checks that files can be written in it.

    Raises:
      PermissionError: with a one-line message naming the directory.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PermissionError(f"{what} {str(directory)!r} is not writable: {reason}") from None


# ---------------------------------------------------------------------------
# Checkpointers


class NoCheckpoint:
    """The :class:`Checkpointer` interface without any saving: runs everything."""

    directory = None
    resuming = False

    def __init__(self):
        self.restored: list[str] = []  # never anything here

    def stage(self, name: str, compute: Callable[[], PyTree]) -> PyTree:
        return store.check_plain(compute(), f"stage {name!r}")

    def loop(self, name: str, state: PyTree, num_chunks: int, advance: Advance) -> Looped:
        outputs = []
        for index in range(num_chunks):
            state, output = advance(state, index)
            outputs.append(store.check_plain(output, f"loop {name!r} output"))
        return state, outputs

    def finish(self) -> None:
        pass


class Checkpointer(NoCheckpoint):
    """Saves finished stages and loop chunks under ``directory``; resumes from them.

    Args:
      directory: where the run's checkpoints live (created; must be writable).
      study: the study's name; with ``config`` it identifies the run.
      config: the study's config. A directory holding a run of another study, config,
        code or context raises :class:`ConfigMismatch` instead of mixing the two runs
        (a claim under which nothing was saved is taken over).
      keep: how many of a loop's newest state checkpoints to keep (at least 1).
      save_interval_s: a loop saves its state after a chunk when this many seconds
        have passed since its last save (0: after every chunk).
      remove_when_done: :meth:`finish` deletes the directory (the JSON result is the
        durable output, and stale checkpoints must not outlive a code change).
      context: what else a resume must match (:func:`run_context`).
      code: the code version (default :func:`code_version` of ``study``).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        study: str,
        config: ml_collections.ConfigDict | dict,
        *,
        keep: int = 2,
        save_interval_s: float = 60.0,
        remove_when_done: bool = True,
        context: dict | None = None,
        code: str | None = None,
    ):
        super().__init__()
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if save_interval_s < 0:
            raise ValueError(f"save_interval_s must be >= 0, got {save_interval_s}")
        self.save_interval_s = save_interval_s
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.remove_when_done = remove_when_done
        self.resuming = False  # the directory held this run already
        check_writable(self.directory)
        self._active_loops: list[str] = []
        code = code_version(study) if code is None else code
        self._claim(fingerprint(study, config, context, code))

    def _claim(self, expected: dict) -> None:
        path = self.directory / RUN_FILE
        if path.exists():
            found = json.loads(path.read_text())
            differs = {
                "study": f"of another study ({found.get('study')})",
                "config": "with another config",
                "code": "made by other code (optstab or the study's modules changed since)",
                "context": f"on other devices or versions ({found.get('context')})",
            }
            mismatch = [why for key, why in differs.items() if found.get(key) != expected[key]]
            if not mismatch:
                self.resuming = True
                return
            if self._saved():
                raise ConfigMismatch(
                    f"checkpoint directory {str(self.directory)!r} holds a run {mismatch[0]}; "
                    "remove it or choose another directory"
                )
            # Nothing was saved under the old claim: take over.
        elif self._saved() or self._foreign():
            raise ConfigMismatch(
                f"checkpoint directory {str(self.directory)!r} is not empty and holds no "
                f"{RUN_FILE}; choose an empty directory"
            )
        temporary = self.directory / f".{RUN_FILE}.tmp"
        temporary.write_text(json.dumps(expected, indent=1, sort_keys=True))
        os.replace(temporary, path)  # atomic: a killed run never leaves half a file

    def _saved(self) -> bool:
        """Whether any stage or loop has been saved in the directory."""
        return any(p.name.startswith(("stage-", "loop-")) for p in self.directory.iterdir())

    def _foreign(self) -> list[Path]:
        """Entries the checkpointer did not write (its temporary files excepted)."""
        own = (".probe-", f".{RUN_FILE}.tmp", RUN_FILE)
        return [p for p in self.directory.iterdir() if not p.name.startswith(own)]

    def stage(self, name: str, compute: Callable[[], PyTree]) -> PyTree:
        """``compute()``'s result, from disk when this stage finished before.

        The result must be plain (:func:`benchmarks.harness.store.check_plain`): it is
        restored without a target, dict key order included. The checkpoints of loops
        run inside the stage are deleted once the stage is saved.
        """
        path = self.directory / f"stage-{name}"
        if store.latest_step(path) is not None:
            self.restored.append(name)
            return store.restore(path)
        self._active_loops = []
        value = store.check_plain(compute(), f"stage {name!r}")
        store.save(path, 0, value)
        for loop in self._active_loops:
            for suffix in ("", "-out"):
                shutil.rmtree(self.directory / f"loop-{loop}{suffix}", ignore_errors=True)
        return value

    def loop(self, name: str, state: PyTree, num_chunks: int, advance: Advance) -> Looped:
        """Runs ``state, output = advance(state, k)`` for k in ``range(num_chunks)``.

        After a chunk that ends at least ``save_interval_s`` seconds after the last
        save (every chunk when it is 0), the outputs so far (plain, as for
        :meth:`stage`) and then the state are saved under step ``k + 1``. A resumed
        loop restores the newest state into the structure, dtypes and shardings of
        the initial ``state`` and goes on with the next chunk. The last chunk is not
        saved here: the stage that runs the loop saves its result. Returns the final
        state and the list of chunk outputs.
        """
        self._active_loops.append(name)
        state_path = self.directory / f"loop-{name}"
        output_path = self.directory / f"loop-{name}-out"
        start = checkpoint.latest_step(state_path) or 0
        outputs = []
        if start:
            self.restored.append(f"{name}/loop")
            state = checkpoint.restore(state_path, start, state)
            outputs = store.restore(output_path, start)
        saved_outputs = set(store.all_steps(output_path))
        last_save = time.monotonic()
        for index in range(start, num_chunks):
            state, output = advance(state, index)
            outputs.append(store.check_plain(output, f"loop {name!r} output"))
            done = index + 1
            if done == num_chunks or time.monotonic() - last_save < self.save_interval_s:
                continue
            # Outputs first, then the state; the outputs keep one more step, so the
            # outputs of the newest state survive a kill between the two saves (a
            # redone chunk computes the same outputs, which are then not saved again).
            if done not in saved_outputs:
                store.save(output_path, done, outputs, keep=self.keep + 1)
            checkpoint.save(state_path, done, state, keep=self.keep)
            last_save = time.monotonic()
        return state, outputs

    def finish(self) -> None:
        """Marks the run done: deletes its checkpoints unless told to keep them."""
        if self.remove_when_done:
            shutil.rmtree(self.directory, ignore_errors=True)
