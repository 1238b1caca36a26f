"""Sharded vectors: where this rank's part of each parameter of a sharded module sits in the
whole flat vector (:class:`ShardLayout`), and the :class:`~.space.Space` of vectors split that way
(:class:`ShardedSpace`: inner products are all-reduced sums of local ones).

Two shardings give such parts, and one layout holds both:

- ``fully_shard`` (FSDP2) replaces each parameter of a module by a ``DTensor`` sharded on dim 0
  (``Shard(0)``) over a 1-D device mesh: rank r holds rows [o_r, o_r + n_r) of every parameter,
  with n_r = ceil(rows / world) for the first ranks and fewer (possibly none) for the last ones,
  so uneven sizes are fine.
- FSDP (v1, ``FullyShardedDataParallel`` with ``use_orig_params=True``) gives each rank one
  contiguous slice of each unit's flattened parameters: the original parameters are flat views
  of their pieces in that slice, cut anywhere, possibly empty (:mod:`.fsdp1`).

Either way each rank's part of a parameter is one contiguous range of its flattened entries.
Flattened parameter by parameter in the module's order, the whole vector is the one a single
process would use, and each rank's part is one contiguous range of every parameter's block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape._core.fsdp import (
    fsdp2_api,
    is_dtensor,
    is_fsdp2_module,
    local_part,
    reshard_all,
)
from lightning_landscape._core.fsdp1 import Piece, is_fsdp1, shard_pieces
from lightning_landscape._core.space import Space
from lightning_landscape._core.vectors import ParamVector, flatten


def is_fsdp2(module: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``module`` or one of its submodules.

    (Its parameters are not always DTensors: after a forward, FSDP2 keeps the root's
    parameters unsharded, registered as plain tensors, until a backward or a reshard.)
    """
    return any(is_fsdp2_module(m) for m in module.modules())


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters sharded by FSDP2 or FSDP (v1)."""
    return is_fsdp2(module) or is_fsdp1(module)


def check_dtensors(params: Sequence[Tensor], names: Sequence[str]) -> Any:
    """The common 1-D mesh of ``params``, each a DTensor sharded on dim 0 over all ranks.

    Raises:
        ValueError: for a plain tensor, another placement (tensor parallelism), a mesh with
            several dimensions or not spanning the world, or parameters on different meshes.
    """
    Shard = fsdp2_api()[2]
    mesh = None
    for p, name in zip(params, names, strict=True):
        if not is_dtensor(p):
            raise ValueError(
                f"parameter {name!r} is not sharded (a {type(p).__name__}); the sharded Hessian "
                "needs every trainable parameter under `fully_shard` (FSDP2) or in an FSDP unit."
            )
        if tuple(p.placements) != (Shard(0),) or p.device_mesh.ndim != 1:
            raise ValueError(
                f"parameter {name!r} has placements {tuple(p.placements)} on a "
                f"{p.device_mesh.ndim}-D mesh; only FSDP2's Shard(0) on a 1-D data-parallel mesh "
                "is supported (not tensor parallelism or HSDP)."
            )
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"parameter {name!r} lives on another device mesh than the others.")
    world = torch.distributed.get_world_size() if is_distributed() else 1
    if mesh is not None and mesh.size() != world:
        raise ValueError(
            f"the parameters are sharded over {mesh.size()} of the {world} ranks; the sharded "
            "Hessian needs a data-parallel mesh spanning every rank."
        )
    return mesh


def dtensor_pieces(params: Sequence[Tensor], names: Sequence[str]) -> list[Piece]:
    """``(start, count, world)`` of this rank's rows of each FSDP2 parameter, in entries of the
    flattened parameter (one all-reduce of the row counts: every rank calls it together)."""
    mesh = check_dtensors(params, names)
    world, me = mesh.size(), mesh.get_local_rank()
    rows = torch.zeros(world, len(params), dtype=torch.float64)
    for i, p in enumerate(params):
        rows[me, i] = p.to_local().shape[0] if p.dim() > 0 else 0
    all_reduce_sum_(rows)
    return [
        (int(rows[:me, i].sum()) * math.prod(p.shape[1:]), p.to_local().numel(), world)
        for i, p in enumerate(params)
    ]


class ShardLayout:
    """Where this rank's parts of ``params`` sit in the whole flat vector.

    Args:
        params: the parameters: FSDP2 DTensors (``Shard(0)`` on one 1-D mesh spanning every
            rank), or FSDP (v1)'s original parameters (flat views of this rank's pieces).
        names: their names (for error messages).
        pieces: ``(start, count, world)`` of each parameter (see :func:`.fsdp1.shard_pieces`);
            default: read from the DTensors, with one all-reduce of the row counts (every rank
            must then build it together).
        shapes: the whole parameters' shapes (default: ``params``' own, right for DTensors).

    It reads and writes this rank's part like :class:`~.vectors.ParamVector` reads and writes
    whole vectors (:meth:`get`, :meth:`set_`, :meth:`moved_to`).

    Attributes:
        dim: numel of the whole vector; local_dim: of this rank's part.
        dtype, device: of the local parts.
        ranges: ``(start, length)`` of this rank's part of each parameter in the whole vector.
        starts: the first entry of this rank's part within each flattened parameter.
        shapes: the whole parameters' shapes.
        world: the number of ranks the parameters are sharded over (FSDP divides the summed
            gradient by it).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        names: Sequence[str] | None = None,
        pieces: Sequence[Piece] | None = None,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.params = list(params)
        names = list(names) if names is not None else [f"params[{i}]" for i in range(len(params))]
        if pieces is None:
            pieces = dtensor_pieces(self.params, names)
        self.shapes = [tuple(s) for s in (shapes or [p.shape for p in self.params])]
        self.world = max(w for _, _, w in pieces)
        first = local_part(self.params[0])
        self.dtype, self.device = first.dtype, first.device
        self.starts = [start for start, _, _ in pieces]
        self.ranges: list[tuple[int, int]] = []
        offset = 0
        for (start, count, _), shape in zip(pieces, self.shapes, strict=True):
            self.ranges.append((offset + start, count))
            offset += math.prod(shape)
        self.dim = offset
        self.local_dim = sum(n for _, n in self.ranges)

    def restrict(self, full: Tensor, axis: int = -1) -> Tensor:
        """This rank's part of whole vectors laid along ``axis`` of ``full``."""
        return torch.cat([full.narrow(axis, s, n) for s, n in self.ranges], dim=axis)

    def assemble(self, local: Tensor) -> Tensor:
        """The whole flat vector from every rank's part (one all-reduce of ``dim`` entries)."""
        full = local.new_zeros(self.dim)
        pos = 0
        for s, n in self.ranges:
            full[s : s + n] = local[pos : pos + n]
            pos += n
        return all_reduce_sum_(full)

    def get(self) -> Tensor:
        """This rank's part of the parameters, flat (a copy)."""
        return flatten([local_part(p) for p in self.params])

    @torch.no_grad()
    def set_(self, flat: Tensor) -> None:
        """Write this rank's part of the parameters (in place in FSDP's sharded storage, which
        the next forward all-gathers)."""
        pos = 0
        for p in self.params:
            local = local_part(p)
            n = local.numel()
            local.copy_(flat[pos : pos + n])
            pos += n

    @contextlib.contextmanager
    def moved_to(self, flat: Tensor) -> Iterator[None]:
        """Temporarily set this rank's part to ``flat``; restore the saved copy afterwards."""
        saved = self.get()
        try:
            self.set_(flat)
            yield
        finally:
            self.set_(saved)


