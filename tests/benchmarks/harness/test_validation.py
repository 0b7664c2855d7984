"""A config a study rejects stops the command line before any work: one line, exit
status 2, no checkpoint directory, nothing trained or compiled (each study's
``prepare`` builds its methods, so the library's own errors fire there)."""

from __future__ import annotations

import time

import pytest

from benchmarks import run as runner
from benchmarks.harness import Study

CASES = [
    # The three of the issue: a bad GNMR hyperparameter (it trained 7 methods first), a
    # misspelt method after a good one (it trained `clean` first), no seeds (it ended in
    # "Need at least one array to stack").
    ("spike_injection", "--config.gnmr.threshold=-1", "threshold must be > 0"),
    ("spike_injection", "--config.methods=clean,gnmr_clipp", "unknown method 'gnmr_clipp'"),
    ("spike_injection", "--config.num_seeds=0", "num_seeds must be positive"),
    ("spike_injection", "--config.methods=none,clip_by_global_norm", "needs the clean method"),
    ("overhead", "--config.methods=gnmr_chain,zclip", "needs 'adamw'"),
    ("perturbed_sgd", "--config.sections=locality,bogus", "unknown sections"),
    ("bilevel_cleaning", "--config.methods=ma_soba,bros_rx", "cannot read a rank"),
    ("bilevel_memory", "--config.widths=(0,)", "widths must be positive"),
    ("bilevel_mixture", "--config.domains=clean,weird", "unknown domain kind 'weird'"),
    ("bilevel_reweighting", "--config.patch=3", "patch must divide the image size 8"),
    ("lowprec_lm", "--config.heads=3", "not divisible by heads"),
    ("lowprec_lm", "--config.quant.fmt=int7", "int7"),
]


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if any study starts measuring."""

    def refuse(*args, **kwargs):
        raise AssertionError("a study ran although its config was rejected")

    monkeypatch.setattr(Study, "execute", refuse)


@pytest.mark.parametrize(("study", "override", "message"), CASES)
def test_a_rejected_config_stops_before_any_work(
    study, override, message, no_training, capsys, tmp_path
):
    start = time.perf_counter()
    assert runner.main([study, "--quick", override, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {study}: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "checkpoints").exists()
    assert not any(tmp_path.iterdir())  # no JSON, no figure, no checkpoint
    # Building a study's methods and problem takes seconds at most; training the first
    # method of any quick config takes far longer (and would have hit `no_training`).
    assert time.perf_counter() - start < 60


def test_all_checks_every_config_before_running_any(no_training, monkeypatch, capsys, tmp_path):
    """With ``all``, one rejected config (lowprec_lm's, late in the order) stops every study."""
    from configs import lowprec_lm

    quick = lowprec_lm.get_config

    def bad_config(size):
        config = quick(size)
        config.methods = ("reference", "none", "adam_but_better")
        return config

    monkeypatch.setattr(lowprec_lm, "get_config", bad_config)
    assert runner.main(["all", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lowprec_lm: ") and "adam_but_better" in err, err
    assert not any(tmp_path.iterdir())


def test_a_config_missing_a_field_is_one_line(no_training, capsys, tmp_path):
    path = tmp_path / "short.py"
    path.write_text(
        "from configs import spike_injection\n"
        "def get_config():\n"
        "    c = spike_injection.get_config('quick')\n"
        "    del c['spike_kind']\n"
        "    return c\n"
    )
    out = tmp_path / "out"
    assert runner.main(["spike_injection", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: spike_injection: ") and "spike_kind" in err, err
    assert err.count("\n") == 1 and not (out / "checkpoints").exists()
