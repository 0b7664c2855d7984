"""Command-line runner for the benchmark studies.

    python -m benchmarks.run STUDY [--quick] [--seeds N] [--out results]

``STUDY`` is one of ``STUDIES`` below or ``all``. For each study the runner
loads ``configs/<study>.py`` (``get_config("quick")`` with ``--quick``, else
``get_config("full")``), calls ``benchmarks.<study>.run(config)``, writes the returned
dict to ``<out>/<study>.json``, draws ``<out>/<study>.png`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from benchmarks import reporting

STUDIES = (
    "spike_injection",
    "overhead",
    "perturbed_sgd",
    "bilevel_cleaning",
    "bilevel_memory",
    "bilevel_mixture",
    "lowprec_lm",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help=f"one of {', '.join(STUDIES)}, all")
    parser.add_argument("--quick", action="store_true", help="the small, fast configuration")
    parser.add_argument(
        "--seeds", type=int, default=None, help="number of seeds (studies that use seeds)"
    )
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG files")
    return parser.parse_args(argv)


def run_study(name: str, quick: bool, seeds: int | None, out: Path) -> dict:
    """Runs one study end to end and returns its result dict."""
    config = importlib.import_module(f"configs.{name}").get_config("quick" if quick else "full")
    if seeds is not None:
        if "num_seeds" in config:
            config.num_seeds = seeds
        else:
            print(f"note: {name} has no seeds; --seeds ignored")
    study = importlib.import_module(f"benchmarks.{name}")
    print(f"== {name} ({config.size}) ==")
    start = time.perf_counter()
    result = study.run(config)
    json_path = reporting.write_json(result, out / f"{name}.json")
    png_path = study.plot(result, out / f"{name}.png")
    print(study.table(result))
    print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.0f} s\n")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.study not in (*STUDIES, "all"):
        choices = ", ".join((*STUDIES, "all"))
        print(f"error: unknown study {args.study!r}; choose one of {choices}", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print(f"error: --seeds must be at least 1, got {args.seeds}", file=sys.stderr)
        return 2
    names = STUDIES if args.study == "all" else (args.study,)
    for name in names:
        run_study(name, args.quick, args.seeds, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
