"""The loss along a training trajectory: straight-line interpolations between weight snapshots,
the PCA plane of the trajectory, and losses on lines and planes of weight space.

Pure torch: every function takes a ``value_fn(theta) -> float | sequence of floats`` that
evaluates the loss (and any metric) at the flat weight vector ``theta``.

- Goodfellow, Vinyals, Saxe 2015 ("Qualitatively characterizing neural network optimization
  problems"): L((1 − α) θ_a + α θ_b) for α in [0, 1], a little beyond to show the walls. The
  curve from the initial to the trained weights usually falls monotonically; its *barrier* is the
  largest excess of the curve over the chord between its endpoints,
  max_{α∈[0,1]} L(α) − ((1 − α) L(0) + α L(1)) ≥ 0.
- Li, Xu, Taylor, Studer, Goldstein 2018 ("Visualizing the loss landscape of neural nets",
  section 7): PCA of the snapshot differences θ_i − θ_n, the trajectory projected on the first
  two components, the loss on the plane they span around θ_n. The plane passes through θ_n (the
  differences are not centered), so θ_n is the origin of the picture. The contour is the loss
  *on the plane*, not at the snapshots: the explained variance and each snapshot's distance from
  the plane say how faithful the picture is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_positive_int
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.space import Space

ValueFn = Callable[[Tensor], "float | Sequence[float]"]
_CHUNK = 1 << 20  # columns per block when measuring off-plane residuals


class Snapshots:
    """Flat weight snapshots, copied to CPU in ``dtype``, with the epoch and step of each.

    :meth:`thin` keeps memory bounded: it drops, one at a time, the snapshot whose neighbours are
    closest in steps (so the kept ones stay spread over the run), never the first (the initial
    weights) nor the last.

    Args:
        dtype: the storage dtype.
    """

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.tensors: list[Tensor] = []
        self.epochs: list[float] = []  # completed epochs, fractional mid-epoch
        self.steps: list[int] = []

    def __len__(self) -> int:
        return len(self.tensors)

    def add(self, theta: Tensor, epoch: float, step: int) -> None:
        """Store a copy of the flat vector ``theta``."""
        self.tensors.append(theta.detach().reshape(-1).to("cpu", self.dtype).clone())
        self.epochs.append(float(epoch))
        self.steps.append(int(step))

    def thin(self, max_count: int) -> list[int]:
        """Drop snapshots until at most ``max_count`` (≥ 2) remain; return the dropped indices
        (each in the list as it was when dropped)."""
        dropped = []
        while len(self) > max(max_count, 2):
            s = self.steps
            i = min(range(1, len(s) - 1), key=lambda j: (s[j + 1] - s[j - 1], j))
            for seq in (self.tensors, self.epochs, self.steps):
                del seq[i]
            dropped.append(i)
        return dropped

    def state_dict(self) -> dict:
        """Plain lists and CPU tensors (loadable with ``weights_only=True``)."""
        return {
            "snapshots": list(self.tensors),
            "snapshot_epochs": list(self.epochs),
            "snapshot_steps": list(self.steps),
        }

    def load_state_dict(self, state: dict) -> None:
        self.tensors = [t.to("cpu", self.dtype) for t in state.get("snapshots", [])]
        self.epochs = [float(e) for e in state.get("snapshot_epochs", [])]
        self.steps = [int(s) for s in state.get("snapshot_steps", [])]


def interpolation_alphas(num_points: int, margin: float = 0.0) -> Tensor:
    """``num_points`` evenly spaced α in [−margin, 1 + margin], plus 0 and 1 if missing.

    Raises:
        TypeError, ValueError: if ``num_points < 2`` or ``margin`` is negative or not finite.
    """
    check_positive_int("num_points", num_points)
    if num_points < 2:
        raise ValueError(f"`num_points` must be at least 2, got {num_points!r}.")
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        raise TypeError(f"`margin` must be a number, got {margin!r}.")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"`margin` must be a non-negative finite number, got {margin!r}.")
    grid = torch.linspace(-margin, 1 + margin, num_points, dtype=torch.float64)
    return torch.unique(torch.cat([grid, torch.tensor([0.0, 1.0], dtype=torch.float64)]))


def _values(value_fn: ValueFn, theta: Tensor) -> list[float]:
    v = value_fn(theta)
    if isinstance(v, Tensor):
        return [float(x) for x in v.reshape(-1)]
    return [float(x) for x in v] if isinstance(v, Sequence) else [float(v)]


def barrier(alphas: Tensor, losses: Tensor) -> float:
    """max over α in [0, 1] of L(α) − ((1 − α) L(0) + α L(1)); 0 when the curve stays under the
    chord (α = 0 and α = 1 must be among ``alphas``)."""
    a, y = alphas.to(torch.float64), losses.to(torch.float64)
    inside = (a >= 0) & (a <= 1)
    y0, y1 = y[a == 0], y[a == 1]
    if len(y0) != 1 or len(y1) != 1:
        raise ValueError("`alphas` must contain 0 and 1 exactly once.")
    excess = y[inside] - ((1 - a[inside]) * y0 + a[inside] * y1)
    return float(excess.max().clamp(min=0)) if torch.isfinite(excess).all() else math.nan


def is_monotonic(alphas: Tensor, losses: Tensor, rtol: float = 1e-4) -> bool:
    """Whether the loss is non-increasing on α in [0, 1], up to increases of
    ``rtol · (max − min)`` (rounding)."""
    inside = (alphas >= 0) & (alphas <= 1)
    y = losses.to(torch.float64)[inside][torch.argsort(alphas[inside])]
    tol = rtol * float(y.max() - y.min())
    return bool((y[1:] - y[:-1] <= tol).all())


@dataclass(frozen=True)
class InterpolationResult:
    """The values along θ(α) = (1 − α) θ_start + α θ_end.

    Attributes:
        alphas: the α values, increasing.
        values: ``(len(alphas), k)``: column 0 the loss, the others the metrics.
        barrier: see :func:`barrier` (of the loss).
        monotonic: see :func:`is_monotonic` (of the loss).
        distance: ‖θ_end − θ_start‖.
    """

    alphas: Tensor
    values: Tensor
    barrier: float
    monotonic: bool
    distance: float

    @property
    def losses(self) -> Tensor:
        return self.values[:, 0]

    @property
    def num_evaluations(self) -> int:
        return len(self.alphas)


def interpolate(
    value_fn: ValueFn, start: Tensor, end: Tensor, alphas: Tensor, *, space: Space | None = None
) -> InterpolationResult:
    """Evaluate ``value_fn`` along the line through ``start`` (α = 0) and ``end`` (α = 1).

    The points are ``torch.lerp(start, end, α)``, exact at both endpoints. With a ``space``
    (sharded weights: ``start`` and ``end`` are this rank's shards) the distance is reduced
    across ranks.
    """
    end = end.detach()
    start = start.detach().to(device=end.device, dtype=end.dtype)
    rows = [_values(value_fn, torch.lerp(start, end, float(a))) for a in alphas.tolist()]
    values = torch.tensor(rows, dtype=torch.float64)
    return InterpolationResult(
        alphas=alphas.to(torch.float64),
        values=values,
        barrier=barrier(alphas, values[:, 0]),
        monotonic=is_monotonic(alphas, values[:, 0]),
        distance=float(_norm(space, (end - start).to(torch.float64))),
    )


@dataclass(frozen=True)
class PCAResult:
    """The PCA plane of a trajectory around its origin (Li et al. 2018, section 7).

    Attributes:
        directions: ``(k, dim)`` orthonormal directions (float64, CPU), largest variance first.
        singular_values: all singular values of the difference matrix, decreasing.
        explained_variance_ratio: ``(k,)`` share of Σ‖θ_i − θ_origin‖² along each direction.
        coords: ``(n, k)`` coordinates of each snapshot on the directions.
        off_plane: ``(n,)`` distance of each snapshot from the plane.
        norms: ``(n,)`` ‖θ_i − θ_origin‖.
    """

    directions: Tensor
    singular_values: Tensor
    explained_variance_ratio: Tensor
    coords: Tensor
    off_plane: Tensor
    norms: Tensor

    @property
    def explained_variance(self) -> float:
        """The share of the trajectory's spread the k directions capture (1 = all of it)."""
        return float(self.explained_variance_ratio.sum())


def _norm(space: Space | None, x: Tensor) -> Tensor:
    return x.norm(dim=-1) if space is None else space.norm(x)


def pca_plane(
    snapshots: Sequence[Tensor],
    origin: Tensor,
    *,
    k: int = 2,
    seed: int = 0,
    space: Space | None = None,
) -> PCAResult:
    """PCA of the differences θ_i − θ_origin (not centered: the plane passes through the origin).

    Li et al.'s code centres the differences (sklearn's ``PCA``) and so fits a plane through
    their mean, which need not pass through the current weights; here the current weights are
    the origin of the picture, and the "explained variance" is the share of Σᵢ ‖θ_i − θ_origin‖²
    (a second moment about the origin, not a variance about the mean).

    The directions come from the n × n Gram matrix of the differences (float64, time
    n² · dim); the coordinates and off-plane distances are then measured directly against the
    (re-orthonormalized) directions, so an exactly planar trajectory has off-plane distances at
    rounding level. Directions whose singular value is below 1e-6 of the largest count as absent:
    when the differences span fewer than ``k`` dimensions, the missing directions are Gaussian
    (from ``seed``) orthogonalized against the others, and explain no variance.

    Args:
        snapshots: the n weight vectors θ_i (flat; on any device, copied to CPU).
        origin: θ_origin, usually the current weights.
        k: number of directions.
        seed: seed of the completing directions.
        space: for sharded weights (the snapshots and the origin are this rank's shards, in
            float64 on CPU): the space that reduces their inner products across ranks; the
            directions are then this rank's shards too (drawn whole and sliced where completed).

    Returns:
        A :class:`PCAResult`; the sign of each direction puts the first snapshot at a
        non-positive coordinate (the trajectory runs left to right and bottom to top).

    Raises:
        ValueError: if there is no snapshot or ``k`` exceeds the dimension.
    """
    check_positive_int("k", k)
    if not snapshots:
        raise ValueError("`snapshots` is empty.")
    o = origin.detach().reshape(-1).to("cpu", torch.float64)
    sp = space if space is not None else Space(o.numel(), torch.float64, torch.device("cpu"))
    if k > sp.dim:
        raise ValueError(f"`k` = {k} exceeds the dimension {sp.dim}.")
    diffs = torch.stack([s.detach().reshape(-1).to("cpu", torch.float64) - o for s in snapshots])
    evals, evecs = torch.linalg.eigh(sp.reduce(diffs @ diffs.T))
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    sing = evals.sqrt()
    total = float(evals.sum())
    m = min(k, int((sing > 1e-6 * float(sing[0])).sum())) if total > 0 else 0
    dirs = torch.zeros(k, o.numel(), dtype=torch.float64)
    gen = make_generator(seed)
    for j in range(k):
        if j < m:
            v = diffs.T @ (evecs[:, j] / sing[j])
        else:
            v = sp.draw(gaussian, (sp.dim,), gen, dtype=torch.float64, device="cpu")
        for _ in range(2):  # Gram-Schmidt twice is enough (Kahan)
            v -= dirs[:j].T @ sp.reduce(dirs[:j] @ v)
        dirs[j] = v / sp.norm(v)
    coords = sp.reduce(diffs @ dirs.T)
    signs = torch.where(coords[0] > 0, -1.0, 1.0).to(torch.float64)
    coords, dirs = coords * signs, dirs * signs[:, None]
    off2 = torch.zeros(len(snapshots), dtype=torch.float64)
    for c in range(0, o.numel(), _CHUNK):
        res = diffs[:, c : c + _CHUNK] - coords @ dirs[:, c : c + _CHUNK]
        off2 += (res**2).sum(1)
    off2 = sp.reduce(off2)
    ratio = torch.zeros(k, dtype=torch.float64)
    if total > 0:
        ratio[:m] = evals[:m] / total
    return PCAResult(
        directions=dirs,
        singular_values=sing,
        explained_variance_ratio=ratio,
        coords=coords,
        off_plane=off2.sqrt(),
        norms=sp.norm(diffs),
    )


def plane_grid(
    coords: Tensor, size: int, pad: float = 0.25, *, square: bool = False
) -> tuple[Tensor, Tensor]:
    """Grid axes spanning the 2-D points ``coords`` and the origin, padded by ``pad`` times the
    larger of the two spans on every side (both axes get the same padding). With ``square`` both
    axes also get the same length (the larger span, centred on the points), so that a picture
    drawn with equal aspect, which keeps angles and distances true, fills its axes."""
    check_positive_int("size", size)
    pts = torch.cat([coords[:, :2].to(torch.float64), torch.zeros(1, 2, dtype=torch.float64)])
    lo, hi = pts.min(0).values, pts.max(0).values
    span = float((hi - lo).max())
    margin = pad * span if span > 0 else 1.0
    if square:
        center, half = (lo + hi) / 2, span / 2 + margin
        lo, hi = center - half + margin, center + half - margin
    return (
        torch.linspace(float(lo[0]) - margin, float(hi[0]) + margin, size, dtype=torch.float64),
        torch.linspace(float(lo[1]) - margin, float(hi[1]) + margin, size, dtype=torch.float64),
    )


def line_values(value_fn: ValueFn, origin: Tensor, direction: Tensor, ts: Tensor) -> Tensor:
    """``value_fn(origin + t · direction)`` for each t: a ``(len(ts), k)`` float64 tensor."""
    d = direction.to(device=origin.device, dtype=origin.dtype)
    rows = [_values(value_fn, origin + float(t) * d) for t in ts.tolist()]
    return torch.tensor(rows, dtype=torch.float64)


def surface_values(
    value_fn: ValueFn, origin: Tensor, directions: Tensor, xs: Tensor, ys: Tensor
) -> Tensor:
    """``value_fn(origin + x · d_1 + y · d_2)`` on the grid: a ``(len(ys), len(xs), k)`` float64
    tensor (row i is y = ys[i], as ``matplotlib.contourf(xs, ys, Z)`` expects)."""
    d1, d2 = (d.to(device=origin.device, dtype=origin.dtype) for d in directions[:2])
    rows = [
        [_values(value_fn, origin + float(x) * d1 + float(y) * d2) for x in xs.tolist()]
        for y in ys.tolist()
    ]
    return torch.tensor(rows, dtype=torch.float64)
