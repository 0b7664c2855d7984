"""Two results side by side, without what measures the machine rather than the method.

``metrics(result)`` drops the timings (keys ending in ``_s``, step / update / compile
times, time ratios), the environment and the mesh; :func:`differences` lists the
leaves where two such results disagree. From the shell, every study's JSON in two
results folders (``make bench`` into each, say, before and after a change)::

    python -m benchmarks.harness.compare /tmp/before /tmp/after [--rtol R] [--atol A]

prints one row per study (leaves compared, leaves that differ, the largest relative
difference) and exits with status 1 when any leaf differs.

Example:

    >>> from benchmarks.harness import compare
    >>> a = {"summary": {"acc": 0.9, "step_time_s": 0.1}, "environment": {"cpu": 2}}
    >>> b = {"summary": {"acc": 0.9, "step_time_s": 0.3}, "environment": {"cpu": 8}}
    >>> compare.metrics(a), compare.differences(compare.metrics(a), compare.metrics(b))
    ({'summary': {'acc': 0.9}}, [])
    >>> compare.differences({"acc": 0.9}, {"acc": 0.8})
    ['/acc: 0.9 != 0.8']
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

# Result keys that are measurements of the machine, not of the method.
MACHINE_KEYS = frozenset({"environment", "mesh", "ratio_size_0", "ratio_size_small"})
TIMING_WORDS = ("time_ratio", "step_time", "update_time", "compile_time", "_times")


def is_machine_key(key: str) -> bool:
    """Keys holding timings or machine facts: listed, ``*_s`` (seconds), step/update/
    compile times and time ratios (``recovery_time``, a step count, is a metric)."""
    return key in MACHINE_KEYS or key.endswith("_s") or any(w in key for w in TIMING_WORDS)


def metrics(result: Any) -> Any:
    """``result`` without its machine measurements (timings, environment, mesh)."""
    if isinstance(result, dict):
        return {k: metrics(v) for k, v in result.items() if not is_machine_key(k)}
    if isinstance(result, list | tuple):
        return [metrics(v) for v in result]
    return result


def _close(got: Any, want: Any, rtol: float, atol: float) -> bool:
    if math.isnan(want) or math.isnan(got):
        return math.isnan(want) and math.isnan(got)
    return abs(got - want) <= atol + rtol * abs(want)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def differences(
    got: Any, want: Any, rtol: float = 0.0, atol: float = 0.0, path: str = ""
) -> list[str]:
    """Where ``got`` and ``want`` differ: another structure, or leaves not equal (floats
    within ``atol + rtol * |want|``, NaN equal to NaN; everything else, counts included,
    exactly). One line per difference."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            keys = set(got) ^ set(want) if isinstance(got, dict) else type(got).__name__
            return [f"{path or '/'}: keys differ: {keys}"]
        return [d for k in want for d in differences(got[k], want[k], rtol, atol, f"{path}/{k}")]
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            return [f"{path}: lengths differ"]
        pairs = enumerate(zip(got, want, strict=True))
        return [d for i, (g, w) in pairs for d in differences(g, w, rtol, atol, f"{path}[{i}]")]
    if isinstance(want, float) and _number(got):  # integers (counts) must be equal
        return [] if _close(got, want, rtol, atol) else [f"{path}: {got} != {want}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def common(got: Any, want: Any) -> tuple[Any, Any]:
    """``got`` and ``want`` cut to the keys (and list lengths) they share."""
    if isinstance(got, dict) and isinstance(want, dict):
        pairs = {k: common(got[k], want[k]) for k in want if k in got}
        return {k: g for k, (g, _) in pairs.items()}, {k: w for k, (_, w) in pairs.items()}
    if isinstance(got, list | tuple) and isinstance(want, list | tuple):
        pairs = [common(g, w) for g, w in zip(got, want, strict=False)]
        return [g for g, _ in pairs], [w for _, w in pairs]
    return got, want


def leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in leaves(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in leaves(value)]
    return [tree]


def largest_relative(got: Any, want: Any) -> float:
    """The largest ``|got - want| / |want|`` over the numeric leaves both have."""
    worst = 0.0
    for g, w in zip(*(leaves(tree) for tree in common(got, want)), strict=True):
        if _number(g) and _number(w) and w != g and math.isfinite(g) and math.isfinite(w):
            worst = max(worst, abs(g - w) / abs(w) if w else math.inf)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.harness.compare")
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rtol", type=float, default=0.0)
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args(argv)
    failed = False
    print(f"{'study':18} {'leaves':>7} {'differ':>7} {'max rel diff':>13}")
    for path in sorted(args.before.glob("*.json")):
        other = args.after / path.name
        if not other.exists():
            print(f"{path.stem:18} missing in {args.after}")
            failed = True
            continue
        want, got = (metrics(json.loads(p.read_text())) for p in (path, other))
        found = differences(got, want, args.rtol, args.atol)
        print(f"{path.stem:18} {len(leaves(want)):7} {len(found):7} "
              f"{largest_relative(got, want):13.3g}")  # fmt: skip
        for line in found[:10]:
            print(f"    {line}")
        failed |= bool(found)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
