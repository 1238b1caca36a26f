"""Figures of the trajectory monitor: interpolation curves, the PCA trajectory over its loss
contour, and 1-D / 2-D slices along random directions.

Figures are built as ``matplotlib.figure.Figure`` objects (Agg canvas, no pyplot state, safe in
any backend and thread); the caller saves or logs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from torch import Tensor

from lightning_landscape.landscape.trajectory import InterpolationResult, PCAResult

_SIZE = (6.4, 4.6)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _filled_contour(fig: Figure, ax, xs: Tensor, ys: Tensor, z: Tensor, label: str):
    """Filled contour with a colorbar; log-spaced levels when the values span > 20×."""
    z_np = _np(z)
    finite = z_np[np.isfinite(z_np)]
    kwargs: dict = {"levels": 20, "cmap": "viridis"}
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        kwargs = {
            "levels": np.geomspace(finite.min(), finite.max(), 21),
            "norm": LogNorm(finite.min(), finite.max()),
            "cmap": "viridis",
        }
        label += " (log scale)"
    if not finite.size:
        ax.text(0.5, 0.5, "loss not finite", transform=ax.transAxes, ha="center")
        return
    filled = ax.contourf(_np(xs), _np(ys), np.ma.masked_invalid(z_np), **kwargs)
    ax.contour(
        _np(xs), _np(ys), np.ma.masked_invalid(z_np), levels=filled.levels, colors="k",
        linewidths=0.3, alpha=0.5,
    )  # fmt: skip
    if "norm" in kwargs:
        ticks = np.geomspace(finite.min(), finite.max(), 6)
        bar = fig.colorbar(filled, ax=ax, label=label, ticks=ticks, format="%.3g")
        bar.minorticks_off()
    else:
        fig.colorbar(filled, ax=ax, label=label, format="%.3g")


def interpolation_figure(
    curve: InterpolationResult,
    *,
    start_label: str,
    end_label: str,
    metric_name: str = "metric",
    show_monotonic: bool = True,
) -> Figure:
    """Loss (and the metric in ``curve.values[:, 1]``, if any, on a second axis) along
    θ(α) = (1 − α) θ_start + α θ_end, with the chord between the endpoints dashed, the endpoints
    marked, and the barrier, distance and (``show_monotonic``) monotonicity in the title."""
    facts = [f"barrier {curve.barrier:.3g}", f"distance {curve.distance:.3g}"]
    facts += [("" if curve.monotonic else "not ") + "monotonic"] if show_monotonic else []
    title = f"Loss from {start_label} to {end_label}\n" + ", ".join(facts)
    alphas, losses = curve.alphas, curve.losses
    metric = curve.values[:, 1] if curve.values.shape[1] > 1 else None
    a, y = _np(alphas), _np(losses)
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    ax.plot(a, y, "-o", color="tab:blue", ms=3, label="loss")
    i0, i1 = int(np.argmin(np.abs(a))), int(np.argmin(np.abs(a - 1)))
    ax.plot([0, 1], [y[i0], y[i1]], "--", color="gray", lw=1, label="chord")
    ax.plot([0, 1], [y[i0], y[i1]], "s", color="tab:red", ms=6)
    ax.annotate(start_label, (0, y[i0]), textcoords="offset points", xytext=(4, 6))
    ax.annotate(end_label, (1, y[i1]), textcoords="offset points", xytext=(4, 6))
    if a.min() < 0 or a.max() > 1:
        ax.axvspan(a.min(), 0, color="0.9", zorder=0)
        ax.axvspan(1, a.max(), color="0.9", zorder=0)
    ax.set_xlabel(f"α   (θ = (1 − α)·θ[{start_label}] + α·θ[{end_label}])")
    ax.set_ylabel("loss on the fixed batches")
    handles, labels = ax.get_legend_handles_labels()
    if metric is not None:
        ax2 = ax.twinx()
        ax2.plot(a, _np(metric), "-^", color="tab:orange", ms=3, label=metric_name)
        ax2.set_ylabel(metric_name, color="tab:orange")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def trajectory_figure(
    pca: PCAResult,
    xs: Tensor,
    ys: Tensor,
    z: Tensor,
    labels: Sequence[str],
    *,
    current_label: str,
) -> Figure:
    """The trajectory on its PCA plane (snapshots marked and labelled, the current weights at the
    origin) over the filled contour of the loss ``z`` on the grid ``xs`` × ``ys`` of the plane;
    the explained variance and the largest off-plane distance in the title."""
    explained = pca.explained_variance_ratio.tolist()
    title = (
        f"Trajectory on its PCA plane ({100 * sum(explained[:2]):.1f}% of variance)\n"
        f"loss on the plane; largest snapshot distance from it {float(pca.off_plane.max()):.3g}"
    )
    coords = pca.coords
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    _filled_contour(fig, ax, xs, ys, z, "loss on the plane")
    c = _np(coords)
    path = np.vstack([c[:, :2], np.zeros((1, 2))])
    ax.plot(path[:, 0], path[:, 1], "-", color="white", lw=2.2)
    ax.plot(path[:, 0], path[:, 1], "-", color="tab:red", lw=1.2)
    ax.plot(c[:, 0], c[:, 1], "o", color="tab:red", mec="white", ms=6, label="snapshots")
    ax.plot([0], [0], "*", color="gold", mec="k", ms=14, label=f"current ({current_label})")
    for (x, y), text in zip(c[:, :2], labels, strict=True):
        ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8, color="white",
            bbox={"boxstyle": "round,pad=0.15", "fc": "black", "alpha": 0.45, "lw": 0},
        )  # fmt: skip
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of variance)")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def slice_1d_figure(ts: Tensor, losses: Tensor, *, where: str = "") -> Figure:
    """The loss along one filter-normalized direction, t in [−1, 1] around the weights."""
    title = f"1-D slice around the weights {where}\n(filter-normalized random direction)"
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    ax.plot(_np(ts), _np(losses), "-o", color="tab:blue", ms=3)
    ax.axvline(0, color="gray", ls="--", lw=1)
    ax.set_xlabel("t   (θ + t·d, d a filter-normalized random direction)")
    ax.set_ylabel("loss on the fixed batches")
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def slice_2d_figure(xs: Tensor, ys: Tensor, z: Tensor, *, where: str = "") -> Figure:
    """The loss on the plane of two filter-normalized directions around the weights."""
    title = f"2-D slice around the weights {where}\n(filter-normalized random directions)"
    fig = Figure(figsize=_SIZE)
    ax = fig.add_subplot()
    _filled_contour(fig, ax, xs, ys, z, "loss")
    ax.plot([0], [0], "*", color="gold", mec="k", ms=14, label="current weights")
    ax.set_xlabel("direction 1 (filter-normalized)")
    ax.set_ylabel("direction 2 (filter-normalized)")
    ax.set_aspect("equal")
    ax.locator_params(nbins=5)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
