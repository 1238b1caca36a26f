"""Losses and gradients over fixed batches at chosen weights, reduced across ranks.

Every function here averages as Σ_b n_b f_b / Σ_b n_b over this rank's batches and then over all
ranks (sums and counts are all-reduced, never means), so a multi-rank answer equals the
single-process answer on the union of the shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_landscape.curvature._utils import default_batch_size, flatten, unflatten
from lightning_landscape.curvature.distributed import all_reduce_sum_
from lightning_landscape.curvature.hvp import mean_gradient as mean_gradient  # re-exported


class ParamVector:
    """A list of parameter tensors seen as one flat vector, with bit-exact save and restore.

    Args:
        params: the tensors (e.g. a module's trainable parameters).

    Example::

        pv = ParamVector(list(model.parameters()))
        with pv.moved_to(pv.get() + delta):
            loss = ...
        # parameters are bit for bit what they were (restored from a saved copy)
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def get(self) -> Tensor:
        """A flat copy of the current values."""
        return flatten([p.detach() for p in self.params]).clone()

    @torch.no_grad()
    def set_(self, flat: Tensor) -> None:
        """Write a flat vector into the parameters."""
        for p, v in zip(self.params, unflatten(flat.to(self.dtype), self.params), strict=True):
            p.copy_(v)

    @contextlib.contextmanager
    def moved_to(self, flat: Tensor) -> Iterator[None]:
        """Temporarily set the parameters to ``flat``; restore the saved copy afterwards."""
        saved = [p.detach().clone() for p in self.params]
        try:
            self.set_(flat)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)


def _sizes(batches: Sequence[Any], batch_size_fn: Callable[[Any], int] | None) -> list[int]:
    size_fn = batch_size_fn or default_batch_size
    return [int(size_fn(b)) for b in batches]


@torch.no_grad()
def mean_value(
    fn: Callable[[Any], Tensor],
    batches: Sequence[Any],
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
    distributed: bool = True,
) -> float:
    """Σ_b n_b fn(b) / Σ_b n_b over all ranks' batches (a loss or a metric such as accuracy)."""
    sizes = _sizes(batches, batch_size_fn)
    acc = torch.zeros(2, dtype=torch.float64)
    for n, batch in zip(sizes, batches, strict=True):
        acc[0] += n * float(fn(batch))
        acc[1] += n
    all_reduce_sum_(acc, distributed)
    return float(acc[0] / acc[1])
