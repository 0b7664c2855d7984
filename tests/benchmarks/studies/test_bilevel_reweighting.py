"""bilevel_reweighting on its tiny config: what it reports, which ViT leaves BROS
projects and that they stay factored.

No resume check here: the study's stages (one per method x seed, plain dicts) go
through the same harness path as ``bilevel_cleaning``'s, whose test kills and resumes
a run; a second run of this study would compile the ViT's bilevel steps again and
double the test's time (about 10 s of XLA compiles on 2 cores)."""

import json

import study_checks

from benchmarks.harness import reporting, resume
from benchmarks.studies import bilevel_reweighting

# The tiny ViT has one block; BROS at rank 4 projects the 2-D kernels with more than 4
# rows: the six einsum projections of the block and the head's dot_general. The conv
# patch embedding (4-D), the position embedding (3-D), LayerNorms and biases stay.
PROJECTED_AT_RANK_4 = sorted(
    [f"blocks/0/{layer}/kernel" for layer in ("query", "key", "value", "out", "up", "down")]
    + ["head/kernel"]
)


def test_reports_every_method_and_keeps_projections_factored(tmp_path):
    config = study_checks.tiny("bilevel_reweighting")
    result = study_checks.run_with("bilevel_reweighting", config, resume.NoCheckpoint())
    summary = result["summary"]
    methods = summary["methods"]
    assert list(methods) == list(config.methods)
    for m in methods.values():
        assert {"test_acc", "detect_f1", "peak_bytes", "step_time_s", "peak_bytes_ratio"} <= set(m)
        assert 0.0 <= m["test_acc"] <= 1.0
    assert methods["no_reweighting"]["detect_f1"] is None and methods["oracle"]["detect_f1"] is None
    assert 0.0 <= methods["bros_r4"]["detect_f1"] <= 1.0
    assert 0.0 < methods["bros_r4"]["rare_class_weight"] < 1.0
    assert "memory_reduction_vs_ma_soba" in summary
    goal = summary["goal"]
    assert {"bros_r4_within_1pt_of_ma_soba", "bros_r4_time_ratio_ok", "met"} <= set(goal)
    # The long tail: the smallest class of the fixed split has 104 training images; the
    # most frequent class keeps 104, the rarest round(104 / imbalance), all sizes differ.
    counts = sorted(summary["class_counts"])
    assert counts[-1] == 104 and counts[0] == round(104 / config.imbalance)
    assert len(set(counts)) == len(counts)

    # Factored leaves: the einsum projections and the head are projected, and the traced
    # BROS passes hold no value shaped like a projected leaf that depends on the subspace
    # coordinates; the dense evaluation (the control) holds many.
    evidence = summary["factored"]["bros_r4"]
    assert sorted(evidence["projected"]) == PROJECTED_AT_RANK_4
    assert evidence["weight_shaped"] == 0
    assert evidence["weight_shaped_dense"] > 0

    path = reporting.write_json(result, tmp_path / "reweighting.json")
    assert json.loads(path.read_text())["study"] == "bilevel_reweighting"
    assert bilevel_reweighting.plot(result, tmp_path / "reweighting.png").exists()
    text = bilevel_reweighting.table(result)
    assert all(name in text for name in methods)
