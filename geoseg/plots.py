"""Figures for people: the precision–recall chart of ``geoseg evaluate``.

Matplotlib with the Agg backend (no display needed, safe in worker processes and CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_pr_curves(result: Any, path: Path) -> Path:
    """Precision–recall curve per prompt, with the run threshold (circle) and the best-F1 threshold
    (star) marked and labelled, and grey iso-F1 lines so a reader can place any point.

    ``result`` is a :class:`geoseg.evaluation.EvaluationResult`. Written as PNG to ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(9, 7.5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    r = np.linspace(0.01, 1, 400)
    for f in (0.2, 0.4, 0.6, 0.8):
        with np.errstate(divide="ignore", invalid="ignore"):
            p = f * r / (2 * r - f)
        ok = (p > 0) & (p <= 1.0)
        ax.plot(r[ok], p[ok], color="0.82", lw=1, zorder=1)
        ax.annotate(f"F1={f:g}", (r[ok][-1], p[ok][-1]), xytext=(-4, 4), textcoords="offset points",
                    ha="right", fontsize=9, color="0.55")
    palette = matplotlib.colormaps["tab10"]
    for i, pr in enumerate(result.prompts):
        c = palette(i % 10)
        rec = np.array([s.recall if s.recall is not None else np.nan for s in pr.curve])
        prec = np.array([s.precision if s.precision is not None else np.nan for s in pr.curve])
        a, b = pr.at_threshold, pr.best_f1
        label = f"{pr.prompt}: F1 {_f(a.f1)} at run t={a.threshold:.3g}"
        if b is not None:
            label += f", best {_f(b.f1)} at t={b.threshold:.3g}"
        # thresholds where something true is found; TP = 0 points sit at recall 0 and would draw a
        # misleading straight line to the origin when the model saturates at p = 1
        ok = np.isfinite(rec) & np.isfinite(prec) & (prec > 0)
        if not ok.any():
            ax.plot([], [], color=c, lw=2.5, label=f"{pr.prompt}: no truth pixels in the area")
            continue
        ax.plot(rec[ok], prec[ok], color=c, lw=2.5, label=label, zorder=3)
        points = [(a, "o", "run"), (b, "*", "best F1")] if b is not None else [(a, "o", "run")]
        for k, (s, marker, what) in enumerate(points):
            if s.recall is None or s.precision is None:
                continue
            ax.plot(s.recall, s.precision, marker=marker, ms=16 if marker == "*" else 11, color=c,
                    mec="black", mew=1.2, ls="none", zorder=4)
            right, top = s.recall > 0.7, s.precision > 0.9  # keep labels inside the axes
            dy = (10 if k == 0 else -22) - (14 if top and k == 0 else 0)
            ax.annotate(f"{what} t={s.threshold:.3g}", (s.recall, s.precision),
                        xytext=(-12 if right else 12, dy), textcoords="offset points", fontsize=11,
                        ha="right" if right else "left", color="black", zorder=5,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": c, "alpha": 0.9})
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], marker="o", ls="none", color="0.5", mec="black", ms=10),
                Line2D([], [], marker="*", ls="none", color="0.5", mec="black", ms=14)]
    labels += ["threshold of the run", "threshold with the best F1"]
    fig.legend(handles, labels, loc="outside lower center", fontsize=11, ncols=1, frameon=False)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Recall (share of truth pixels found)", fontsize=13)
    ax.set_ylabel("Precision (share of predicted pixels that are truth)", fontsize=13)
    ax.tick_params(labelsize=11)
    ax.grid(True, color="0.92")
    ax.set_title(f"Precision–recall per prompt, pixel level\nrun {Path(result.run_dir).name} vs truth "
                 f"{Path(result.truth).name} ({result.area_mode}, {result.area_pixels:,} px)", fontsize=13)
    fig.savefig(path, format="png")
    return path


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"
