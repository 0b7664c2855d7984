"""Compile time, compiled memory and step time of jitted functions.

* Compile time: wall time of ``jax.jit(f).lower(*args).compile()``, measured apart
  from any step time.
* Compiled memory: from XLA's ``memory_analysis()`` of the compiled executable,
  argument + output + temp - alias bytes. Donated arguments that XLA reuses for
  outputs are counted once through the alias term. (On CPU
  ``peak_memory_in_bytes`` leaves out temp buffers, so it is not used.)
* Step time: the median of repeated calls of the compiled executable, each ended by
  ``jax.block_until_ready``. Several functions are timed round-robin, in a rotated
  order each round, so slow drifts of the machine hit all of them alike.
* A donated step (:func:`compile_step`): compiled once with its carried arguments
  donated, its outputs keeping their inputs' shardings, and timed round-robin
  (:func:`time_compiled_steps`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks.harness import parallel


def compile_timed(
    fn: Callable, *args: Any, donate_argnums: int | Sequence[int] = ()
) -> tuple[Any, float]:
    """Lowers and compiles ``fn`` for ``args``; returns the executable and the seconds."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - start


def compile_and_run(jitted: Any, *args: Any) -> tuple[Any, float, float]:
    """Compiles a jitted function for ``args`` and runs it once.

    Returns the outputs as numpy arrays, the compile seconds and the run seconds.
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    run_s = time.perf_counter() - start
    return jax.tree.map(np.asarray, out), compile_s, run_s


def memory_bytes(compiled: Any) -> dict[str, int]:
    """Bytes of a compiled executable: its parts and ``total`` = arg + out + temp - alias."""
    stats = compiled.memory_analysis()
    parts = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }
    parts["total"] = parts["argument"] + parts["output"] + parts["temp"] - parts["alias"]
    return parts


def interleaved_times(
    steps: dict[str, Callable[[Any], Any]],
    states: dict[str, Any],
    repeats: int,
    warmup: int = 1,
    desc: str = "timing",
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Times ``state = steps[name](state)`` for every name, round-robin.

    Args:
      steps: name -> function of one state returning the next state (it may donate
        its input).
      states: name -> initial state.
      repeats: timed rounds; every round calls each function once.
      warmup: untimed rounds run first.
      desc: progress-bar label.

    Returns:
      name -> list of per-call seconds (length ``repeats``), and the final states.
    """
    names = list(steps)
    states = dict(states)
    times: dict[str, list[float]] = {name: [] for name in names}
    total = (warmup + repeats) * len(names)
    with tqdm(total=total, desc=desc, leave=False) as bar:
        for round_index in range(warmup + repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                states[name] = jax.block_until_ready(steps[name](states[name]))
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    times[name].append(elapsed)
                bar.update()
    return times, states


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence as a Python float."""
    return float(np.median(np.asarray(values, dtype=np.float64)))


class CompiledStep(NamedTuple):
    """A step compiled with its first two arguments donated, and what it cost."""

    fn: Any  # the compiled executable
    compile_s: float
    memory: dict[str, int]  # memory_bytes: argument, output, temp, alias, total


def compile_step(step: Callable, *args: Any, mesh: Any = None) -> CompiledStep:
    """Compiles ``step(*args)`` donating ``args[0]`` and ``args[1]``; memory from XLA.

    The executable takes arguments placed as ``args`` are. With a ``mesh`` its two
    outputs keep the shardings of ``args[0]`` and ``args[1]``, so that one call's
    outputs can be the next call's inputs; the memory is then per device.
    """
    shardings = parallel.shardings_of(args[:2], mesh)
    compiled, seconds = compile_timed(
        lambda *inputs: parallel.constrain(step(*inputs), shardings), *args, donate_argnums=(0, 1)
    )
    return CompiledStep(compiled, seconds, memory_bytes(compiled))


def fresh_copy(tree: Any) -> Any:
    """New buffers with the values of ``tree`` (a donated call deletes its inputs)."""
    return jax.tree.map(jnp.copy, tree)


def time_compiled_steps(
    compiled: Mapping[str, CompiledStep],
    carries: Mapping[str, tuple[Any, Any]],
    batches: Mapping[str, tuple[Any, ...]],
    repeats: int,
    warmup: int,
    desc: str = "step time",
) -> dict[str, list[float]]:
    """Per-call seconds of every compiled step, measured round-robin.

    ``carries[name]`` is the donated ``(first, second)`` pair (copied here, so the
    caller's arrays survive); ``batches[name]`` the remaining, fixed arguments.
    """

    def runner(name):
        fn, extra = compiled[name].fn, batches[name]
        return lambda carry: fn(*carry, *extra)

    times, _ = interleaved_times(
        {name: runner(name) for name in compiled},
        {name: fresh_copy(carries[name]) for name in compiled},
        repeats=repeats,
        warmup=warmup,
        desc=desc,
    )
    return times
