"""Resumable study runs, checkpointed through :mod:`optstab.checkpoint`.

A study splits its work into named *stages* (one method's training, one sweep point,
one section of a lab) and, inside a long stage, a *loop* of equal chunks. With a
:class:`Checkpointer` every finished stage is saved, and a loop saves its carried
state after a chunk once ``save_interval_s`` seconds have passed since its last save
(orbax ``CheckpointManager``: atomic writes, the newest ``keep`` kept). Run again
with the same study and config, the study restores what was done and goes on from
there. Because every stage and every chunk is a deterministic function of its inputs
(explicit PRNG keys, the same compiled programs, the same chunk boundaries), a run
that was killed and resumed ends with bit-identical metrics to one that was never
interrupted. Only wall-clock timings differ.

Layout of a checkpoint directory::

    run.json              the study, its config and a hash of the code (a resume must
                          match all three)
    stage-<name>/0/       a finished stage's result (plain dicts / lists / arrays)
    loop-<name>/<k>/      a loop's carried state after k chunks (newest `keep`)
    loop-<name>-out/<k>/  the outputs of chunks 0..k-1 (newest `keep` + 1)

``NoCheckpoint`` has the same interface and does nothing, so a study's code is the
same with and without checkpointing.

Example:

    >>> import tempfile, numpy as np, ml_collections
    >>> from benchmarks import resume
    >>> config = ml_collections.ConfigDict({"steps": 3})
    >>> root = tempfile.mkdtemp() + "/run"
    >>> def advance(x, k):  # one chunk: new state, chunk output
    ...     return x * 2, {"k": k}
    >>> ck = resume.Checkpointer(
    ...     root, "demo", config, save_interval_s=0, remove_when_done=False
    ... )
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

import copy
import functools
import hashlib
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
from optstab import checkpoint

__all__ = ["Checkpointer", "ConfigMismatch", "NoCheckpoint", "open_checkpointer"]

PyTree = Any
RUN_FILE = "run.json"


class ConfigMismatch(ValueError):
    """The checkpoint directory holds a run of another study or another config."""


@functools.cache
def code_version() -> str:
    """SHA-256 of the library's and the benchmarks' Python sources: results saved by
    other code must not be mixed into a run."""
    digest = hashlib.sha256()
    for package in (Path(optstab.__file__).parent, Path(__file__).parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package.parent).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def fingerprint(
    study: str, config: ml_collections.ConfigDict | dict, context: dict | None = None
) -> dict:
    """What a resume must match: the study, its full config, the code, and the
    ``context`` it runs in (devices, library versions: a resumed run on other
    devices would not reproduce the same bits)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    run = {"study": study, "config": as_dict, "code": code_version(), "context": context}
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
        message = f"{what} {str(directory)!r} is not writable: {reason}"
        raise PermissionError(message) from None


def check_plain(value: PyTree, what: str) -> PyTree:
    """``value`` if it can be checkpointed and restored without a target, else a
    ``TypeError`` (checked with and without checkpointing, so tests catch it early)."""
    if not checkpoint.is_plain(value):
        raise TypeError(
            f"{what} must be dicts with string keys, lists, tuples, None, arrays and "
            "numbers (no strings, NamedTuples or other pytree nodes)"
        )
    return value


class NoCheckpoint:
    """The :class:`Checkpointer` interface without any saving: runs everything."""

    directory = None
    restored: tuple[str, ...] = ()  # nothing is ever restored
    resuming = False

    def stage(self, name: str, compute: Callable[[], PyTree]) -> PyTree:
        return check_plain(compute(), f"stage {name!r}")

    def loop(
        self,
        name: str,
        state: PyTree,
        num_chunks: int,
        advance: Callable[[PyTree, int], tuple[PyTree, PyTree]],
    ) -> tuple[PyTree, list]:
        outputs = []
        for index in range(num_chunks):
            state, output = advance(state, index)
            outputs.append(check_plain(output, f"loop {name!r} output"))
        return state, outputs

    def finish(self) -> None:
        pass


