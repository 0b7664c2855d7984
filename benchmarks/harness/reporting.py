"""Results files, summary tables, and the one look of every figure.

* JSON: :func:`to_jsonable` (numpy and jax values, non-finite floats as null) and
  :func:`write_json`; :func:`environment` records where a result was measured,
  including the SHA-256 of ``requirements/lock.txt`` (the tested versions).
* Tables: :func:`format_table` and :func:`format_goals` (plain text, one screen).
* Figures: :func:`plot_style`, :func:`save_figure`, and the palette: :func:`color`
  gives every method one colour in every panel of every study, and :func:`ordered`
  one order for every table and legend (the order of :data:`PALETTE`).

Example:

    >>> from benchmarks.harness import reporting
    >>> reporting.ordered(["gnmr_clip", "zclip", "none", "clean"])
    ['clean', 'none', 'zclip', 'gnmr_clip']
    >>> reporting.color("zclip") == reporting.color("zclip"), reporting.color("none")
    (True, '#7f7f7f')
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax


def to_jsonable(value: Any, digits: int | None = None) -> Any:
    """Converts numpy/JAX values, tuples and config dicts to plain JSON types.

    Non-finite floats become ``None`` (JSON has no NaN); ``digits`` rounds floats to
    that many significant digits to keep long per-step curves small.
    """
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
        items = value.to_dict() if hasattr(value, "to_dict") else value
        return {str(k): to_jsonable(v, digits) for k, v in items.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, digits) for v in value]
    if isinstance(value, (jax.Array, np.ndarray)):
        return to_jsonable(np.asarray(value).tolist(), digits)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return None
        if digits is not None and value != 0.0:
            return float(f"{value:.{digits}g}")
        return value
    return value


def write_json(result: Mapping[str, Any], path: str | Path) -> Path:
    """Writes ``result`` (already JSON-ready) to ``path``, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    return path


LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"


