"""The objectives of the sharpness measures: the loss at flat weights ``w`` as ``value(w)`` and
``value_and_grad(w)``, counting the forward and backward passes spent (pure torch).

:class:`FunctionObjective` wraps a function of a flat tensor, :class:`BatchObjective` the mean
loss of fixed batches at moved parameters, reduced across ranks. Import them from
:mod:`lightning_landscape.landscape.sharpness`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.batches import mean_gradient, mean_value
from lightning_landscape._core.vectors import ParamVector


class FunctionObjective:
    """The loss as a function ``f(w) -> scalar tensor`` of a flat weight vector.

    Attributes:
        num_forward, num_backward: evaluations of ``f`` and of its gradient so far.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.num_forward = 0
        self.num_backward = 0

    @torch.no_grad()
    def value(self, w: Tensor) -> float:
        self.num_forward += 1
        return float(self.fn(w.detach()))

    def value_and_grad(self, w: Tensor) -> tuple[float, Tensor]:
        self.num_forward += 1
        self.num_backward += 1
        x = w.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.fn(x)
            (grad,) = torch.autograd.grad(out, x)
        return float(out.detach()), grad


class BatchObjective:
    """The batch-size-weighted mean loss of fixed batches at moved parameters, over all ranks.

    Args:
        loss_fn: ``loss_fn(batch) -> scalar`` mean loss of one batch.
        params: the parameters that ``w`` sets (a :class:`ParamVector`).
        batches: this rank's batches.
        distributed: reduce across ranks when a process group is up.

    Attributes:
        num_forward, num_backward: forward and backward passes over single batches so far.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any], Tensor],
        params: ParamVector,
        batches: Sequence[Any],
        *,
        distributed: bool = True,
    ) -> None:
        self.loss_fn = loss_fn
        self.params = params
        self.batches = list(batches)
        self.distributed = distributed
        self.num_forward = 0
        self.num_backward = 0

    def value(self, w: Tensor) -> float:
        self.num_forward += len(self.batches)
        with self.params.moved_to(w):
            return mean_value(self.loss_fn, self.batches, distributed=self.distributed)

    def value_and_grad(self, w: Tensor) -> tuple[float, Tensor]:
        self.num_forward += len(self.batches)
        self.num_backward += len(self.batches)
        with self.params.moved_to(w):
            return mean_gradient(
                self.loss_fn, self.params.params, self.batches, distributed=self.distributed
            )


Objective = FunctionObjective | BatchObjective
