"""Command-line runner for the benchmark studies.

    python -m benchmarks.run STUDY [--config tiny|quick|full|FILE.py[:ARG]]
                             [--config.KEY=VALUE ...] [--out results]
                             [--checkpoint-dir DIR | --no-checkpoint]
                             [--mesh auto|none|N] [--fsdp] [--distributed]

``STUDY`` is one of ``benchmarks.studies.STUDIES`` or ``all``. The config is
``configs/<study>.py``'s ``get_config("tiny" | "quick" | "full")`` (``--quick`` is
short for ``--config quick``; the default is ``full``), or ``get_config(ARG)`` of any
file. ``--config.KEY=VALUE`` (or ``--config.KEY VALUE``) overrides one field; nested
fields use dots (``--config.gnmr.lock_steps=56``) and the value is parsed to the
field's type (``--config.methods=none,gnmr_clip`` for tuples).

For every study asked for, the runner first checks the whole config (the study's
``prepare``: method names, every hyperparameter, sizes) and only then claims a
checkpoint directory and trains; it writes the result to ``<out>/<study>.json``, draws
``<out>/<study>.png`` and prints a summary table (:mod:`benchmarks.harness.study`).

Resume: finished stages (and chunks of long loops) are checkpointed under
``<out>/checkpoints/<study>`` (``--checkpoint-dir`` to move it; long training loops
also save their state every ``--save-every`` seconds). A run that was killed
resumes when started again with the same command, and ends with the same metrics as an
uninterrupted one; the directory is removed when the run completes. A directory holding
a run of another config, or of other code, is refused.

Scale: ``--mesh auto`` (default) puts the batch of every training step on all devices
(data parallel); ``--fsdp`` also splits large parameters; ``--distributed`` calls
``jax.distributed.initialize()`` first, for multi-host runs (see benchmarks/README.md).

Bad input (unknown study, bad override, broken config file, a config the study
rejects, unusable checkpoint or output directory) ends with a one-line ``error:``
message and exit status 2, before any training; a ``ValueError``, ``TypeError`` or
``OSError`` raised while a study runs ends with one line and status 1. ``--traceback``
shows full tracebacks.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.studies import STUDIES
from configs import SIZES

OVERRIDE = "--config."


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("study", help=f"one of {', '.join(STUDIES)}, all")
    parser.add_argument("--config", default=None, help="tiny, quick, full, or FILE.py[:ARG]")
    parser.add_argument("--quick", action="store_true", help="same as --config quick")
    parser.add_argument("--seeds", type=int, default=None, help="same as --config.num_seeds")
    parser.add_argument("--out", default="results", help="folder for the JSON and PNG files")
    parser.add_argument("--checkpoint-dir", default=None, help="default: <out>/checkpoints/<study>")
    parser.add_argument("--no-checkpoint", action="store_true", help="do not checkpoint")
    parser.add_argument("--keep", type=int, default=2, help="loop checkpoints kept (newest)")
    parser.add_argument(
        "--save-every",
        type=float,
        default=60.0,
        help="seconds between checkpoints inside a training loop (0: every chunk)",
    )
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the checkpoints of a finished run"
    )
    parser.add_argument("--mesh", default="auto", help="auto, none, or a device count")
    parser.add_argument("--fsdp", action="store_true", help="shard large parameters too")
    parser.add_argument(
        "--distributed", action="store_true", help="call jax.distributed.initialize() first"
    )
    parser.add_argument("--traceback", action="store_true", help="full tracebacks on errors")
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(OVERRIDE):
            key, eq, value = arg[len(OVERRIDE) :].partition("=")
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise UsageError(f"{arg} needs a value ({arg}=VALUE)")
                value, i = argv[i + 1], i + 1
            if not key:
                raise UsageError(f"{arg}: missing field name")
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


# ---------------------------------------------------------------------------
# Configs


def load_config(study: str, spec: str) -> Any:
    """A size of ``configs/<study>.py`` (``tiny``, ``quick``, ``full``), or ``FILE.py[:ARG]``."""
    if spec in SIZES:
        return importlib.import_module(f"configs.{study}").get_config(spec)
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise UsageError(f"--config must be {', '.join(SIZES)} or FILE.py[:ARG], got {spec!r}")
    if not os.path.isfile(path):
        raise UsageError(f"--config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - any failure of the user's file is bad input
        raise UsageError(f"--config file {path!r}: {type(error).__name__}: {error}") from None
    if not hasattr(module, "get_config"):
        raise UsageError(f"--config file {path!r} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except Exception as error:  # noqa: BLE001
        raise UsageError(
            f"--config {spec}: get_config raised {type(error).__name__}: {error}"
        ) from None


def parse_value(text: str, current: Any, where: str) -> Any:
    """``text`` converted to the type of the field's ``current`` value."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UsageError(f"{where}: expected true or false, got {text!r}")
    if isinstance(current, int | float):
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = None
        if value is None and isinstance(current, float):
            try:
                value = float(text)  # also inf and nan
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = type(current).__name__
            raise UsageError(f"{where}: expected {kind}, got {text!r}")
        if isinstance(current, int) and not float(value).is_integer():
            raise UsageError(f"{where}: expected int, got {text!r}")
        return type(current)(value)
    if isinstance(current, tuple | list):
        stripped = text.strip()
        if stripped[:1] in "([":
            try:
                items = ast.literal_eval(stripped)
            except (ValueError, SyntaxError):
                raise UsageError(f"{where}: cannot parse {text!r}") from None
        else:
            items = [part.strip() for part in stripped.split(",") if part.strip()]
        items = list(items) if isinstance(items, tuple | list) else [items]
        if current:  # every item takes the type of the field's first item
            items = [parse_value(str(x), current[0], where) for x in items]
        return type(current)(items)
    if current is None:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def apply_override(config: Any, key: str, text: str, study: str) -> None:
    """Sets ``config.<key>`` (dotted) from ``text``; unknown fields are an error."""
    import ml_collections

    where = f"{OVERRIDE}{key}"
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in fields:
            scope = ".".join(["config", *parts[:depth]])
            close = difflib.get_close_matches(part, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{where}: {study}'s {scope} has no field {part!r}{hint}")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict):
        raise UsageError(f"{where} is a group of fields; set one of {sorted(current.keys())}")
    value = parse_value(text, current, where)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as error:
        raise UsageError(f"{where}: {error}") from None


def make_config(study: str, args: argparse.Namespace, overrides: list) -> Any:
    spec = args.config or ("quick" if args.quick else "full")
    if args.quick and args.config not in (None, "quick"):
        raise UsageError(f"--quick contradicts --config {args.config}")
    config = load_config(study, spec)
    if args.seeds is not None:
        if "num_seeds" in config:
            overrides = [("num_seeds", str(args.seeds)), *overrides]
        elif len(args.study_names) > 1:
            print(f"note: {study} has no seeds; --seeds ignored for it")
        else:
            raise UsageError(f"{study} has no seeds (no num_seeds field); drop --seeds")
    for key, value in overrides:
        apply_override(config, key, value, study)
    return config


# ---------------------------------------------------------------------------
# Devices, plans and checkpoints


def make_mesh(spec: str) -> Any:
    from benchmarks.harness import parallel

    if spec == "auto":
        return "auto"
    if spec == "none":
        return None
    try:
        count = int(spec)
    except ValueError:
        raise UsageError(f"--mesh must be auto, none or a device count, got {spec!r}") from None
    try:
        return parallel.data_mesh(count)
    except ValueError as error:
        raise UsageError(f"--mesh {spec}: {error}") from None


def prepare(name: str, config: Any, mesh: Any) -> Any:
    """The study's plan: its whole config checked and its methods built, nothing run."""
    from benchmarks import studies

    try:
        return studies.load(name).check(config, mesh)
    except (ValueError, TypeError, KeyError, AttributeError) as error:  # a missing field too
        raise UsageError(f"{name}: {type(error).__name__}: {error}") from None


def make_checkpointer(study: str, config: Any, args: argparse.Namespace, mesh: Any) -> Any:
    from benchmarks.harness import resume

    if args.no_checkpoint:
        return resume.NoCheckpoint()
    directory = args.checkpoint_dir or Path(args.out) / "checkpoints" / study
    if args.checkpoint_dir and len(args.study_names) > 1:
        directory = Path(args.checkpoint_dir) / study
    try:
        return resume.Checkpointer(
            directory,
            study,
            config,
            keep=args.keep,
            save_interval_s=args.save_every,
            remove_when_done=not args.keep_checkpoints,
            context=resume.run_context(mesh, args.fsdp),
        )
    except (PermissionError, resume.ConfigMismatch, ValueError) as error:
        raise UsageError(str(error)) from None


# ---------------------------------------------------------------------------
# Running


def run_study(name: str, plan: Any, config: Any, checkpointer: Any, args, mesh) -> dict:
    """Runs one study end to end, writes its JSON and PNG, then drops its checkpoints."""
    import jax

    from benchmarks import studies
    from benchmarks.harness import Context, reporting

    out = Path(args.out)
    study = studies.load(name)
    print(f"== {name} ({config.get('size', 'custom')}) ==")
    if checkpointer.resuming:
        print(f"resuming {name} from {checkpointer.directory}")
    start = time.perf_counter()
    result = study.execute(plan, Context(name, config, mesh, args.fsdp, checkpointer))
    if checkpointer.restored:
        print(f"restored from checkpoints: {', '.join(checkpointer.restored)}")
    if jax.process_index() == 0:  # multi-host: one writer
        json_path = reporting.write_json(result, out / f"{name}.json")
        png_path = study.plot(result, out / f"{name}.png")
        print(study.table(result))
        print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.0f} s\n")
    checkpointer.finish()  # only now: the result is on disk
    if not args.checkpoint_dir:  # the default <out>/checkpoints goes too once empty
        with contextlib.suppress(OSError):
            (out / "checkpoints").rmdir()
    return result