class Checkpointer(NoCheckpoint):
    """Saves finished stages and loop chunks under ``directory``; resumes from them.

    Args:
      directory: where the run's checkpoints live (created; must be writable).
      study: the study's name; with ``config`` it identifies the run.
      config: the study's config. Resuming with another study or config raises
        :class:`ConfigMismatch` instead of mixing the two runs.
      keep: how many of a loop's newest state checkpoints to keep (at least 1).
      save_interval_s: a loop saves its state after a chunk when this many seconds
        have passed since its last save (0: after every chunk).
      remove_when_done: :meth:`finish` deletes the directory (the JSON result is the
        durable output, and stale checkpoints must not outlive a code change).
      context: what else a resume must match (the runner records the devices and the
        jax, jaxlib and orbax versions).
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
    ):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if save_interval_s < 0:
            raise ValueError(f"save_interval_s must be >= 0, got {save_interval_s}")
        self.save_interval_s = save_interval_s
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.remove_when_done = remove_when_done
        self.restored: list[str] = []  # names of stages and loops picked up from disk
        self.resuming = False  # the directory held this run already
        check_writable(self.directory)
        self._active_loops: list[str] = []
        self._claim(fingerprint(study, config, context))

    def _claim(self, expected: dict) -> None:
        path = self.directory / RUN_FILE
        if path.exists():
            found = json.loads(path.read_text())
            differs = {
                "study": f"of another study ({found.get('study')})",
                "config": "with another config",
                "code": "made by other code (optstab or benchmarks changed since)",
                "context": f"on other devices or versions ({found.get('context')})",
            }
            mismatch = [
                reason for what, reason in differs.items() if found.get(what) != expected[what]
            ]
            if not mismatch:
                self.resuming = True
                return
            if self._saved():
                raise ConfigMismatch(
                    f"checkpoint directory {str(self.directory)!r} holds a run {mismatch[0]}; "
                    "remove it or choose another directory"
                )
            # Nothing was saved under the old claim (say its config was rejected): take over.
        elif self._saved() or any(self._foreign()):
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

        The result must be made of dicts with string keys, lists, tuples, None,
        arrays and Python scalars (it is restored without a target, dict key order
        included). The checkpoints of loops run inside the stage are deleted once
        the stage is saved.
        """
        path = self.directory / f"stage-{name}"
        if checkpoint.latest_step(path) is not None:
            self.restored.append(name)
            return checkpoint.restore(path)
        self._active_loops = []
        value = check_plain(compute(), f"stage {name!r}")
        checkpoint.save(path, 0, value)
        for loop in self._active_loops:
            for suffix in ("", "-out"):
                shutil.rmtree(self.directory / f"loop-{loop}{suffix}", ignore_errors=True)
        return value

    def loop(
        self,
        name: str,
        state: PyTree,
        num_chunks: int,
        advance: Callable[[PyTree, int], tuple[PyTree, PyTree]],
    ) -> tuple[PyTree, list]:
        """Runs ``state, output = advance(state, k)`` for k in ``range(num_chunks)``.

        After a chunk that ends at least ``save_interval_s`` seconds after the last
        save (every chunk when it is 0), the outputs so far (plain containers, as for
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
            outputs = checkpoint.restore(output_path, start)
        saved_outputs = set(checkpoint.all_steps(output_path))
        last_save = time.monotonic()
        for index in range(start, num_chunks):
            state, output = advance(state, index)
            outputs.append(check_plain(output, f"loop {name!r} output"))
            done = index + 1
            if done == num_chunks or time.monotonic() - last_save < self.save_interval_s:
                continue
            # Outputs first, then the state; the outputs keep one more step, so the
            # outputs of the newest state survive a kill between the two saves (a
            # redone chunk computes the same outputs, which are then not saved again).
            if done not in saved_outputs:
                checkpoint.save(output_path, done, outputs, keep=self.keep + 1)
            checkpoint.save(state_path, done, state, keep=self.keep)
            last_save = time.monotonic()
        return state, outputs

    def finish(self) -> None:
        """Marks the run done: deletes its checkpoints unless told to keep them."""
        if self.remove_when_done:
            shutil.rmtree(self.directory, ignore_errors=True)


def open_checkpointer(
    checkpoint_dir: str | os.PathLike | NoCheckpoint | None,
    study: str,
    config: ml_collections.ConfigDict,
    **kwargs: Any,
) -> NoCheckpoint:
    """The checkpointer a study's ``run`` uses: ``checkpoint_dir`` may be None (no
    checkpoints), a directory, or a ready (No)Checkpointer.

    A checkpointer handed in belongs to the caller: the study's ``finish()`` leaves
    its directory alone, and the caller finishes it once the result is safely
    written (the runner does so after writing the JSON).
    """
    if checkpoint_dir is None:
        return NoCheckpoint()
    if isinstance(checkpoint_dir, Checkpointer):
        borrowed = copy.copy(checkpoint_dir)  # shares `restored` and the directory
        borrowed.remove_when_done = False
        return borrowed
    if isinstance(checkpoint_dir, NoCheckpoint):
        return checkpoint_dir
    return Checkpointer(checkpoint_dir, study, config, **kwargs)
