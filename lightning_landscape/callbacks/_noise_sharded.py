"""NoiseTemperatureMonitor's gradient readings under FSDP2 (``ModelParallelStrategy``) and FSDP
(v1) (``FSDPStrategy``).

**FSDP (v1)** gathers each unit's parameters as views of its ``FlatParameter``, the leaf that
autograd accumulates into: tensor hooks on it see this rank's local, unsharded gradient of every
backward pass, before FSDP's reduce-scatter (and in the ``no_sync`` passes Lightning runs between
the micro-batches of gradient accumulation), exactly as DDP's hooks on the parameters do.
:class:`FlatGradientHooks` is :class:`~._noise_step.GradientHooks` on those leaves: the small
batches are each rank's micro-batches; the big batch is the sharded ``.grad``, whose squared
norm is summed over ranks.

**FSDP2** never forms a rank's local (pre-reduction) gradient as a whole: FSDP reduce-scatters
each unsharded gradient inside the backward, and tensor hooks on the sharded parameters never
fire. What can be observed is the sharded ``.grad`` after each backward pass, which already holds
the mean over the ranks. With gradient accumulation (Lightning does not block FSDP2's
reduce-scatter between micro-batches), the increment of ``.grad`` over one backward pass is the
gradient of one micro-batch taken on every rank (b · world samples, divided by
``accumulate_grad_batches`` as Lightning divides the loss): those micro-batches serve as the
small batches of McCandlish et al.'s two-batch-size estimators, their mean (the accumulated
``.grad``) as the big batch. Without accumulation there is one backward pass per step, hence no
second batch size: NoiseTemperatureMonitor logs the temperature only, with one warning.

:class:`ShardedGradientSteps` has the interface of :class:`~._noise_step.GradientHooks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape._core.fsdp import local_part
from lightning_landscape._core.vectors import flatten
from lightning_landscape.callbacks._noise_step import GradientHooks, trainable_params


class FlatGradientHooks(GradientHooks):
    """:class:`~._noise_step.GradientHooks` on FSDP (v1)'s ``FlatParameter`` s (attach them as
    one parameter group); the big batch's |.grad|² is summed over the ranks' shards (a
    collective: every rank calls :meth:`grad_norm_sq`)."""

    def grad_norm_sq(self) -> float | None:
        local = super().grad_norm_sq()
        total = torch.tensor([local or 0.0, float(local is not None)], dtype=torch.float64)
        all_reduce_sum_(total, is_distributed())
        return float(total[0]) if total[1] > 0 else None


class ShardedGradientSteps:
    """Squared norms of the per-micro-batch increments of the sharded ``.grad``.

    Memory: one copy of this rank's gradient shards (P / world) during a measured step.
    Cost: two squared norms of the shards per backward pass, and one all-reduce of 2 numbers
    per step; for the big batch one more.
    """

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.world = 1
        self.attached = False
        self.reset()

    def attach(self, param_groups: Iterable[dict[str, Any]], world: int) -> None:
        """Read the distinct parameters that require grad (nothing if there is none)."""
        self.params.extend(trainable_params(param_groups))
        self.world = int(world)
        self.attached = bool(self.params)

    def remove(self) -> None:
        self.params, self.attached = [], False
        self.reset()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(params=[], attached=False, before=None)
        return state

    # ----------------------------------------------------------------- one step
    def reset(self) -> None:
        self.recording = False
        self.before: Tensor | None = None
        self.small_sq = 0.0  # this rank's part of Σ_j |g_j|²
        self.inv_size = 0.0
        self.num_small = 0

    def _shards(self) -> Tensor:
        """This rank's shards of ``.grad``, flat, in float64 (zeros where there is none)."""
        return flatten(
            [
                local_part(p.grad if p.grad is not None else torch.zeros_like(p)).double()
                for p in self.params
            ]
        )

    def begin(self) -> None:
        """Remember ``.grad`` before the coming backward pass."""
        if self.attached:
            self.before = self._shards()
            self.recording = True

    def end(self, size: int) -> None:
        """Close the backward pass of a micro-batch of ``size`` samples on every rank."""
        if self.recording and self.before is not None:
            self.recording = False
            self.small_sq += float((self._shards() - self.before).square().sum())
            # the union's micro-batch j averages the ranks' means: 1/b_j = Σ_r 1/b_rj / W²
            self.inv_size += 1.0 / (size * self.world**2) if size > 0 else math.nan
            self.num_small += 1
            self.before = None

    def reduce(self, num_batches: int) -> list[float]:
        """``[Σ|gⱼ|², Σ 1/bⱼ, n, ranks not measured]``, the small batches being the micro-batches
        of every rank together (a collective: every rank runs it)."""
        bad = self.num_small != num_batches or not math.isfinite(self.inv_size)
        sums = torch.tensor([self.small_sq, self.inv_size, float(bad)], dtype=torch.float64)
        all_reduce_sum_(sums, is_distributed())
        return [float(sums[0]), float(sums[1]), self.num_small, float(sums[2])]

    def grad_norm_sq(self) -> float | None:
        """|.grad|² over the parameters, reduced across ranks (a collective)."""
        if not any(p.grad is not None for p in self.params):
            return None
        total = self._shards().square().sum().reshape(1)
        return float(all_reduce_sum_(total, is_distributed())[0])
