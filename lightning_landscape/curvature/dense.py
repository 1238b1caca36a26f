"""The exact Hessian as a dense matrix: the oracle for tests, and for users of small models."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.batches import batch_sizes, flat_grad
from lightning_landscape._core.checks import check_batches
from lightning_landscape._core.vectors import resolve_params
from lightning_landscape.curvature.differentiable import checked_gradient
from lightning_landscape.curvature.hvp import guard


def dense_hessian(
    loss_fn: Callable[[Any], Tensor],
    params: nn.Module | Iterable[Tensor],
    batches: Sequence[Any],
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
    seed: int = 0,
) -> Tensor:
    """The exact Hessian H = Σ_b n_b H_b / Σ_b n_b, one row per coordinate (d backward passes of
    the gradient per batch). Single process: it does not reduce across ranks.

    Args:
        loss_fn: ``loss_fn(batch) -> scalar`` (mean over the batch).
        params: tensors or a module (its trainable parameters).
        batches: the batches.
        batch_size_fn: size of a batch; default the leading size of its first tensor.
        seed: RNG seed for the forward (dropout), as in :class:`HessianOperator`.

    Returns:
        A ``(d, d)`` tensor in the parameters' dtype.

    Raises:
        TypeError: if ``params`` is not a module or a sequence of tensors.
        ValueError: if ``params`` or ``batches`` is empty (a NaN matrix before), or ``params``
            holds a tensor that does not require grad.
        RuntimeError: if the gradient cannot be differentiated again
            (:func:`~lightning_landscape.curvature.differentiable.checked_gradient`).
    """
    module = params if isinstance(params, nn.Module) else None
    plist = resolve_params(params)
    batches = check_batches(batches if isinstance(batches, Sequence | Tensor) else list(batches))
    d = sum(p.numel() for p in plist)
    H = torch.zeros(d, d, dtype=plist[0].dtype, device=plist[0].device)
    total = 0
    with guard(module, plist, seed):
        for batch, n in zip(batches, batch_sizes(batches, batch_size_fn), strict=True):
            g = checked_gradient(loss_fn(batch), plist)  # else rows through it would be lost
            for i in range(d):
                if g[i].requires_grad:
                    H[i].add_(flat_grad(g[i], plist, retain_graph=True), alpha=n)
            total += n
    return H.div_(total)
