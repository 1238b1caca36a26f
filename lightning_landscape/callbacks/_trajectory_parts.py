"""Pieces of TrajectoryMonitor: the snapshots' dtype and thinning, the landscape picture (the loss
on the PCA plane of the snapshots and on filter-normalized random slices) and the figures it
sends to the loggers (rank zero only)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from lightning_landscape._core.distributed import broadcast
from lightning_landscape._core.sharding import ShardLayout
from lightning_landscape._core.space import Space
from lightning_landscape._core.vectors import unflatten
from lightning_landscape.callbacks import _logging
from lightning_landscape.landscape import plots
from lightning_landscape.landscape.directions import (
    filter_normalized_directions,
    normalization_parameters,
)
from lightning_landscape.landscape.sharded import sharded_filter_directions
from lightning_landscape.landscape.trajectory import (
    InterpolationResult,
    Snapshots,
    line_values,
    pca_plane,
    plane_grid,
    surface_values,
)

DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

ValueFn = Callable[[Tensor], list[float]]


def floating_dtype(snapshot_dtype: torch.dtype | str) -> torch.dtype:
    """The floating dtype of the snapshots, from a dtype or its name (``ValueError`` otherwise)."""
    dtype = DTYPES.get(snapshot_dtype) if isinstance(snapshot_dtype, str) else snapshot_dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"`snapshot_dtype` must be a floating torch.dtype or one of {sorted(DTYPES)}, "
            f"got {snapshot_dtype!r}."
        )
    return dtype


def thin_snapshots(snapshots: Snapshots, max_snapshots: int, warned: bool) -> bool:
    """Keep at most ``max_snapshots`` snapshots (:meth:`Snapshots.thin`), with one warning the
    first time one is dropped (``warned`` False); whether it has warned."""
    steps = list(snapshots.steps)
    dropped = snapshots.thin(max_snapshots)
    if dropped and not warned:
        warned = True
        rank_zero_warn(
            f"TrajectoryMonitor: more than max_snapshots={max_snapshots} snapshots; "
            f"dropped the one at step {steps[dropped[0]]} and will thin older ones from now "
            "on (the initial and latest are kept). Raise `max_snapshots` to keep them all."
        )
    return warned


def same_on_all_ranks(t: Tensor) -> Tensor:
    """Rank 0's copy of ``t`` on every rank (a no-op on one process)."""
    return broadcast(t, src=0)


def log_curve_figures(
    trainer: pl.Trainer,
    curves: Sequence[tuple[str, InterpolationResult, str]],
    end_label: str,
    metric_name: str,
    step: int,
) -> None:
    """The figures ``trajectory/loss_<key>_to_current`` of ``(key, curve, start label)``."""
    if _logging.wants_figures(trainer):
        for key, curve, start_label in curves:
            fig = plots.interpolation_figure(
                curve, start_label=start_label, end_label=end_label,
                metric_name=metric_name, show_monotonic=key == "init",
            )  # fmt: skip
            _logging.log_figure(trainer, f"trajectory/loss_{key}_to_current", fig, step)


def pca_picture(
    value: ValueFn,
    snapshots: list[Tensor],
    theta: Tensor,
    *,
    grid_size: int,
    seed: int,
    space: Space | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The loss on a ``grid_size``² grid of the PCA plane of ``snapshots`` − θ (the same plane on
    every rank): its metrics, and its arrays ``pca``, ``xs``, ``ys``, ``loss``. With a ``space``
    (sharded weights) everything is computed from reduced inner products, identical on every
    rank, and the directions stay shards."""
    pca = pca_plane(snapshots, theta, seed=seed, space=space)
    xs, ys = plane_grid(pca.coords, grid_size)
    g = grid_size
    if space is None:
        packed = same_on_all_ranks(torch.cat([pca.directions.reshape(-1), xs, ys]))
        dirs, xs, ys = packed[: -2 * g].reshape(2, -1), packed[-2 * g : -g], packed[-g:]
    else:
        dirs = pca.directions
    z = surface_values(value, theta, dirs.to(theta), xs, ys)[..., 0]
    out = {
        "trajectory/pca_explained_variance": pca.explained_variance,
        "trajectory/off_plane_distance": float(pca.off_plane.max()),
    }
    return out, {"pca": pca, "xs": xs, "ys": ys, "loss": z}


def slice_picture(
    value: ValueFn,
    module: torch.nn.Module,
    params: list[Tensor],
    theta: Tensor,
    *,
    num_points: int,
    grid_size: int,
    seed: int,
    layout: ShardLayout | None = None,
) -> dict[str, Tensor]:
    """The loss along one and on the plane of two filter-normalized random directions around θ
    (t ∈ [−1, 1] with 0 included, and [−1, 1]²): ``slice_t``, ``slice_1d``, ``slice_grid``,
    ``slice_2d``. With a ``layout`` (sharded weights: θ is this rank's shards) the directions
    are the shards of the single-process ones."""
    norm_ids = normalization_parameters(module)
    zero = [id(p) in norm_ids for p in params]
    if layout is not None:
        dirs = sharded_filter_directions(layout, theta, num=2, seed=seed, zero=zero)
    else:
        weights = unflatten(theta, params)  # θ itself: the parameters may have moved
        dirs = filter_normalized_directions(weights, num=2, seed=seed, zero=zero)
    ts = torch.linspace(-1, 1, num_points, dtype=torch.float64)
    ts = torch.unique(torch.cat([ts, torch.zeros(1, dtype=torch.float64)]))
    line = line_values(value, theta, dirs[0], ts)[:, 0]
    grid = torch.linspace(-1, 1, grid_size, dtype=torch.float64)
    z2 = surface_values(value, theta, dirs, grid, grid)[..., 0]
    return {"slice_t": ts, "slice_1d": line, "slice_grid": grid, "slice_2d": z2}


def log_pca_figure(
    trainer: pl.Trainer, picture: dict[str, Any], labels: list[str], here: str, step: int
) -> None:
    """The figure ``trajectory/pca_landscape`` of :func:`pca_picture`'s arrays."""
    if _logging.wants_figures(trainer):
        pca, xs, ys, z = (picture[k] for k in ("pca", "xs", "ys", "loss"))
        fig = plots.trajectory_figure(pca, xs, ys, z, labels, current_label=here)
        _logging.log_figure(trainer, "trajectory/pca_landscape", fig, step)


def log_slice_figures(trainer: pl.Trainer, picture: dict[str, Any], here: str, step: int) -> None:
    """The figures ``trajectory/slice_1d`` and ``trajectory/slice_2d`` of :func:`slice_picture`'s
    arrays."""
    if _logging.wants_figures(trainer):
        fig = plots.slice_1d_figure(picture["slice_t"], picture["slice_1d"], where=f"at {here}")
        _logging.log_figure(trainer, "trajectory/slice_1d", fig, step)
        grid = picture["slice_grid"]
        fig = plots.slice_2d_figure(grid, grid, picture["slice_2d"], where=f"at {here}")
        _logging.log_figure(trainer, "trajectory/slice_2d", fig, step)
