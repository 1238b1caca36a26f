"""TrajectoryMonitor's arguments, checked in one place (each error names its argument), and
its pictures' refusal of non-finite weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.checks import (
    check_bool,
    check_floating_dtype,
    check_positive_int,
    check_real,
)
from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed

#: Snapshots in half precision misstate small steps (a step of 1e-3 of the weights' norm: 2 %
#: in float16, 93 % in bfloat16), so only these are taken.
SNAPSHOT_DTYPES = (torch.float32, torch.float64)


def check_arguments(
    alpha_margin: Any,
    grid_size: Any,
    max_snapshots: Any,
    metric_fn: Any,
    metric_name: Any,
    snapshot_dtype: Any,
    **flags: Any,
) -> torch.dtype:
    """Check TrajectoryMonitor's own arguments (``flags``: its booleans, by name) and return
    the snapshot dtype.

    Raises:
        TypeError, ValueError: naming the argument and its value.
    """
    check_real("alpha_margin", alpha_margin, low=0.0, what="a non-negative finite number")
    check_positive_int("grid_size", grid_size)
    if grid_size < 2:
        raise ValueError(f"`grid_size` must be at least 2, got {grid_size!r}.")
    check_positive_int("max_snapshots", max_snapshots)
    if max_snapshots < 2:
        raise ValueError(f"`max_snapshots` must be at least 2, got {max_snapshots!r}.")
    for name, value in flags.items():
        check_bool(name, value)
    if metric_fn is not None and not callable(metric_fn):
        raise TypeError(f"`metric_fn` must be callable or None, got {metric_fn!r}.")
    if not isinstance(metric_name, str) or not metric_name or "/" in metric_name:
        raise ValueError(f"`metric_name` must be a non-empty str without '/', got {metric_name!r}.")
    return check_floating_dtype("snapshot_dtype", snapshot_dtype, choices=SNAPSHOT_DTYPES)


def nonfinite_picture(
    monitor: Any, ctx: Any, tensors: list[Tensor], others: list[int]
) -> dict[str, float] | None:
    """NaN for the picture's values, with one warning, where the weights or a snapshot are not
    finite on some rank (a NaN in training: the PCA's eigendecomposition raised, which ended a
    DDP fit); None where the picture can be drawn. The same answer on every rank."""
    bad = float(not all(bool(torch.isfinite(t).all()) for t in tensors))
    if not float(all_reduce_sum_(torch.tensor([bad], dtype=torch.float64), is_distributed())[0]):
        return None
    keys = [monitor.key(k) for k in ("pca_explained_variance", "off_plane_distance")]
    ctx.explained.update(keys)
    ctx.warn(
        "TrajectoryMonitor-picture-nonfinite",
        "TrajectoryMonitor: the weights or a snapshot are not finite (a NaN in training?): no "
        "landscape picture, its values are NaN.",
    )
    return dict.fromkeys(keys if others else [], math.nan)
