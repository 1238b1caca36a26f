"""Every figure of the package: the trajectory monitor's interpolation curves, PCA trajectory
over its loss contour and 1-D / 2-D random-direction slices, and the Hessian monitor's spectral
density.

Figures are built as bare ``matplotlib.figure.Figure`` objects: no pyplot, no global figure
registry, the user's backend never switched (``matplotlib.use`` is never called), safe in any
thread. The caller renders, saves or logs them (``callbacks/_logging.py``); nothing needs closing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator
from torch import Tensor

from lightning_landscape.landscape.trajectory import InterpolationResult, PCAResult

_SIZE = (6.4, 4.6)


def figure_pixels(figure: Figure) -> np.ndarray:
    """The RGB pixels ``(height, width, 3)`` of a figure, drawn by an Agg canvas of its own."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _new_axes() -> tuple[Figure, Axes]:
    """A figure of the package's size with one axes."""
    fig = Figure(figsize=_SIZE)
    return fig, fig.add_subplot()


def _titled(fig: Figure, ax: Axes, title: str) -> Figure:
    """``fig``, with ``title`` over ``ax`` in the package's 9-point type, laid out tight."""
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


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
    # ticks on round values: 1-2-5 of each decade on a log scale, a few round numbers otherwise
    ticks = _log_ticks(finite.min(), finite.max()) if "norm" in kwargs else MaxNLocator(6)
    bar = fig.colorbar(filled, ax=ax, label=label, ticks=ticks, format=FormatStrFormatter("%.3g"))
    bar.minorticks_off()


