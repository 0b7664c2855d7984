"""Analysis and report of ``bilevel_mixture``: medians over seeds, the learned
mixtures, the table and the figure."""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np

from benchmarks.harness import reporting
from benchmarks.studies.bilevel_mixture.problem import BASELINES


def normalised_median(per_seed: np.ndarray) -> np.ndarray | None:
    """Per-domain median over the finite seeds (axis 0), renormalised to sum to one;
    None when no seed is finite."""
    finite = per_seed[np.all(np.isfinite(per_seed), axis=1)]
    if len(finite) == 0:
        return None
    median = np.median(finite, axis=0)
    return median / median.sum()


def summarize_method(out: dict) -> dict:
    """Medians over seeds of one method's outputs.

    A diverged seed counts with its (chance-level) accuracy and an infinite loss (so
    losses read ``None`` once half the seeds diverged); mixtures are medians over the
    seeds that stayed finite.
    """
    mixture = np.asarray(out["mixture"], dtype=np.float64)
    finite = np.all(np.isfinite(mixture), axis=1)
    loss = lambda key: float(np.median(np.where(np.isfinite(out[key]), out[key], np.inf)))
    median_mixture = normalised_median(mixture)
    return {
        "target_acc": float(np.median(out["test_acc"])),
        "target_loss": loss("test_loss"),
        "val_loss": loss("val_loss"),
        "mixture": None if median_mixture is None else median_mixture.tolist(),
        "clean_weight": float(np.median(mixture[finite, 0])) if finite.any() else None,
        "noisy_weight": float(np.median(mixture[finite, 1:].sum(axis=1))) if finite.any() else None,
        "ranking": None
        if median_mixture is None
        else np.argsort(-median_mixture, kind="stable").tolist(),
        "diverged": int(np.sum(~out["finite"])),
        "mixture_per_seed": mixture.tolist(),
    }


def table(result: dict) -> str:
    """One row per method: target accuracy, losses and the learned mixture."""
    summary = result["summary"]
    domains = summary["domains"]
    headers = ["method", "inner_lr", "target_acc", "target_loss", "val_loss"]
    headers += [f"w{d['index']}" for d in domains] + ["order", "diverged"]
    rows = []
    num_seeds = result["config"]["num_seeds"]
    for name, m in ((n, summary["methods"][n]) for n in reporting.ordered(summary["methods"])):
        weights = m["mixture"] or [None] * len(domains)
        rows.append(
            [name, m["settings"]["inner_lr"], m["target_acc"], m["target_loss"], m["val_loss"]]
            + [None if w is None else f"{w:.3f}" for w in weights]
            + [">".join(map(str, m["ranking"])) if m["ranking"] else None]
            + [f"{m['diverged']}/{num_seeds}"]
        )
    legend = [f"  w{d['index']}: {d['spec']} ({d['description']})" for d in domains]
    return reporting.report(
        f"median over {num_seeds} seeds; w_k = final mixture softmax(x) (per-domain median over"
        " finite seeds, renormalised); target = clean digits test split",
        headers,
        rows,
        "domains:",
        *legend,
    )


def plot(result: dict, path) -> Any:
    """Learned mixtures (stacked bars), seed-0 mixture trajectories, target accuracy."""
    config = result["config"]
    summary = result["summary"]
    methods = reporting.ordered(summary["methods"])
    domains = summary["domains"]
    colors = matplotlib.colormaps["Dark2"].colors  # domains (methods keep the palette's colours)
    solvers = [m for m in methods if m not in BASELINES]
    widths = {"width_ratios": [1.1, 1.4, 1.0]}
    fig, axes = reporting.figure(1, 3, (15, 4.2), gridspec_kw=widths)

    ax = axes[0]
    bottom = np.zeros(len(methods))
    for k, domain in enumerate(domains):
        heights = np.array(
            [(summary["methods"][m]["mixture"] or [0.0] * len(domains))[k] for m in methods]
        )
        ax.bar(
            range(len(methods)),
            heights,
            bottom=bottom,
            color=colors[k % len(colors)],
            label=f"{k}: {domain['spec']}",
        )
        bottom += heights
    for i, m in enumerate(methods):
        if summary["methods"][m]["mixture"] is None:
            ax.text(i, 0.5, "all seeds\ndiverged", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixture weight (fraction)")
    ax.set_title(f"learned mixture (median of {config['num_seeds']} seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)

    ax = axes[1]
    styles = ["-", "--", ":", "-."]
    steps = np.arange(config["num_steps"] // config["record_every"] + 1) * config["record_every"]
    start = np.full((1, len(domains)), 1.0 / len(domains))  # x = 0 at step 0
    for i, name in enumerate(solvers):
        seed0 = np.asarray(result["raw"][name]["mixture_curve"], dtype=float)[0]
        curve = np.concatenate([start, seed0])
        for k in range(len(domains)):
            ax.plot(
                steps,
                curve[:, k],
                color=colors[k % len(colors)],
                ls=styles[i % len(styles)],
                lw=1.1,
                label=name if k == 0 else None,
            )
    ax.axhline(1.0 / len(domains), color="k", lw=0.6, ls=":")
    ax.set_xlabel("step")
    ax.set_yscale("log")  # the noisy weights fall by orders of magnitude
    ax.set_ylabel("mixture weight (colour = domain, style = solver; log)")
    ax.set_title(f"seed 0, {len(solvers)} solvers of {len(methods)} methods: mixture over steps")
    ax.legend(loc="best", fontsize=7)

    accs = {m: result["raw"][m]["seeds"]["test_acc"] for m in methods}
    reporting.seed_boxes(axes[2], methods, accs, "target test accuracy (fraction)",
                         "clean target: test accuracy per seed")  # fmt: skip
    fig.suptitle("data-mixture learning on corrupted digits domains")
    return reporting.save_figure(fig, path)
