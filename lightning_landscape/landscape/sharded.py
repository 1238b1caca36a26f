"""The loss of an FSDP2-sharded module at moved weights, for the landscape measures.

:class:`ShardedBatchObjective` is :class:`~lightning_landscape.landscape.sharpness.BatchObjective`
for a module under ``fully_shard``: each rank writes its shards of the weights in place, runs the
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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.checks import check_positive_int
from lightning_landscape._core.fsdp import FSDPBatches, reshard_all
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.sharding import ShardLayout
from lightning_landscape._core.vectors import flatten
from lightning_landscape.landscape.directions import filter_normalize


class ShardedBatchObjective:
    """The batch-size-weighted mean loss of fixed batches of an FSDP2 module at moved weights,
    over all ranks; weights and gradients are whole flat vectors.

    Every rank must make the same calls in the same order (each one is a chain of collectives).

    Args:
        loss_fn: ``loss_fn(batch) -> scalar`` mean loss of one batch, through the sharded forward.
        module: the module ``fully_shard`` was applied to; its trainable parameters are the
            weights (DTensors ``Shard(0)`` on a 1-D mesh of every rank).
        batches: this rank's batches.
        batch_size_fn: ``batch_size_fn(batch) -> int``; default the leading size.

    Attributes:
        num_forward, num_backward: forward and backward passes over this rank's batches so far.
        num_hvp: always 0 (no Hessian-vector products: sharded worst cases use gradients).

    Raises:
        ValueError: if a parameter is not an FSDP2 shard or a batch size is not positive.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any], Tensor],
        module: nn.Module,
        batches: Sequence[Any],
        *,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        reshard_all(module)  # parameters left unsharded by a forward are plain tensors
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.layout = ShardLayout([p for _, p in named], [n for n, _ in named])
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
) -> Tensor:
    """This rank's shards of :func:`~lightning_landscape.landscape.directions.filter_normalized_directions`
    (Li et al. 2018) around the sharded weights ``theta``.

    Each parameter's direction is drawn whole from the same generator stream as on one process
    and cut to this rank's rows; ``Shard(0)`` keeps whole filters (rows of a linear weight,
    output channels of a convolution) on one rank, so the filter norms are local.

    Returns:
        A ``(num, local_dim)`` tensor in ``theta``'s dtype.
    """
    check_positive_int("num", num)
    gen = make_generator(seed)
    weights = [
        w.reshape(p.to_local().shape)
        for w, p in zip(
            torch.split(theta, [n for _, n in layout.ranges]), layout.params, strict=True
        )
    ]
    rows = []
    for _ in range(num):
        raw = [
            gaussian(tuple(p.shape), gen, torch.float64, "cpu").narrow(0, first, count)
            for p, (first, count) in zip(layout.params, layout.rows, strict=True)
        ]
        rows.append(flatten(filter_normalize(raw, weights, zero)))
    return torch.stack(rows).to(dtype=theta.dtype)
