"""Reporting: the tested-versions hash in every result, one colour and one order per
method, and the comparison of two results folders."""

from __future__ import annotations

import hashlib
import json

from benchmarks.harness import compare, reporting
from benchmarks.problems import methods


def test_environment_records_the_lock_hash_next_to_the_versions():
    env = reporting.environment()
    expected = hashlib.sha256(reporting.LOCK_FILE.read_bytes()).hexdigest()
    assert env["lock_sha256"] == expected
    assert {"jax", "jaxlib", "optax", "flax", "numpy", "python"} <= set(env)
    assert reporting.lock_sha256(reporting.LOCK_FILE.parent / "missing.txt") is None


def test_every_registry_method_has_its_own_colour_and_place():
    names = list(methods.RECIPES)
    colours = [reporting.color(name) for name in names]
    # Methods that can share a figure (the stability methods) never share a colour,
    # except where one role has two names in two studies (gnmr_chain and gnmr_clip are
    # both "GNMR chained before AdamW").
    roles = {"gnmr_chain": "gnmr_clip", "gnmr_precision": "gnmr_clip",
             "gnmr_wrap": "gnmr_skip", "gnmr_precision_clip": "gnmr_skip",
             "gnmr_precision_external": "gnmr_amax",
             "gnmr_precision_both": "gnmr_both"}  # fmt: skip
    distinct = {roles.get(name, name) for name in names}
    assert len(set(colours)) == len(distinct)
    assert reporting.ordered(list(reversed(names))) == [n for n in reporting.PALETTE if n in names]
    assert reporting.color("bros_r8_naive") == reporting.color("bros_r8")
    assert reporting.ordered(["bros_r8_naive", "zz_new", "bros_r8"]) == [
        "bros_r8",
        "bros_r8_naive",
        "zz_new",
    ]
    assert reporting.color("zz_new") == reporting.color("zz_new")  # stable, not hash()


def test_compare_drops_timings_and_flags_differences(tmp_path, capsys):
    a = {"summary": {"acc": 0.5, "count": 3, "step_time_s": 1.0}, "environment": {"x": 1}}
    b = {"summary": {"acc": 0.5, "count": 4, "step_time_s": 9.0}, "environment": {"x": 2}}
    assert compare.metrics(a) == {"summary": {"acc": 0.5, "count": 3}}
    assert compare.differences(a, a) == []
    assert compare.differences(compare.metrics(b), compare.metrics(a)) == ["/summary/count: 4 != 3"]
    # Floats within the tolerance pass; integers (counts) must be equal.
    assert compare.differences({"v": 1.0 + 1e-9}, {"v": 1.0}, rtol=1e-8) == []
    assert compare.differences({"v": 4}, {"v": 3}, rtol=1.0) == ["/v: 4 != 3"]
    for folder, result in (("before", a), ("after", b)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "s.json").write_text(json.dumps(result))
    assert compare.main([str(tmp_path / "before"), str(tmp_path / "after")]) == 1
    assert "/summary/count: 4 != 3" in capsys.readouterr().out
