"""What a running study may use: its config, the devices, checkpointed stages, progress.

The harness makes one :class:`Context` per run (:mod:`benchmarks.harness.study`); a study
never builds one, never sees a checkpointer, and never writes the result envelope.

* ``context.config``, ``context.mesh`` (a ``("data",)`` mesh or None, already resolved)
  and ``context.fsdp``;
* ``context.stage(name, compute)``: ``compute()``, or its saved result when a resumed
  run finished this stage before; timed (the envelope's ``timing_s.stages``);
* ``context.loop(name, state, num_chunks, advance)``: a long loop inside a stage that
  saves its state every so often (see :class:`benchmarks.harness.resume.Checkpointer`);
* ``context.restored``: the names of the stages and loops taken from disk;
* ``context.each(items)`` and ``context.progress(total)``: progress bars labelled with the
  study and, as they go, with the method (or point, or section) that is running.

Example:

    >>> import ml_collections
    >>> from benchmarks.harness import context, resume
    >>> ctx = context.Context("demo", ml_collections.ConfigDict(), None, False,
    ...                       resume.NoCheckpoint())
    >>> [ctx.stage(name, lambda name=name: len(name)) for name in ctx.each(["a", "bb"])]
    [1, 2]
    >>> sorted(ctx.stage_seconds)
    ['a', 'bb']
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
from jax.sharding import Mesh
from tqdm.auto import tqdm

from benchmarks.harness import resume

PyTree = Any


class Context:
    """The run context of one study (see the module docstring)."""

    def __init__(
        self,
        study: str,
        config: ml_collections.ConfigDict,
        mesh: Mesh | None,
        fsdp: bool,
        checkpointer: resume.NoCheckpoint,
    ):
        self.study = study
        self.config = config
        self.mesh = mesh
        self.fsdp = fsdp
        self._checkpointer = checkpointer
        self.stage_seconds: dict[str, float | None] = {}  # None: restored from disk
        # state, outputs = context.loop(name, state, num_chunks, advance): a resumable
        # loop of chunks inside a stage (see resume.Checkpointer.loop).
        self.loop = checkpointer.loop

    @property
    def restored(self) -> list[str]:
        """Stages (``name``) and loops (``name/loop``) picked up from disk."""
        return self._checkpointer.restored

    def stage(self, name: str, compute: Callable[[], PyTree]) -> PyTree:
        """``compute()`` as a checkpointed stage: plain containers of arrays and numbers."""
        start = time.perf_counter()
        value = self._checkpointer.stage(name, compute)
        fresh = name not in self._checkpointer.restored
        self.stage_seconds[name] = time.perf_counter() - start if fresh else None
        return value

    def progress(self, total: int, unit: str = "it", desc: str | None = None) -> tqdm:
        """A progress bar named after the study (or ``desc``); call its
        ``set_postfix_str(name)`` to show what is running."""
        return tqdm(total=total, unit=unit, desc=desc or self.study, leave=False)

    def each(
        self, items: Sequence[Any], label: Callable[[Any], str] = str, desc: str | None = None
    ) -> Iterator[Any]:
        """``items`` one by one, behind a progress bar that names the running item."""
        with self.progress(len(items), desc=desc) as bar:
            for item in items:
                bar.set_postfix_str(label(item))
                yield item
                bar.update()