class ShardedSpace(Space):
    """Vectors split into this rank's shards (see :class:`ShardLayout`); inner products and
    norms are all-reduced sums of local ones, the same on every rank. Random vectors are drawn
    whole on CPU from the same generator as on one process, then sliced: exactly the unsharded
    draw's shards, at the price of P random numbers (8 P bytes of CPU memory, transiently) per
    vector on every rank.

    Args:
        layout: where this rank's part sits in the whole vector.
        dtype, device: of the local parts.
    """

    draw_device = torch.device("cpu")

    def __init__(self, layout: ShardLayout, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(layout.dim, dtype, device)
        self.layout = layout
        self.local_dim = layout.local_dim

    def reduce(self, partial: Tensor) -> Tensor:
        return all_reduce_sum_(partial.clone())

    def norm(self, x: Tensor, dim: int = -1) -> Tensor:
        return self.reduce(x.norm(dim=dim) ** 2).sqrt()

    def all_finite(self, x: Tensor) -> bool:
        bad = torch.tensor([0.0 if bool(torch.isfinite(x).all()) else 1.0], dtype=torch.float64)
        return float(self.reduce(bad)) == 0.0

    def restrict(self, full: Tensor, axis: int = -1) -> Tensor:
        return self.layout.restrict(full, axis)

    def orthonormalize(self, Y: Tensor) -> Tensor:
        """Orthonormal columns spanning those of ``Y`` from eigen-decomposed Gram matrices
        (CholeskyQR2's idea: one all-reduce of a k × k matrix per pass, two passes); columns
        whose singular value is below ~1e-6 (float64) or ~1e-4 (float32) of the largest are
        dropped, so a rank-deficient ``Y`` gives fewer columns than Householder QR would."""
        eps = torch.finfo(Y.dtype).eps
        floor = max((1e3 * eps) ** 2, 1e3 * torch.finfo(torch.float64).eps)
        Q = Y.double()
        for _ in range(2):
            evals, evecs = torch.linalg.eigh(self.reduce(Q.T @ Q))
            keep = evals > floor * evals.max().clamp(min=torch.finfo(torch.float64).tiny)
            Q = Q @ (evecs[:, keep] / evals[keep].sqrt())
        return Q.to(Y.dtype)


def shard_layout(module: nn.Module, params: Iterable[Tensor] | None = None) -> ShardLayout:
    """The :class:`ShardLayout` of ``params`` (default: every trainable parameter) of a sharded
    module (FSDP2, or FSDP (v1): its wrapper or a module holding its units), every FSDP module
    resharded first (a collective for FSDP2: every rank calls it).

    Raises:
        ValueError: if ``params`` is empty, or a parameter is not sharded over every rank
            (see :func:`dtensor_pieces` and :func:`.fsdp1.shard_pieces`).
    """
    reshard_all(module)  # parameters left unsharded by a forward are plain (or whole) tensors
    named = {id(p): n for n, p in module.named_parameters()}
    chosen = [p for p in module.parameters() if p.requires_grad] if params is None else params
    chosen = list(chosen)
    if not chosen:
        raise ValueError("`params` holds no trainable tensor.")
    names = [named.get(id(p), "?") for p in chosen]
    if not is_fsdp1(module):
        return ShardLayout(chosen, names)
    found = shard_pieces(module)
    for p, name in zip(chosen, names, strict=True):
        if id(p) not in found:
            raise ValueError(f"parameter {name!r} is not sharded (in no FSDP unit); the sharded "
                             "Hessian needs every trainable parameter in an FSDP unit.")  # fmt: skip
    pieces, shapes = zip(*(found[id(p)] for p in chosen), strict=True)
    return ShardLayout(chosen, names, pieces, shapes)


def flat_parameters(module: nn.Module) -> ParamVector | ShardLayout:
    """The trainable parameters of ``module`` as one flat vector: a :class:`~.vectors.ParamVector`
    of whole tensors, or for a sharded module (FSDP2, FSDP (v1)) the :class:`ShardLayout` of this
    rank's parts (a collective: every rank calls it)."""
    if is_sharded(module):
        return shard_layout(module)
    return ParamVector([p for p in module.parameters() if p.requires_grad])
