"""The shared runner: config overrides, one-line errors, resume after SIGKILL, and a
study on 8 simulated devices giving the numbers of one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import study_checks

from benchmarks import lowprec_lm, parallel, resume, spike_injection
from benchmarks import run as runner
from configs import lowprec_lm as lowprec_config
from configs import spike_injection as spike_config

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


# ---------------------------------------------------------------------------
# Configs and overrides


def parsed_config(study: str, *argv: str):
    args, overrides = runner.parse([study, *argv])
    return runner.make_config(study, args, overrides)


def test_overrides_reach_nested_fields_with_the_field_types():
    config = parsed_config(
        "lowprec_lm",
        "--config",
        "quick",
        "--config.num_steps=40",
        "--config.gnmr.lock_steps",
        "56",
        "--config.methods=reference,none",
        "--config.burst_length=(3, 5)",
        "--config.persistent=false",
        "--config.burst_prob=0.25",
    )
    assert config.num_steps == 40 and config.gnmr.lock_steps == 56
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


def test_quick_flag_is_the_quick_config():
    assert parsed_config("overhead", "--quick") == parsed_config("overhead", "--config", "quick")
    assert parsed_config("overhead").size == "full"


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
        (["spike_injection", "--config", "medium"], "quick, full or FILE.py"),
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


def test_a_study_rejecting_its_config_is_one_line_exit_1(capsys, tmp_path):
    argv = ["lowprec_lm", "--quick", "--config.methods=bogus", "--out", str(tmp_path)]
    assert runner.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: lowprec_lm: ValueError") and err.count("\n") == 1, err
    # Nothing was saved, so the corrected command may use the same directory.
    config = lowprec_config.get_config("quick")
    ck = resume.Checkpointer(tmp_path / "checkpoints" / "lowprec_lm", "lowprec_lm", config)
    assert not ck.resuming


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


# ---------------------------------------------------------------------------
# Checkpointer


def test_checkpointer_stages_and_loops_resume(tmp_path):
    config = spike_config.get_config("quick")
    calls = []

    def compute():
        calls.append("stage")
        return {"a": np.arange(3.0), "b": [1, 2.5]}

    def advance(state, index):
        calls.append(index)
        return {"x": state["x"] * 2 + index}, {"index": index}

    first = resume.Checkpointer(
        tmp_path / "ck", "s", config, keep=1, save_interval_s=0, remove_when_done=False
    )
    assert not first.resuming
    assert first.stage("one", compute)["b"] == [1, 2.5]
    state, outputs = first.loop("l", {"x": np.float32(1.0)}, 3, advance)
    assert float(state["x"]) == ((1 * 2 + 0) * 2 + 1) * 2 + 2
    assert [o["index"] for o in outputs] == [0, 1, 2]
    # keep=1; the last chunk is not saved (the stage running the loop saves its result)
    assert os.listdir(tmp_path / "ck" / "loop-l") == ["2"]

    again = resume.Checkpointer(tmp_path / "ck", "s", config)
    calls.clear()
    assert again.resuming
    np.testing.assert_array_equal(again.stage("one", compute)["a"], np.arange(3.0))
    state2, outputs2 = again.loop("l", {"x": np.float32(1.0)}, 3, advance)
    assert calls == [2] and again.restored == ["one", "l/loop"]
    assert float(state2["x"]) == float(state["x"]) and outputs2 == outputs
    again.finish()
    assert not (tmp_path / "ck").exists()


def test_loop_resumes_after_a_kill_between_its_two_saves(tmp_path):
    config = spike_config.get_config("quick")

    def advance(state, index):
        return state + 1.0, {"index": index}

    first = resume.Checkpointer(
        tmp_path / "ck", "s", config, save_interval_s=0, remove_when_done=False
    )
    state, outputs = first.loop("l", np.float32(0.0), 4, advance)
    # As if killed after saving the outputs of step 3 but before its state.
    subprocess.run(["rm", "-rf", str(tmp_path / "ck" / "loop-l" / "3")], check=True)
    again = resume.Checkpointer(tmp_path / "ck", "s", config, save_interval_s=0)
    state2, outputs2 = again.loop("l", np.float32(0.0), 4, advance)
    assert float(state2) == float(state) == 4.0 and outputs2 == outputs


def test_stage_results_must_be_plain(tmp_path):
    config = spike_config.get_config("quick")
    for checkpointer in (resume.NoCheckpoint(), resume.Checkpointer(tmp_path, "s", config)):
        with pytest.raises(TypeError, match="no strings"):
            checkpointer.stage("bad", lambda: {"name": "adam"})


def test_a_claim_without_saves_is_taken_over(tmp_path):
    one, other = spike_config.get_config("quick"), spike_config.get_config("full")
    resume.Checkpointer(tmp_path / "ck", "s", one)
    assert not resume.Checkpointer(tmp_path / "ck", "s", other).resuming


def test_checkpointer_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "data.txt").write_text("mine")
    with pytest.raises(resume.ConfigMismatch, match="not empty"):
        resume.Checkpointer(tmp_path / "ck", "s", spike_config.get_config("quick"))
    with pytest.raises(ValueError, match="keep"):
        resume.Checkpointer(tmp_path / "other", "s", spike_config.get_config("quick"), keep=0)


def test_spike_injection_resumes_bit_identically(tmp_path):
    config = study_checks.tiny_spike_config()
    plain = spike_injection.run(config, mesh=None)
    directory = tmp_path / "ck"
    first = resume.Checkpointer(directory, "spike_injection", config, remove_when_done=False)
    spike_injection.run(config, checkpoint_dir=first, mesh=None)
    for name in ("clip_by_global_norm", "gnmr_clip"):  # as if killed before these
        for path in directory.glob(f"stage-{name}"):
            subprocess.run(["rm", "-rf", str(path)], check=True)
    second = resume.Checkpointer(directory, "spike_injection", config)
    resumed = spike_injection.run(config, checkpoint_dir=second, mesh=None)
    assert second.restored == ["clean", "none"]
    study_checks.assert_close(study_checks.metrics(resumed), study_checks.metrics(plain))
    assert directory.exists()  # a checkpointer handed in is the caller's to finish
    second.finish()
    assert not directory.exists()


# ---------------------------------------------------------------------------
# A real SIGKILL in the middle of a training loop

TINY_LOWPREC = [
    "--config.num_seeds=2",
    "--config.width=16",
    "--config.depth=1",
    "--config.heads=2",
    "--config.mlp_width=32",
    "--config.context=16",
    "--config.batch_size=8",
    "--config.val_windows=8",
    "--config.num_steps=80",
    "--config.eval_every=10",
    "--config.burst_start=2",
    "--config.burst_prob=0.5",
    "--config.burst_length=3,5",
    "--config.gnmr.warmup_steps=2",
    "--config.methods=reference,none",
    "--config.persistent=false",
]


def cli(out: Path, *extra: str) -> list[str]:
    base = [sys.executable, "-m", "benchmarks.run", "lowprec_lm", "--config", "quick"]
    options = ["--mesh", "none", "--save-every", "0", "--out", str(out)]
    return [*base, *TINY_LOWPREC, *options, *extra]


def kill_mid_loop(command: list[str], loop_dir: Path, timeout: float = 300) -> None:
    """Starts ``command`` and SIGKILLs it once ``loop_dir`` holds a saved state."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"the run ended before it could be killed:\n{process.stderr.read()}")
            if loop_dir.is_dir() and any(p.name.isdigit() for p in loop_dir.iterdir()):
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return
            time.sleep(0.01)
        pytest.fail("no loop checkpoint appeared in time")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_sigkill_mid_training_then_same_command_resumes_bit_identically(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(cli(whole), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    checkpoints = killed / "checkpoints" / "lowprec_lm"
    kill_mid_loop(cli(killed), checkpoints / "loop-bursts-reference")
    assert not (killed / "lowprec_lm.json").exists()
    assert not (checkpoints / "stage-bursts-reference").exists()  # killed inside the loop

    again = subprocess.run(cli(killed), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming lowprec_lm from" in again.stdout
    assert "restored from checkpoints: bursts-reference" in again.stdout
    assert not checkpoints.exists()  # removed once the run completed

    want = json.loads((whole / "lowprec_lm.json").read_text())
    got = json.loads((killed / "lowprec_lm.json").read_text())
    study_checks.assert_close(study_checks.metrics(got), study_checks.metrics(want))
    assert (
        got["summary"]["methods"]["none"]["val_loss"]
        == want["summary"]["methods"]["none"]["val_loss"]
    )


# ---------------------------------------------------------------------------
# 8 simulated devices


@pytest.mark.slow
def test_spike_injection_on_eight_devices_matches_one(tmp_path):
    sharded, single = study_checks.eight_device_results(
        "spike_injection", "study_checks:tiny_spike_config", tmp_path / "spike.json"
    )
    # The sharded batch mean adds 8 partial sums: float reassociation only. Counts
    # (spikes injected and caught, recovery steps, divergences) must agree exactly.
    study_checks.assert_close(sharded["summary"], single["summary"], rtol=2e-4, atol=1e-6)
    study_checks.assert_close(sharded["raw"], single["raw"], rtol=2e-3, atol=1e-5)


def test_lowprec_lm_mesh_argument_is_validated():
    with pytest.raises(ValueError, match="'data' axis"):
        parallel.resolve_mesh(object())
    with pytest.raises(ValueError, match="mesh must be"):
        lowprec_lm.run(lowprec_config.get_config("quick"), mesh="everything")
