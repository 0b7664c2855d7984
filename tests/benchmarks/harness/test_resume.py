"""Checkpointed stages and loops, the claim on a directory, and a real SIGKILL in the
middle of a training loop followed by the same command, ending bit-identical."""

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

from benchmarks.harness import compare, resume
from configs import spike_injection as spike_config

ROOT = Path(__file__).resolve().parents[3]


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


def test_checkpointer_refuses_a_foreign_directory_and_other_code(tmp_path):
    config = spike_config.get_config("quick")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "data.txt").write_text("mine")
    with pytest.raises(resume.ConfigMismatch, match="not empty"):
        resume.Checkpointer(tmp_path / "ck", "s", config)
    with pytest.raises(ValueError, match="keep"):
        resume.Checkpointer(tmp_path / "other", "s", config, keep=0)
    saved = resume.Checkpointer(tmp_path / "code", "s", config, code="v1")
    saved.stage("a", lambda: [1])
    with pytest.raises(resume.ConfigMismatch, match="other code"):
        resume.Checkpointer(tmp_path / "code", "s", config, code="v2")


# ---------------------------------------------------------------------------
# A real SIGKILL in the middle of a training loop

TINY_LOWPREC = [
    "--config.num_steps=40",
    "--config.methods=reference,none",
    "--config.persistent=false",
    "--config.regimes=quantizer_outliers",
]


def cli(out: Path, *extra: str) -> list[str]:
    base = [sys.executable, "-m", "benchmarks.run", "lowprec_lm", "--config", "tiny"]
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
    kill_mid_loop(cli(killed), checkpoints / "loop-clean-reference")
    assert not (killed / "lowprec_lm.json").exists()
    assert not (checkpoints / "stage-clean-reference").exists()  # killed inside the loop

    again = subprocess.run(cli(killed), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming lowprec_lm from" in again.stdout
    assert "restored from checkpoints: clean-reference/loop" in again.stdout
    assert not checkpoints.exists()  # removed once the run completed

    want = json.loads((whole / "lowprec_lm.json").read_text())
    got = json.loads((killed / "lowprec_lm.json").read_text())
    study_checks.assert_same(compare.metrics(got), compare.metrics(want))
    none = [r["summary"]["methods"]["none"]["val_loss"] for r in (got, want)]
    assert none[0] == none[1]