def parse(argv: list[str]) -> tuple[argparse.Namespace, list]:
    rest, overrides = split_overrides(argv)
    args = build_parser().parse_args(rest)
    if args.study not in (*STUDIES, "all"):
        close = difflib.get_close_matches(args.study, STUDIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(
            f"unknown study {args.study!r}{hint}; choose one of {', '.join((*STUDIES, 'all'))}"
        )
    if args.seeds is not None and args.seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {args.seeds}")
    if args.keep < 1:
        raise UsageError(f"--keep must be at least 1, got {args.keep}")
    if args.save_every < 0:
        raise UsageError(f"--save-every must be at least 0, got {args.save_every}")
    args.study_names = STUDIES if args.study == "all" else (args.study,)
    if overrides and len(args.study_names) > 1:
        raise UsageError("--config.KEY overrides need a single study, not 'all'")
    if args.config not in (None, *SIZES) and len(args.study_names) > 1:
        raise UsageError("--config FILE needs a single study, not 'all'")
    if args.no_checkpoint and args.checkpoint_dir:
        raise UsageError("--no-checkpoint contradicts --checkpoint-dir")
    return args, overrides


def check_output_dir(path: str) -> None:
    """The results folder must be writable before hours of work go into it."""
    from benchmarks.harness import resume

    try:
        resume.check_writable(Path(path), what="--out folder")
    except PermissionError as error:
        raise UsageError(str(error)) from None


def initialize_distributed(args: argparse.Namespace) -> None:
    import jax

    from benchmarks.harness import parallel

    try:
        parallel.initialize_distributed()
    except (ValueError, RuntimeError) as error:
        raise UsageError(f"--distributed: {error}") from None
    if jax.process_count() > 1 and not args.no_checkpoint:
        raise UsageError("checkpointing a multi-host run is not supported yet: add --no-checkpoint")


def resolve_mesh(spec: Any) -> Any:
    from benchmarks.harness import parallel

    return parallel.resolve_mesh(spec)


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")  # figures go to files; no display needed
    argv = sys.argv[1:] if argv is None else argv
    traceback = "--traceback" in argv
    try:
        args, overrides = parse(argv)
        if args.distributed:
            initialize_distributed(args)
        mesh = resolve_mesh(make_mesh(args.mesh))
        check_output_dir(args.out)
        configs = {name: make_config(name, args, overrides) for name in args.study_names}
        # Every config is checked before anything is claimed or trained.
        plans = {name: prepare(name, config, mesh) for name, config in configs.items()}
        checkpointers = {
            name: make_checkpointer(name, config, args, mesh) for name, config in configs.items()
        }
        for name, config in configs.items():
            try:
                run_study(name, plans[name], config, checkpointers[name], args, mesh)
            except (ValueError, TypeError, OSError) as error:
                if traceback:
                    raise
                print(f"error: {name}: {type(error).__name__}: {error}", file=sys.stderr)
                return 1
    except UsageError as error:
        if traceback:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
