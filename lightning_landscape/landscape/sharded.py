"""The loss of a sharded module (FSDP2 or FSDP (v1)) at moved weights, for the landscape measures.

:class:`ShardedBatchObjective` is :class:`~lightning_landscape.landscape.sharpness.BatchObjective`
for a module under ``fully_shard`` or an FSDP (v1) wrapper: each rank writes its shards of the
weights in place, runs the
forward (and for gradients FSDP's own backward, see
:meth:`~lightning_landscape._core.fsdp.FSDPBatches.gradient`) on its own batches, and the
batch-weighted sums are reduced across ranks. The shards are restored bit for bit from a saved
copy after every evaluation.

The sharpness measures take and return **whole** flat vectors (the weights w, the gradients, the
perturbations): each rank holds a few vectors of P entries during a sharpness measurement (the
gradient is assembled by one all-reduce of P entries, the traffic of a DDP step), so their values
equal the single-process ones exactly, with the same random directions. The Hessian and the
trajectory keep shards only (P / world per vector): :func:`sharded_filter_directions` gives the
trajectory's random slice directions as shards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.checks import check_positive_int
from lightning_landscape._core.distributed import all_reduce_sum_
from lightning_landscape._core.fsdp import FSDPBatches
from lightning_landscape._core.random import fixed_rng, gaussian, make_generator
from lightning_landscape._core.sharding import ShardLayout, shard_layout


class ShardedBatchObjective:
    """The batch-size-weighted mean loss of fixed batches of a sharded module at moved weights,
    over all ranks; weights and gradients are whole flat vectors.

    Every rank must make the same calls in the same order (each one is a chain of collectives).

    Args:
        loss_fn: ``loss_fn(batch) -> scalar`` mean loss of one batch, through the sharded forward.
        module: the module ``fully_shard`` was applied to, or the FSDP (v1) wrapper; its
            trainable parameters are the weights (sharded over every rank, see
            :func:`~lightning_landscape._core.sharding.shard_layout`).
        batches: this rank's batches.
        batch_size_fn: ``batch_size_fn(batch) -> int``; default the leading size.
        seed: the seed of the forwards' randomness: as in
            :class:`~lightning_landscape.landscape.sharpness.BatchObjective`, every evaluation
            draws the same dropout masks for each batch (one fixed function).

    Attributes:
        num_forward, num_backward: forward and backward passes over this rank's batches so far.
        num_hvp: always 0 (no Hessian-vector products: sharded worst cases use gradients).

    Raises:
        ValueError: if a parameter is not sharded over every rank or a batch size is not positive.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any], Tensor],
        module: nn.Module,
        batches: Sequence[Any],
        *,
        batch_size_fn: Callable[[Any], int] | None = None,
        seed: int = 0,
    ) -> None:
        self.layout = shard_layout(module)
        self.seed = seed
        self.loss_fn = loss_fn
        self.passes = FSDPBatches(module, batches, self.layout.world, batch_size_fn)
        self.batches = self.passes.batches
        self.num_forward = 0
        self.num_backward = 0
        self.num_hvp = 0  # no Hessian operator here: the worst cases take the gradient ascent

    def get(self) -> Tensor:
        """The whole flat weight vector (one all-reduce of P entries)."""
        return self.layout.assemble(self.layout.get())

    def _at(self, w: Tensor, fn: Callable[[], Any]) -> Any:
        saved = self.layout.get()
        try:
            self.layout.set_(self.layout.restrict(w.detach()).to(saved.dtype))
            with fixed_rng(self.seed, self.layout.params):
                return fn()
        finally:
            self.layout.set_(saved)

    def value(self, w: Tensor) -> float:
        """The mean loss at the whole weight vector ``w``."""
        self.num_forward += len(self.batches)
        return self._at(w, lambda: self.passes.mean(self.loss_fn))

    def value_and_grad(self, w: Tensor) -> tuple[float, Tensor]:
        """The mean loss at ``w`` and its whole gradient."""
        self.num_forward += len(self.batches)
        self.num_backward += len(self.batches)
        loss, local = self._at(w, lambda: self.passes.gradient(self.loss_fn, self.layout.params))
        return loss, self.layout.assemble(local)


def sharded_filter_directions(
    layout: ShardLayout,
    theta: Tensor,
    *,
    num: int = 2,
    seed: int = 0,
    zero: Sequence[bool] | None = None,
    eps: float = 1e-12,
) -> Tensor:
    """This rank's shards of :func:`~lightning_landscape.landscape.directions.filter_normalized_directions`
    (Li et al. 2018) around the sharded weights ``theta``.

    Each parameter's direction is drawn whole from the same generator stream as on one process
    (so its filter norms are local) and cut to this rank's part. A rank's part may cut a filter
    (FSDP (v1) cuts anywhere; FSDP2 keeps whole rows): the weights' squared filter norms are
    summed over ranks, in one all-reduce of one number per filter (a collective: every rank
    calls it).

    Returns:
        A ``(num, local_dim)`` tensor in ``theta``'s dtype and on its device.
    """
    check_positive_int("num", num)
    parts = torch.split(theta.detach().cpu().double(), [n for _, n in layout.ranges])
    kept = [
        len(shape) > 1 and not (zero is not None and zero[i])
        for i, shape in enumerate(layout.shapes)
    ]
    rows, sums = [], []  # the filter index of each local entry; the weights' squared filter norms
    for w, shape, start, keep in zip(parts, layout.shapes, layout.starts, kept, strict=True):
        rows.append(torch.arange(start, start + w.numel()) // math.prod(shape[1:]))
        if keep:
            sums.append(torch.zeros(shape[0], dtype=torch.float64).index_add_(0, rows[-1], w**2))
    norms = iter(torch.split(all_reduce_sum_(torch.cat(sums)).sqrt(), [len(t) for t in sums])
                 if sums else ())  # fmt: skip
    scales = [next(norms) if keep else None for keep in kept]
    gen = make_generator(seed)
    out = []
    for _ in range(num):
        pieces = []
        for w, shape, start, row, scale in zip(
            parts, layout.shapes, layout.starts, rows, scales, strict=True
        ):
            whole = gaussian(tuple(shape), gen, torch.float64, "cpu")
            if scale is None:
                pieces.append(torch.zeros_like(w))
                continue
            ratio = scale / whole.reshape(shape[0], -1).norm(dim=1).clamp(min=eps)
            pieces.append(whole.reshape(-1)[start : start + w.numel()] * ratio[row])
        out.append(torch.cat(pieces))
    return torch.stack(out).to(dtype=theta.dtype, device=theta.device)
