"""Results files, summary tables and plot styling shared by the studies."""

from __future__ import annotations

import json
import math
import os
import platform
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


def environment() -> dict[str, Any]:
    """Versions and hardware the results were measured on."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "optax": optax.__version__,
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


def save_figure(fig: Any, path: str | Path) -> Path:
    """Saves ``fig`` to ``path`` (creating the folder) and closes it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
