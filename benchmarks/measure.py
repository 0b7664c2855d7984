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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm


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
