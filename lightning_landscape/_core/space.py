"""The vectors an operator acts on: what the algorithms hold, and how they measure them.

Every algorithm of the engine (Lanczos, trace, density, analyze) holds its vectors (basis, probes,
residuals) as the operator's *local* vectors and measures them through the operator's
:class:`Space`, never with ``torch.dot``/``Tensor.norm`` directly:

- :meth:`Space.reduce` turns partial inner products (``(u * v).sum(-1)``, ``basis @ w``, ...)
  into inner products of the whole vectors;
- :meth:`Space.norm`, :meth:`Space.all_finite` and :meth:`Space.orthonormalize` are the
  reductions built on it;
- :meth:`Space.draw` gives this process's part of a random vector drawn whole.

An operator on whole vectors (:class:`~.operator.HessianOperator` under DDP, a dense matrix)
needs nothing: :func:`space_of` gives it the plain :class:`Space`, whose reductions are the
local ones, bit for bit what the algorithms computed before. A sharded operator (FSDP2, FSDP (v1):
:class:`~lightning_landscape.curvature.sharded.ShardedHessianOperator`) carries a ``space``
attribute whose vectors are this rank's shards and whose reductions all-reduce the partial sums
(:class:`~.sharding.ShardedSpace`), so the algorithms give the same answers on shards as on
whole vectors. The landscape measures (trajectory distances and PCA) use the same spaces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Draw = Callable[[tuple[int, ...], torch.Generator, torch.dtype, torch.device], Tensor]


class Space:
    """Whole vectors on one process: local inner products are the inner products.

    Args:
        dim: the dimension of the vectors.
        dtype, device: of the vectors.

    Attributes:
        dim: the dimension (of the whole vectors, on every process).
        local_dim: the length of this process's part of a vector (``dim`` here).
    """

    #: Where whole random vectors are drawn (None: the device asked for). Sharded spaces draw
    #: on the CPU, so that every process draws the same numbers whatever its device.
    draw_device: torch.device | None = None

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dim = int(dim)
        self.local_dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)

    def reduce(self, partial: Tensor) -> Tensor:
        """The sum over processes of ``partial`` (an inner product taken on local parts)."""
        return partial

    def norm(self, x: Tensor, dim: int = -1) -> Tensor:
        """Euclidean norms of the vectors of ``x`` along ``dim`` (the vector axis)."""
        return x.norm(dim=dim)

    def all_finite(self, x: Tensor) -> bool:
        """Whether every entry of ``x`` is finite, on every process (the same answer on all)."""
        return bool(torch.isfinite(x).all())

    def restrict(self, full: Tensor, axis: int = -1) -> Tensor:
        """This process's part of whole vectors laid along ``axis`` of ``full``."""
        return full

    def draw(
        self,
        fn: Draw,
        shape: tuple[int, ...],
        gen: torch.Generator,
        axis: int = -1,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """This process's part of random vectors ``fn(shape, gen, dtype, device)``, whose
        ``axis`` has length :attr:`dim` (default dtype and device: the space's); every process
        draws the whole vectors (on :attr:`draw_device` when set) and advances ``gen`` alike."""
        target = device or self.device
        whole = fn(shape, gen, dtype or self.dtype, self.draw_device or target)
        return self.restrict(whole, axis).to(target)

    def orthonormalize(self, Y: Tensor) -> Tensor:
        """An orthonormal basis (``(local_dim, k)`` columns) of the range of the columns of
        ``Y`` (Householder QR)."""
        return torch.linalg.qr(Y)[0]


def space_of(op: object) -> Space:
    """The operator's :class:`Space`: its ``space`` attribute, or whole vectors of its
    ``dim``, ``dtype`` and ``device``."""
    space = getattr(op, "space", None)
    if space is None:
        space = Space(op.dim, op.dtype, op.device)  # type: ignore[attr-defined]
    return space