def lock_sha256(path: Path = LOCK_FILE) -> str | None:
    """SHA-256 of the tested-versions lock (None where the file is not there)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Versions and hardware the results were measured on."""
    import flax
    import jaxlib
    import orbax.checkpoint

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "orbax": getattr(orbax.checkpoint, "__version__", None),
        "numpy": np.__version__,
        # The versions `make bench` installs (requirements/lock.txt): equal hashes mean
        # equal package sets.
        "lock_sha256": lock_sha256(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        # Other processes share the machine: timings mean little when this exceeds
        # the CPU count.
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def format_value(value: Any) -> str:
    """Short text for a table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0.0:
            return "0"
        if abs(value) >= 1e4 or abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (the first column left-aligned)."""
    cells = [[str(h) for h in headers]] + [[format_value(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def format_goals(goal: Mapping[str, Any]) -> str:
    """One line per boolean goal check: ``[pass] name`` or ``[FAIL] name``."""
    lines = []
    for name, value in goal.items():
        if isinstance(value, bool):
            lines.append(f"  [{'pass' if value else 'FAIL'}] {name}")
    return "\n".join(lines)


def plot_style() -> None:
    """Matplotlib settings shared by every study's figure (global rcParams).

    The backend is left alone, so figures show inline in a notebook; the command-line
    runner selects the non-interactive ``Agg`` backend itself.
    """
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 110,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
        }
    )


def figure(rows: int, cols: int, size: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` in the shared style: a figure and its axes (matplotlib is
    imported here, when a study draws, never when it only measures)."""
    plot_style()
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, **kwargs)


def report(
    heading: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], *notes: str,
    goal: Mapping[str, Any] | None = None, goal_title: str = "goals:",
) -> str:  # fmt: skip
    """A study's one-screen summary: a heading line, the table, notes, then the goals."""
    lines = [heading, format_table(headers, rows), *notes]
    if goal is not None:
        lines += [goal_title, format_goals(goal)]
    return "\n".join(lines)


# The cost columns of the studies that measure a compiled step.
COST_HEADERS = ("peak_MiB", "bytes_ratio", "step_ms", "time_ratio", "compile_s")


def cost_cells(peak_bytes, bytes_ratio, step_s, time_ratio, compile_s) -> list:
    """The cells under :data:`COST_HEADERS` (MiB, ratio, ms, ratio, s; None: not measured)."""
    step_ms = None if step_s is None else 1e3 * step_s
    return [peak_bytes / 2**20, bytes_ratio, step_ms, time_ratio, compile_s]


def save_figure(fig: Any, path: str | Path) -> Path:
    """Saves ``fig`` to ``path`` (creating the folder) and closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------
# One palette: a colour per method, the same in every panel of every study; the order
# of this dict is the order of every table and legend. Methods that play the same role
# in different studies (the unstressed reference, the unprotected run, the oracle)
# share a colour; the stability methods and the bilevel solvers never share a figure,
# so the two families reuse colours.

PALETTE = {
    # references: unstressed, unprotected, and the oracles
    "clean": "#000000",
    "reference": "#000000",
    "adamw": "#000000",
    "none": "#7f7f7f",
    "no_cleaning": "#7f7f7f",
    "no_reweighting": "#7f7f7f",
    "uniform": "#7f7f7f",
    "oracle": "#bcbd22",
    "oracle_clean": "#bcbd22",
    "oracle_precision": "#bcbd22",
    # optimizer-level peers
    "clip_by_global_norm": "#ff7f0e",
    "zclip": "#2ca02c",
    "adagc": "#9467bd",
    "spam": "#d62728",
    "skip_step": "#8c564b",
    # low-precision recipes (lowprec_lm)
    "current_scaling": "#aec7e8",
    "fine_grained": "#c49c94",
    # GNMR
    "gnmr": "#1f77b4",
    "gnmr_chain": "#1f77b4",
    "gnmr_clip": "#1f77b4",
    "gnmr_precision": "#1f77b4",
    "gnmr_wrap": "#17becf",
    "gnmr_skip": "#17becf",
    "gnmr_precision_clip": "#17becf",
    "gnmr_clip_budget2": "#393b79",
    "gnmr_skip_budget2": "#6b6ecf",
    "gnmr_amax": "#e377c2",
    "gnmr_precision_external": "#e377c2",  # the registry's name of lowprec_lm's gnmr_amax
    "gnmr_both": "#9edae5",
    "gnmr_precision_both": "#9edae5",
    # bilevel solvers (BROS by rank; a naive variant takes its rank's colour, dashed)
    "soba": "#ff7f0e",
    "ma_soba": "#1f77b4",
    "bros_r4": "#98df8a",
    "bros_r8": "#2ca02c",
    "bros_r16": "#17becf",
    "bros_r32": "#9467bd",
    "bros_r64": "#c5b0d5",
    "bros_r128": "#d62728",
    # decentralized graphs (D-SOBA) and their centralized reference
    "centralized": "#000000",
    "ring": "#d62728",
    "torus": "#ff7f0e",
    "exponential": "#2ca02c",
    "complete": "#1f77b4",
}
_SPARE = ("#e7ba52", "#843c39", "#637939", "#7b4173", "#ad494a", "#8ca252", "#de9ed6")


def color(name: str) -> str:
    """The colour of method ``name`` (``*_naive`` takes its factored rank's colour; a
    name outside :data:`PALETTE` gets a spare colour chosen by a stable hash)."""
    name = name.removesuffix("_naive")
    if name in PALETTE:
        return PALETTE[name]
    return _SPARE[zlib.crc32(name.encode()) % len(_SPARE)]


def ordered(names: Sequence[str]) -> list[str]:
    """``names`` in the order of :data:`PALETTE` (unknown names last, as given)."""
    order = {name: i for i, name in enumerate(PALETTE)}

    def key(name: str) -> tuple[int, int]:
        base = name.removesuffix("_naive")
        return (order.get(base, len(order)), name != base)

    return sorted(names, key=key)


# ---------------------------------------------------------------------------
# Panels every study draws the same way


def method_bars(
    ax: Any, names: Sequence[str], series: Mapping[str, Mapping[str, float]], ylabel: str,
    title: str,
) -> None:  # fmt: skip
    """One bar per method in its colour, for each of ``series`` (label -> name ->
    value) side by side; the second and later series are hatched."""
    x = np.arange(len(names))
    width = 0.8 / len(series)
    hatches = ("", "//", "..", "xx")
    for i, (label, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        heights = [values[name] for name in names]
        colors = [color(name) for name in names]
        ax.bar(x + offset, heights, width, color=colors, hatch=hatches[i % 4], label=label,
               edgecolor="white" if i == 0 else "k", linewidth=0.5)  # fmt: skip
    ax.set_xticks(x, names, rotation=30, ha="right")
    low = min(min(p.get_height() for p in ax.patches), 1.0)
    ax.set_ylim(max(0.0, low - 0.1), None)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def seed_boxes(
    ax: Any, names: Sequence[str], values: Mapping[str, Sequence[float]], ylabel: str, title: str
) -> None:
    """A box per method over its seeds, with every seed as a dot in the method's colour."""
    data = [[v for v in values[name] if v is not None] for name in names]
    ax.boxplot(data, showfliers=False)
    rng = np.random.default_rng(0)
    for i, (name, points) in enumerate(zip(names, data, strict=True), start=1):
        jitter = rng.uniform(-0.15, 0.15, len(points))
        ax.scatter(i + jitter, points, s=10, zorder=3, color=color(name))
    ax.set_xticks(range(1, len(names) + 1), names, rotation=35, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
