"""The code version of a resume fingerprint: optstab and what the study imports."""

from __future__ import annotations

from benchmarks.harness import resume


def test_a_study_depends_on_its_own_modules_and_what_they_import():
    modules = resume.benchmark_modules("benchmarks.studies.spike_injection")
    assert {
        "benchmarks.studies.spike_injection",
        "benchmarks.studies.spike_injection.report",  # a module of the study's package
        "benchmarks.problems.spike_training",  # the problem it trains
        "benchmarks.problems.methods",  # the registry it draws from
        "benchmarks.harness.study",  # imported by the package's __init__
        "benchmarks.harness.measure",  # imported by spike_training.py
        "benchmarks",  # parents run on import
    } <= set(modules)
    # Another study, and problems spike_injection does not use, are not in it: editing
    # them leaves its checkpoints valid.
    assert not any("lowprec_lm" in name or name.endswith(".lm") for name in modules)
    assert "benchmarks.problems.cleaning" not in modules


def test_imports_are_read_from_the_source(tmp_path):
    path = tmp_path / "x.py"
    path.write_text(
        "import benchmarks.problems.data\n"
        "from . import sibling\n"
        "from ..harness import Study, parallel\n"
        "def later():\n"
        "    from benchmarks.problems import lm\n"
    )
    found = resume._imports("benchmarks.studies.x", path)
    assert found == [
        "benchmarks.problems.data",
        "benchmarks.studies",
        "benchmarks.studies.sibling",
        "benchmarks.harness",
        "benchmarks.harness.Study",  # not a module: dropped when files are looked up
        "benchmarks.harness.parallel",
        "benchmarks.problems",
        "benchmarks.problems.lm",  # imports inside functions count too
    ]
    modules = resume.benchmark_modules("benchmarks.harness")
    assert "benchmarks.harness.context" in modules
    assert all(resume._module_file(name) is not None for name in modules)


def test_versions_differ_between_studies_and_a_non_study_hashes_the_harness():
    spike = resume.code_version("spike_injection")
    assert len(spike) == 64 and spike == resume.code_version("spike_injection")
    assert spike != resume.code_version("lowprec_lm")
    assert resume.study_module("demo") == "benchmarks.harness"
