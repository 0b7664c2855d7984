"""The command line: config sizes and files, overrides with the field types, and bad
input reported in one line with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import run as runner
from benchmarks.harness import resume
from configs import spike_injection as spike_config

ROOT = Path(__file__).resolve().parents[3]


def parsed_config(study: str, *argv: str):
    args, overrides = runner.parse([study, *argv])
    return runner.make_config(study, args, overrides)


def test_overrides_reach_nested_fields_with_the_field_types():
    config = parsed_config(
        "lowprec_lm",
        "--config",
        "quick",
        "--config.num_steps=40",
        "--config.gnmr.warmup_steps",
        "56",
        "--config.methods=reference,none",
        "--config.burst_length=(3, 5)",
        "--config.persistent=false",
        "--config.burst_prob=0.25",
    )
    assert config.num_steps == 40 and config.gnmr.warmup_steps == 56
    assert config.methods == ("reference", "none") and config.burst_length == (3, 5)
    assert config.persistent is False and config.burst_prob == 0.25
    assert config.size == "quick"


def test_config_file_with_an_argument(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "from configs import spike_injection\n"
        "def get_config(arg):\n"
        "    c = spike_injection.get_config('quick')\n"
        "    c.num_steps = int(arg)\n"
        "    return c\n"
    )
    config = parsed_config("spike_injection", "--config", f"{path}:77", "--seeds", "2")
    assert config.num_steps == 77 and config.num_seeds == 2


def test_seeds_with_all_skips_studies_without_seeds(capsys):
    args, overrides = runner.parse(["all", "--quick", "--seeds", "2"])
    assert runner.make_config("spike_injection", args, overrides).num_seeds == 2
    runner.make_config("overhead", args, overrides)
    assert "overhead has no seeds" in capsys.readouterr().out


def test_sizes_quick_flag_and_default():
    assert parsed_config("overhead", "--quick") == parsed_config("overhead", "--config", "quick")
    assert parsed_config("overhead").size == "full"
    assert parsed_config("overhead", "--config", "tiny").size == "tiny"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nonsense"], "unknown study 'nonsense'"),
        (["spike_injectoin"], "did you mean 'spike_injection'"),
        (["spike_injection", "--config.num_seed=3"], "did you mean 'num_seeds'"),
        (["spike_injection", "--config.num_seeds=abc"], "expected int"),
        (["spike_injection", "--config.learning_rate=fast"], "expected float"),
        (["spike_injection", "--config.gnmr=3"], "is a group of fields"),
        (["spike_injection", "--config.gnmr.nope=3"], "config.gnmr has no field 'nope'"),
        (["spike_injection", "--config.num_seeds"], "needs a value"),
        (["spike_injection", "--config", "medium"], "tiny, quick, full or FILE.py"),
        (["spike_injection", "--config", "missing.py"], "does not exist"),
        (["spike_injection", "--bogus"], "unrecognized arguments: --bogus"),
        (["spike_injection", "--mesh", "99"], "asked for 99 devices"),
        (["spike_injection", "--mesh", "many"], "--mesh must be auto, none or a device count"),
        (["all", "--config.num_seeds=2"], "need a single study"),
        (["overhead", "--seeds", "2"], "has no seeds"),
        (["spike_injection", "--seeds", "0"], "--seeds must be at least 1"),
        (["spike_injection", "--save-every", "-1"], "--save-every must be at least 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert runner.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_unusable_checkpoint_dir_is_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["spike_injection", "--quick", "--checkpoint-dir", str(blocker / "ck")]
    assert runner.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_read_only_checkpoint_dir_is_one_line(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    argv = ["spike_injection", "--quick", "--checkpoint-dir", str(locked / "ck")]
    assert runner.main([*argv, "--out", str(tmp_path)]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_checkpoint_dir_of_another_config_is_refused(capsys, tmp_path):
    config = spike_config.get_config("quick")
    resume.Checkpointer(tmp_path / "ck", "spike_injection", config).stage("a", lambda: [1])
    argv = ["spike_injection", "--quick", "--config.num_steps=10"]
    assert runner.main([*argv, "--checkpoint-dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with another config" in err, err


def test_broken_config_file_is_one_line(capsys, tmp_path):
    for text in ("def get_config(:\n", "def get_config():\n    raise KeyError('x')\n"):
        path = tmp_path / "broken.py"
        path.write_text(text)
        assert runner.main(["spike_injection", "--config", str(path), "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--config" in err, err


def test_contradictions_and_unwritable_out_are_one_line(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = ["spike_injection", "--no-checkpoint", "--checkpoint-dir", str(tmp_path)]
    assert runner.main(argv) == 2
    assert "contradicts" in capsys.readouterr().err
    assert runner.main(["spike_injection", "--quick", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out folder" in err, err


def test_override_values_take_the_field_type():
    assert runner.parse_value("(1, 2)", (0.5,), "w") == (1.0, 2.0)
    assert runner.parse_value("3,4", [1], "w") == [3, 4]
    assert runner.parse_value("inf", 1.0, "w") == float("inf")
    assert runner.parse_value("-2", 1, "w") == -2
    with pytest.raises(runner.UsageError, match="expected int"):
        runner.parse_value("(1.5, 2)", (1,), "w")


def test_cli_subprocess_error_has_no_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "lowprec_lm", "--config.gnmr.lock=3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
