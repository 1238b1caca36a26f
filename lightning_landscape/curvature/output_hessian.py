"""The Hessian of a loss with respect to the model output, ∇²_f ℓ, applied to blocks of vectors.

This is the middle factor of the generalized Gauss-Newton matrix G = Jᵀ ∇²_f ℓ J (see
:mod:`.ggn`). It lives in output space (batch size × classes), so even its fallback is cheap.

- ``"cross_entropy"``: ``F.cross_entropy(output, target)`` with the class on dimension 1, target
  class indices (``-100`` ignored, as PyTorch does) or class probabilities of the output's
  shape. Per counted position i, ∇²ℓ_i = s_i (diag(p_i) − p_i p_iᵀ) with p_i = softmax of the
  logits and s_i = 1 for an index target (Σ_c t_c for probabilities); the mean divides by the
  number N of counted positions: H_out = blockdiag(s_i (diag(p_i) − p_i p_iᵀ)) / N.
- ``"mse"``: ``F.mse_loss(output, target)`` (mean over all M elements): H_out = (2/M) I.
- a callable ``loss(output, target) -> scalar``: the product by double backward through the loss
  alone (torch.autograd on an output-sized tensor: a few times the loss's own cost).

Class weights, label smoothing or sum reductions are not closed forms here: pass the loss as a
callable (e.g. ``functools.partial(F.cross_entropy, label_smoothing=0.1)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_landscape.curvature.differentiable import (
    check_twice_differentiable,
    outside_autograd_refused,
)

LossKind = Literal["cross_entropy", "mse"]
OutputLoss = Callable[[Tensor, Tensor], Tensor]
LOSS_KINDS = ("cross_entropy", "mse")


def check_loss(loss: LossKind | OutputLoss, *, name: str = "loss") -> None:
    """Raise unless ``loss`` names a closed form or is callable; the message calls it ``name``
    (a caller's own argument, e.g. ``ggn_loss``).

    Raises:
        ValueError: for an unknown string.
        TypeError: for anything else that is not callable.
    """
    if isinstance(loss, str):
        if loss not in LOSS_KINDS:
            raise ValueError(
                f"`{name}` must be 'cross_entropy', 'mse' or a callable (output, target) -> "
                f"scalar, got {loss!r}."
            )
    elif not callable(loss):
        raise TypeError(
            f"`{name}` must be 'cross_entropy', 'mse' or a callable, got {type(loss).__name__}."
        )


def loss_value(loss: LossKind | OutputLoss, output: Tensor, target: Tensor) -> Tensor:
    """The scalar loss the output Hessian belongs to (the same mean-reduced loss)."""
    if loss == "cross_entropy":
        return F.cross_entropy(output, target)
    if loss == "mse":
        _check_mse(output, target)
        return F.mse_loss(output, target)
    return loss(output, target)


def _check_mse(output: Tensor, target: Tensor) -> None:
    if target.shape != output.shape:  # torch 2.1 raises a dtype error from the loss first
        raise ValueError(
            f"the MSE target must have the output's shape {tuple(output.shape)}, got "
            f"{tuple(target.shape)}."
        )


def output_hessian(
    loss: LossKind | OutputLoss, output: Tensor, target: Tensor
) -> Callable[[Tensor], Tensor]:
    """``apply(W) -> H_out W`` for a block ``W`` of shape ``(k, *output.shape)``.

    The closed forms read only ``output.detach()``; the callable fallback keeps the graph of the
    loss's gradient with respect to a detached copy of the output (no parameter is reached).

    Raises:
        ValueError: for a cross-entropy output with fewer than 2 dimensions, or an MSE target
            whose shape differs from the output's.
    """
    out = output.detach()
    if loss == "cross_entropy":
        return _cross_entropy(out, target)
    if loss == "mse":
        _check_mse(out, target)
        scale = 2.0 / out.numel()
        return lambda W: W * scale
    return _autograd(loss, out, target)


def _cross_entropy(logits: Tensor, target: Tensor) -> Callable[[Tensor], Tensor]:
    if logits.dim() < 2:
        raise ValueError(
            "the cross-entropy output must be (batch, classes, ...), got shape "
            f"{tuple(logits.shape)}."
        )
    p = logits.softmax(dim=1)
    if target.is_floating_point():  # class probabilities
        weight = target.detach().to(p.dtype).sum(dim=1, keepdim=True)
        count = float(logits.numel() // logits.shape[1])
    else:  # class indices; PyTorch's default ignore_index is -100
        weight = (target != -100).to(p.dtype).unsqueeze(1)
        count = weight.sum()

    def apply(W: Tensor) -> Tensor:
        c = 1 + W.dim() - logits.dim()  # the class dimension of the block
        return p * (W - (p * W).sum(dim=c, keepdim=True)) * weight / count

    return apply


def _autograd(loss: OutputLoss, out: Tensor, target: Tensor) -> Callable[[Tensor], Tensor]:
    o = out.clone().requires_grad_(True)
    with torch.enable_grad():
        value = loss(o, target)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("`loss(output, target)` must return a scalar tensor.")
        with outside_autograd_refused(value):  # a fused loss's H_out would read as 0
            (g,) = torch.autograd.grad(value.reshape(()), o, create_graph=True, allow_unused=True)
        if g is not None:
            check_twice_differentiable(g)

    def apply(W: Tensor) -> Tensor:
        if g is None or not g.requires_grad:  # linear (or constant) in the output: H_out = 0
            return torch.zeros_like(W)
        k = W.shape[0]
        if k == 1:
            (hw,) = torch.autograd.grad(g, o, W[0], retain_graph=True, allow_unused=True)
            return torch.zeros_like(W) if hw is None else hw[None]
        (hw,) = torch.autograd.grad(
            g, o, W, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        return torch.zeros_like(W) if hw is None else hw

    return apply
