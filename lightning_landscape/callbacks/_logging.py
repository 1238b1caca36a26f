"""Logging for self-scheduled measurements: scalars to every logger and to ``callback_metrics``,
figures and histograms to TensorBoard (PNG copies next to the logs)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.utilities import rank_zero_warn

from lightning_landscape.callbacks._compat import TENSORBOARD_LOGGERS
from lightning_landscape.landscape import plots


def warn_once(trainer: pl.Trainer | None, key: str, message: str) -> None:
    """One warning per trainer (per fit) for each key, on rank zero."""
    seen = trainer.__dict__.setdefault("_landscape_warned", set()) if trainer is not None else set()
    if key not in seen:
        seen.add(key)
        rank_zero_warn(message)


def warn_non_finite(
    trainer: pl.Trainer, name: str, metrics: dict[str, float], step: int, explained=frozenset()
) -> None:
    """One warning per fit if a measurement of the monitor ``name`` gave non-finite values,
    those ``explained`` apart (logged as NaN on purpose, with a warning of their own)."""
    bad = [k for k, v in metrics.items() if not math.isfinite(v) and k not in explained]
    if bad:
        warn_once(
            trainer,
            f"{name}-nan",
            f"{name}: non-finite values at step {step} ({', '.join(bad[:4])}); is the loss "
            "NaN/inf at these weights? NaN is logged and training goes on.",
        )


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Write scalars to every logger at ``step`` (default: the global step) and to
    ``trainer.callback_metrics`` so ``ModelCheckpoint``/``EarlyStopping`` can monitor them."""
    step = trainer.global_step if step is None else step
    clean = {k: float(v) for k, v in metrics.items()}
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(clean, step=step)
    for k, v in clean.items():
        trainer.callback_metrics[k] = torch.tensor(v)


def tensorboard(trainer: pl.Trainer, what: str) -> Any | None:
    """The SummaryWriter of the first TensorBoard logger (rank zero only); warns once if there is
    a logger but none is TensorBoard."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TENSORBOARD_LOGGERS):
            return logger.experiment
    if trainer.loggers:
        folder = figure_dir(trainer)
        pngs = f"figures are still saved as PNG files in {folder}" if folder else "figures too"
        warn_once(
            trainer,
            "no-tensorboard",
            "lightning-landscape sends images and histograms to TensorBoard only; no "
            f"TensorBoardLogger is attached, so histograms are skipped and {pngs} (scalars are "
            "logged to every logger).",
        )
    return None


def wants_figures(trainer: pl.Trainer) -> bool:
    """Whether drawing a figure is worth it: rank zero, with at least one logger."""
    return bool(trainer.is_global_zero and trainer.loggers)


def figure_dir(trainer: pl.Trainer) -> str | None:
    """Folder for PNG copies of the figures: ``<log_dir>/figures``."""
    for logger in trainer.loggers:
        if getattr(logger, "log_dir", None):
            return os.path.join(logger.log_dir, "figures")
    return None


def log_figure(trainer: pl.Trainer, tag: str, figure: Figure, step: int | None = None) -> None:
    """Send a ``matplotlib.figure.Figure`` to TensorBoard as an image and save a PNG copy in
    :func:`figure_dir` (rank zero only)."""
    if not trainer.is_global_zero:
        return
    step = trainer.global_step if step is None else step
    folder = figure_dir(trainer)
    if folder is not None:
        os.makedirs(folder, exist_ok=True)
        name = tag.replace("/", "_") + f"_step{step}.png"
        figure.savefig(os.path.join(folder, name), dpi=100)
    writer = tensorboard(trainer, "figures")
    if writer is not None:
        writer.add_image(tag, plots.figure_pixels(figure), global_step=step, dataformats="HWC")


def log_histogram(
    trainer: pl.Trainer,
    tag: str,
    edges: torch.Tensor,
    counts: torch.Tensor,
    step: int | None = None,
) -> None:
    """A TensorBoard histogram from bucket edges (n+1) and counts (n)."""
    writer = tensorboard(trainer, "histograms")
    if writer is None:
        return
    step = trainer.global_step if step is None else step
    centers = (edges[1:] + edges[:-1]) / 2
    num = float(counts.sum())
    if not num > 0 or not math.isfinite(num):
        return
    writer.add_histogram_raw(
        tag,
        min=float(edges[0]),
        max=float(edges[-1]),
        num=num,
        sum=float((centers * counts).sum()),
        sum_squares=float((centers**2 * counts).sum()),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def log_density(ctx: Any, key: Callable[[str], str], density: Any, what: str = "Hessian") -> None:
    """The SLQ density as a figure (log density, log counts per bin) and as a histogram."""
    if not torch.isfinite(density.nodes).all():
        return
    grid = density.grid(800)
    edges = torch.linspace(float(grid[0]), float(grid[-1]), 61, dtype=torch.float64)
    centers = (edges[1:] + edges[:-1]) / 2
    width = float(edges[1] - edges[0])
    counts = density.evaluate(centers) * width * density.dim
    fig = plots.density_figure(
        grid, density.evaluate(grid), edges, counts, dim=density.dim,
        where=f"at step {ctx.step}", what=what,
    )  # fmt: skip
    ctx.log_figure(key("spectral_density"), fig)
    ctx.log_histogram(key("eigenvalue_histogram"), edges, counts)
