"""FSDP2 mechanics of the sharded operator: where each rank's shards sit in the whole flat vector,
reading and writing them, and the one gradient that has to go through ``.backward()``.

``fully_shard`` (FSDP2) replaces each parameter of a module by a ``DTensor`` sharded on dim 0
(``Shard(0)``) over a 1-D device mesh: rank r holds rows [o_r, o_r + n_r) of every parameter, with
n_r = ceil(rows / world) for the first ranks and fewer (possibly none) for the last ones, so
uneven sizes are fine. Flattened parameter by parameter in the module's order, the whole vector
is the one a single process would use, and each rank's part is one contiguous range of every
parameter's block (:class:`ShardLayout`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape._core.vectors import flatten


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def has_sharded_parameters(module: nn.Module) -> bool:
    """Whether any trainable parameter of ``module`` is a DTensor (FSDP2 or tensor parallel)."""
    return any(is_dtensor(p) for p in module.parameters() if p.requires_grad)


def _check_sharded(params: Sequence[Tensor], names: Sequence[str]) -> Any:
    """The common 1-D mesh of ``params``, each a DTensor sharded on dim 0 over all ranks.

    Raises:
        ValueError: for a plain tensor, another placement (tensor parallelism), a mesh with
            several dimensions or not spanning the world, or parameters on different meshes.
    """
    from torch.distributed.tensor import Shard

    mesh = None
    for p, name in zip(params, names, strict=True):
        if not is_dtensor(p):
            raise ValueError(
                f"parameter {name!r} is not sharded (a {type(p).__name__}); the sharded Hessian "
                "needs every trainable parameter under `fully_shard` (FSDP2)."
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


class ShardLayout:
    """Where this rank's shards of ``params`` sit in the whole flat vector.

    Built with one all-reduce of the row counts (every rank must build it together).

    Args:
        params: DTensor parameters, ``Shard(0)`` on one 1-D mesh spanning every rank.
        names: their names (for error messages).

    Attributes:
        dim: numel of the whole vector; local_dim: of this rank's part.
        ranges: ``(start, length)`` of this rank's part of each parameter in the whole vector.
        world: the mesh size (FSDP2 divides the summed gradient by it).
    """

    def __init__(self, params: Sequence[Tensor], names: Sequence[str] | None = None) -> None:
        self.params = list(params)
        names = list(names) if names is not None else [f"params[{i}]" for i in range(len(params))]
        mesh = _check_sharded(self.params, names)
        self.world = mesh.size()
        me = mesh.get_local_rank()
        rows = torch.zeros(self.world, len(self.params), dtype=torch.float64)
        for i, p in enumerate(self.params):
            rows[me, i] = p.to_local().shape[0] if p.dim() > 0 else 0
        all_reduce_sum_(rows)
        self.ranges: list[tuple[int, int]] = []
        offset = 0
        for i, p in enumerate(self.params):
            row = math.prod(p.shape[1:])  # numel of one row of the whole parameter
            before = int(rows[:me, i].sum())
            self.ranges.append((offset + before * row, p.to_local().numel()))
            offset += p.numel()
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
        return flatten([p.detach().to_local() for p in self.params]).clone()

    @torch.no_grad()
    def set_(self, flat: Tensor) -> None:
        """Write this rank's part of the parameters (in place in FSDP's sharded storage, which
        the next forward all-gathers)."""
        pos = 0
        for p in self.params:
            local = p.to_local()
            n = local.numel()
            local.copy_(flat[pos : pos + n].view_as(local))
            pos += n


def fsdp_gradient(
    module: nn.Module,
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batches: Sequence[Any],
    weights: Sequence[float],
    passes: int,
) -> Tensor:
    """This rank's shard of Σ_ranks Σ_b w_b ∇L_b / world, through FSDP's own backward.

    **Why ``.backward()``** (the only one in the package; everything else uses
    ``torch.autograd.grad``): FSDP2 all-gathers the shards into temporary unsharded parameters in
    its pre-forward hooks, so the autograd graph of a loss reaches those, not the sharded
    parameters (``torch.autograd.grad`` w.r.t. them raises "appears to not have been used in the
    graph"), and the unsharded tensors are freed again after the forward. The gradient reaches
    the shards only through FSDP's backward hooks, which re-gather the parameters, reduce-scatter
    the unsharded gradients (dividing by the world size) and accumulate into the sharded
    ``.grad``, and they run only inside ``backward()``. So this function: saves every
    parameter's ``.grad`` object of ``module`` and sets it to None, runs ``passes`` forwards and
    backwards, copies the sharded ``.grad`` out, and puts the saved ``.grad`` objects back (the
    training's gradients are never read or written). Every rank must make the same number of
    passes (each one is a chain of collectives): a rank with fewer batches pads with its first
    batch at weight 0. FSDP reshards after each backward, as in training.

    Args:
        module: the module whose parameters FSDP manages (all its ``.grad`` are saved).
        loss_fn: ``loss_fn(batch) -> scalar`` through the FSDP-wrapped forward.
        params: the sharded parameters to read the gradient of.
        batches: this rank's batches; ``weights``: the weight of each.
        passes: the number of forward/backward passes (the largest batch count of any rank).
    """
    every = list(module.parameters())
    saved = [p.grad for p in every]
    try:
        for p in every:
            p.grad = None
        with torch.enable_grad():
            for i in range(passes):
                real = i < len(batches)
                batch = batches[i] if real else batches[0]
                (loss_fn(batch) * (weights[i] if real else 0.0)).backward()
        return flatten(
            [
                torch.zeros_like(p.detach().to_local()) if p.grad is None else p.grad.to_local()
                for p in params
            ]
        )
    finally:
        for p, g in zip(every, saved, strict=True):
            p.grad = g
