"""Pictures of the pooled uncertainty statistics: a reliability diagram and a risk-coverage curve (PNG, Agg)."""
from __future__ import annotations

import os

import numpy as np

from diffnnunet.utils import atomic_outputs, partial_path

RELIABILITY_PNG = "reliability.png"
RISK_COVERAGE_PNG = "risk_coverage.png"


def save_png(fig, path: str, dpi: int = 110) -> None:
    """``fig`` as a PNG at ``path`` through :func:`~diffnnunet.utils.atomic_outputs` (a reader never sees half a
    PNG); the figure is closed either way."""
    import matplotlib.pyplot as plt
    try:
        with atomic_outputs() as written:
            written.append(path)
            fig.savefig(partial_path(path), format="png", dpi=dpi)
    finally:
        plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def reliability_diagram(bins: np.ndarray, ece: float, path: str) -> None:
    """``bins`` ``(3, B)`` (voxel count, summed confidence, summed correctness per equal-width confidence bin):
    accuracy per bin (bars) and mean confidence (dots) against the diagonal; below, the voxel count per bin (log)."""
    plt = _pyplot()
    counts, conf, acc = bins
    n = len(counts)
    edges = np.linspace(0, 1, n + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    nz = counts > 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centers[nz], acc[nz] / counts[nz], width=1 / n, edgecolor="k", alpha=0.7, label="accuracy")
    top.plot(centers[nz], conf[nz] / counts[nz], "o", color="C3", ms=4, label="mean confidence")
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability (ECE {ece:.4f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centers, counts, width=1 / n, edgecolor="k", color="0.6")
    bottom.set(xlabel="confidence (predicted-class probability)", ylabel="voxels")
    if counts.max() > 0:
        bottom.set_yscale("log")
    fig.tight_layout()
    save_png(fig, path)


def risk_coverage_plot(coverage: np.ndarray, risk: np.ndarray, aurc: float, aurc_optimal: float,
                       path: str) -> None:
    """Selective risk (error rate among the most certain voxels) against coverage, ``(P,)`` each, AURC in the
    legend, with the oracle curve (errors ranked last) and the overall error rate for reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(coverage, risk, lw=1.5, label=f"uncertainty ranking (AURC {aurc:.4f})")
    error_rate = float(risk[-1])
    c = np.linspace(1e-4, 1, 500)
    ax.plot(c, np.clip(1 - (1 - error_rate) / c, 0, None), "k--", lw=1, label=f"oracle (AURC {aurc_optimal:.4f})")
    ax.axhline(error_rate, color="0.5", lw=1, ls=":", label=f"error rate {error_rate:.4f}")
    ax.set(xlabel="coverage (fraction of voxels kept, most certain first)", ylabel="risk (error rate of kept)",
           xlim=(0, 1), ylim=(0, max(float(risk.max()), 1e-3) * 1.05), title="risk-coverage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def write_plots(folder: str, pooled: dict, section: dict) -> list[str]:
    """Write the pictures the pooled statistics allow (``ece_bins`` -> reliability.png, ``counts`` ->
    risk_coverage.png) into ``folder``; returns the file names written."""
    from diffnnunet.evaluation.uncertainty import risk_coverage_curve
    written = []
    if "ece_bins" in pooled and pooled["ece_bins"][0].sum() > 0:
        reliability_diagram(pooled["ece_bins"], section["ECE"], os.path.join(folder, RELIABILITY_PNG))
        written.append(RELIABILITY_PNG)
    if "counts" in pooled and pooled["counts"]["counts"].sum() > 0:
        coverage, risk = risk_coverage_curve(pooled["counts"])
        risk_coverage_plot(coverage, risk, section["AURC"], section["AURC_optimal"],
                           os.path.join(folder, RISK_COVERAGE_PNG))
        written.append(RISK_COVERAGE_PNG)
    return written
