"""The package's figures: bare matplotlib Figures (no pyplot), equal scales on the PCA picture,
readable labels, round colour-bar ticks, outliers visible on the density figure."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from lightning_landscape.landscape import plots
from lightning_landscape.landscape.trajectory import pca_plane, plane_grid


def _converging_trajectory(n=20, d=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, snaps = 3 * torch.randn(d, generator=g, dtype=torch.float64), []
    for _ in range(n):
        snaps.append(w.clone())
        w = 0.7 * w + 0.05 * torch.randn(d, generator=g, dtype=torch.float64)
    return snaps, w


def test_pca_figure_has_equal_scales_and_thinned_labels():
    snaps, theta = _converging_trajectory()
    pca = pca_plane(snaps, theta)
    xs, ys = plane_grid(pca.coords, 9, square=True)
    assert float(xs[-1] - xs[0]) == pytest.approx(float(ys[-1] - ys[0]))  # a square region
    x, y = torch.meshgrid(xs, ys, indexing="xy")
    loss = 0.01 + x**2 + 10 * y**2  # spans far more than 20x: log colour scale
    labels = [f"epoch {i}" for i in range(len(snaps))]
    fig = plots.trajectory_figure(pca, xs, ys, loss, labels, current_label="epoch 20")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_aspect() == 1.0
    shown = [t.get_text() for t in ax.texts]
    assert "epoch 0" in shown and 2 <= len(shown) < len(labels)  # the pile near the end thinned
    points = {f"epoch {i}": pca.coords[i, :2].numpy() for i in range(len(snaps))}
    span = float(xs[-1] - xs[0])
    for a in shown:
        for b in shown:
            if a != b:
                assert np.hypot(*(points[a] - points[b])) > 0.08 * span
    ticks = fig.axes[1].get_yticks()  # the colour bar: 1-2-5 (or 1-3, 1) times a power of ten
    mantissas = {round(t / 10 ** np.floor(np.log10(t)), 6) for t in ticks}
    assert mantissas <= {1.0, 2.0, 3.0, 5.0} and len(ticks) >= 3


def test_log_ticks_are_round_and_few():
    assert plots._log_ticks(0.03, 0.9) == [0.05, 0.1, 0.2, 0.5]
    assert plots._log_ticks(0.5, 1e3) == [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0]
    many = plots._log_ticks(0.01, 5e7)
    assert len(many) <= 8 and all(np.log10(t) == round(np.log10(t)) for t in many)


def test_density_figure_shows_outliers_on_a_log_count_scale():
    grid = torch.linspace(-1, 41, 200, dtype=torch.float64)
    density = torch.exp(-(grid**2) * 50) + 1e-3 * torch.exp(-((grid - 40) ** 2) * 50)
    edges = torch.linspace(-1, 41, 43, dtype=torch.float64)
    counts = torch.zeros(42, dtype=torch.float64)
    counts[1], counts[41] = 1999.0, 1.0  # the bulk at 0 and one outlier at 40
    fig = plots.density_figure(grid, density, edges, counts, dim=2000, where="at step 3")
    top, bottom = fig.axes
    assert top.get_yscale() == "log" and bottom.get_yscale() == "log"
    heights = [p.get_height() for p in bottom.patches]
    assert heights[41] == 1.0 and bottom.get_ylim()[0] < 1.0  # the outlier's bar is visible
    assert "2000 eigenvalues" in top.get_title()


def test_no_pyplot_and_no_backend_switch():
    """Drawing and rendering a figure imports no pyplot (in a fresh interpreter; Lightning
    itself imports pyplot, so only the figures are imported here)."""
    code = """
import sys, torch
import matplotlib
backend = dict.__getitem__(matplotlib.rcParams, "backend")  # raw: reading resolves it
from lightning_landscape.landscape import plots
from lightning_landscape.landscape.trajectory import pca_plane, plane_grid
snaps = [torch.randn(10, dtype=torch.float64) for _ in range(3)]
pca = pca_plane(snaps, torch.zeros(10, dtype=torch.float64))
xs, ys = plane_grid(pca.coords, 4, square=True)
fig = plots.trajectory_figure(pca, xs, ys, torch.rand(4, 4) + 1, ["a", "b", "c"], current_label="d")
assert plots.figure_pixels(fig).shape[2] == 3
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_package_never_names_pyplot():
    package = Path(plots.__file__).parents[1]
    for path in package.rglob("*.py"):
        text = path.read_text()
        for banned in (
            "import matplotlib.pyplot",
            "from matplotlib import pyplot",
            "matplotlib.use(",
        ):
            assert banned not in text, f"{path}: {banned}"
