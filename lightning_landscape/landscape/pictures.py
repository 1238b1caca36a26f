"""The landscape picture around the current weights: the loss on the PCA plane of a trajectory's
snapshots (Li et al. 2018, section 7) and on lines and planes of filter-normalized random
directions (section 4).

Pure torch: the loss comes from a ``value_fn(theta)`` (see
:mod:`lightning_landscape.landscape.trajectory`), which may reduce across ranks. Planes and
directions are the same on every rank: the PCA plane is computed on each rank and rank 0's copy
is broadcast (a collective: every rank calls :func:`pca_picture`), and the random directions come
from a seeded CPU generator.

Cost, in ``value_fn`` calls: ``grid_size²`` for the PCA plane; ``len(ts) + grid_size²`` for the
slices. Memory: a few vectors of the dimension (the plane's two directions, the slices' two).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.distributed import broadcast
from lightning_landscape._core.sharding import ShardLayout
from lightning_landscape._core.space import Space
from lightning_landscape._core.vectors import unflatten
from lightning_landscape.landscape.directions import (
    filter_normalized_directions,
    normalization_parameters,
)
from lightning_landscape.landscape.sharded import sharded_filter_directions
from lightning_landscape.landscape.trajectory import (
    ValueFn,
    line_values,
    pca_plane,
    plane_grid,
    surface_values,
)


def pca_picture(
    value_fn: ValueFn,
    snapshots: list[Tensor],
    theta: Tensor,
    *,
    grid_size: int,
    seed: int,
    space: Space | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """The loss on a ``grid_size``² square grid of the PCA plane of ``snapshots`` − θ (the same
    plane on every rank). With a ``space`` (sharded weights: θ and the snapshots are this rank's
    shards) everything comes from reduced inner products, identical on every rank, and the
    directions stay shards.

    Returns:
        ``({"pca_explained_variance": ..., "off_plane_distance": ...}, arrays)``, the arrays
        being ``pca`` (a :class:`~lightning_landscape.landscape.trajectory.PCAResult`), ``xs``,
        ``ys`` and ``loss`` (row i at y = ys[i]).
    """
    pca = pca_plane(snapshots, theta, seed=seed, space=space)
    xs, ys = plane_grid(pca.coords, grid_size, square=True)
    g = grid_size
    if space is None:
        packed = broadcast(torch.cat([pca.directions.reshape(-1), xs, ys]), src=0)
        dirs, xs, ys = packed[: -2 * g].reshape(2, -1), packed[-2 * g : -g], packed[-g:]
    else:
        dirs = pca.directions
    z = surface_values(value_fn, theta, dirs.to(theta), xs, ys)[..., 0]
    scalars = {
        "pca_explained_variance": pca.explained_variance,
        "off_plane_distance": float(pca.off_plane.max()),
    }
    return scalars, {"pca": pca, "xs": xs, "ys": ys, "loss": z}


def slice_picture(
    value_fn: ValueFn,
    module: nn.Module,
    params: list[Tensor],
    theta: Tensor,
    *,
    num_points: int,
    grid_size: int,
    seed: int,
    layout: ShardLayout | None = None,
) -> dict[str, Tensor]:
    """The loss along one and on the plane of two filter-normalized random directions around θ
    (t ∈ [−1, 1] with 0 included, and [−1, 1]²); normalization layers and biases get zero
    directions. With a ``layout`` (sharded weights: θ is this rank's shards) the directions are
    the shards of the single-process ones.

    Returns:
        ``slice_t``, ``slice_1d`` (the loss at each t), ``slice_grid`` and ``slice_2d`` (the loss
        on the grid, row i at the second coordinate ``slice_grid[i]``).
    """
    norm_ids = normalization_parameters(module)
    zero = [id(p) in norm_ids for p in params]
    if layout is not None:
        dirs = sharded_filter_directions(layout, theta, num=2, seed=seed, zero=zero)
    else:
        weights = unflatten(theta, params)  # θ itself: the parameters may have moved
        dirs = filter_normalized_directions(weights, num=2, seed=seed, zero=zero)
    ts = torch.linspace(-1, 1, num_points, dtype=torch.float64)
    ts = torch.unique(torch.cat([ts, torch.zeros(1, dtype=torch.float64)]))
    line = line_values(value_fn, theta, dirs[0], ts)[:, 0]
    grid = torch.linspace(-1, 1, grid_size, dtype=torch.float64)
    z2 = surface_values(value_fn, theta, dirs, grid, grid)[..., 0]
    return {"slice_t": ts, "slice_1d": line, "slice_grid": grid, "slice_2d": z2}