def _log_ticks(lo: float, hi: float, most: int = 8) -> list[float]:
    """Round ticks in [lo, hi] (0 < lo, hi > 20 lo): m·10ᵉ with m in 1-2-5, else 1-3, else 1,
    whichever first gives at most ``most`` ticks (then every k-th decade)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for subs in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**e for e in decades for m in subs if lo <= m * 10.0**e <= hi]
        if len(ticks) <= most:
            return ticks
    return ticks[:: math.ceil(len(ticks) / most)]


def _readable_labels(points: np.ndarray, span: float, min_gap: float = 0.08) -> list[int]:
    """Which of the labelled ``points`` to annotate so that no two labels sit closer than
    ``min_gap`` of the axis ``span``, nor on the origin: the first, then the latest first."""
    kept: list[int] = []
    order = [0, *range(len(points) - 1, 0, -1)] if len(points) else []
    for i in order:
        far = all(np.hypot(*(points[i] - points[j])) > min_gap * span for j in kept)
        if far and np.hypot(*points[i]) > min_gap * span:
            kept.append(i)
    return sorted(kept)


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
    fig, ax = _new_axes()
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
    return _titled(fig, ax, title)


def trajectory_figure(
    pca: PCAResult,
    xs: Tensor,
    ys: Tensor,
    z: Tensor,
    labels: Sequence[str],
    *,
    current_label: str,
) -> Figure:
    """The trajectory on its PCA plane (snapshots marked, the current weights at the origin) over
    the filled contour of the loss ``z`` on the grid ``xs`` × ``ys`` of the plane, with equal
    scales on both axes (angles and distances as in weight space); the explained variance and
    the largest off-plane distance in the title. Labels too close to one drawn already (or to
    the origin) are left out: the first snapshot's and the latest ones' are kept."""
    explained = pca.explained_variance_ratio.tolist()
    title = (
        f"Trajectory on its PCA plane ({100 * sum(explained[:2]):.1f}% of Σ‖θᵢ − θ‖²)\n"
        f"loss on the plane; largest snapshot distance from it {float(pca.off_plane.max()):.3g}"
    )
    coords = pca.coords
    fig, ax = _new_axes()
    _filled_contour(fig, ax, xs, ys, z, "loss on the plane")
    c = _np(coords)
    path = np.vstack([c[:, :2], np.zeros((1, 2))])
    ax.plot(path[:, 0], path[:, 1], "-", color="white", lw=2.2)
    ax.plot(path[:, 0], path[:, 1], "-", color="tab:red", lw=1.2)
    ax.plot(c[:, 0], c[:, 1], "o", color="tab:red", mec="white", ms=6, label="snapshots")
    ax.plot([0], [0], "*", color="gold", mec="k", ms=14, label=f"current ({current_label})")
    shown = _readable_labels(c[:, :2], float(_np(xs)[-1] - _np(xs)[0]))
    for n, i in enumerate(shown):  # thinned, and offset above and below in turn
        ax.annotate(
            labels[i], c[i, :2], textcoords="offset points", xytext=(6, 6 if n % 2 else -12),
            fontsize=8, color="white",
            bbox={"boxstyle": "round,pad=0.15", "fc": "black", "alpha": 0.45, "lw": 0},
        )  # fmt: skip
    ax.set_xlabel(f"PC1 ({100 * explained[0]:.1f}% of Σ‖θᵢ − θ‖²)")
    ax.set_ylabel(f"PC2 ({100 * explained[1]:.1f}% of Σ‖θᵢ − θ‖²)")
    ax.set_aspect("equal")  # distances and angles as they are in weight space
    ax.locator_params(nbins=6)
    ax.legend(loc="best", fontsize=8)
    return _titled(fig, ax, title)


def slice_1d_figure(ts: Tensor, losses: Tensor, *, where: str = "") -> Figure:
    """The loss along one filter-normalized direction, t in [−1, 1] around the weights."""
    title = f"1-D slice around the weights {where}\n(filter-normalized random direction)"
    fig, ax = _new_axes()
    ax.plot(_np(ts), _np(losses), "-o", color="tab:blue", ms=3)
    ax.axvline(0, color="gray", ls="--", lw=1)
    ax.set_xlabel("t   (θ + t·d, d a filter-normalized random direction)")
    ax.set_ylabel("loss on the fixed batches")
    ax.grid(True, alpha=0.3)
    return _titled(fig, ax, title)


def slice_2d_figure(xs: Tensor, ys: Tensor, z: Tensor, *, where: str = "") -> Figure:
    """The loss on the plane of two filter-normalized directions around the weights."""
    title = f"2-D slice around the weights {where}\n(filter-normalized random directions)"
    fig, ax = _new_axes()
    _filled_contour(fig, ax, xs, ys, z, "loss")
    ax.plot([0], [0], "*", color="gold", mec="k", ms=14, label="current weights")
    ax.set_xlabel("direction 1 (filter-normalized)")
    ax.set_ylabel("direction 2 (filter-normalized)")
    ax.set_aspect("equal")
    ax.locator_params(nbins=5)
    ax.legend(loc="upper right", fontsize=8)
    return _titled(fig, ax, title)


def density_figure(
    grid: Tensor,
    density: Tensor,
    edges: Tensor,
    counts: Tensor,
    *,
    dim: int,
    where: str = "",
    what: str = "Hessian",
) -> Figure:
    """The Hessian eigenvalue density: the smoothed SLQ density on a log scale (top) and the
    number of eigenvalues per bin on a log count scale (bottom), so that the few outliers beside
    the bulk near zero stay visible (a bin holding one eigenvalue is a bar of height 1).

    Args:
        grid, density: the density evaluated on a grid of eigenvalues.
        edges, counts: ``n + 1`` bin edges and the expected number of eigenvalues in each bin.
        dim: the number of eigenvalues (the Hessian's dimension).
        where: what the title says of the weights (e.g. ``"at step 120"``).
        what: the matrix named in the title (``"Hessian"``, ``"GGN"``).
    """
    x, y = _np(grid), np.clip(_np(density), 1e-300, None)
    fig = Figure(figsize=(6.4, 6.0))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.semilogy(x, y, color="tab:blue")
    top.set_ylim(float(y.max()) * 1e-8, float(y.max()) * 3)  # eight decades below the peak
    top.set_ylabel("density (log scale)")
    top.grid(True, alpha=0.3)
    e, n = _np(edges), _np(counts)
    floor = 0.1  # a tenth of an eigenvalue: lower bars are noise of the smoothing
    bottom.bar(e[:-1], np.where(n >= floor, n, 0.0), width=np.diff(e), align="edge", color="tab:blue")  # fmt: skip
    bottom.set_yscale("log")
    bottom.set_ylim(floor, max(float(n.max()) * 2, 10 * floor))
    bottom.set_ylabel("eigenvalues per bin (log scale)")
    bottom.set_xlabel("eigenvalue")
    bottom.grid(True, alpha=0.3)
    return _titled(fig, top, f"{what} eigenvalue density {where} (SLQ, {dim} eigenvalues)")
