"""Filter-normalized random directions in weight space (Li, Xu, Taylor, Studer, Goldstein 2018).

A random Gaussian direction d is rescaled filter by filter so that each filter of d has the norm
of the matching filter of the weights θ,

    d_ij ← d_ij · ‖θ_ij‖ / ‖d_ij‖      (filter j of layer i),

which makes loss slices comparable across layers, networks and scale-invariant
reparametrizations ("Visualizing the loss landscape of neural nets", section 4). A filter is one
slice along the first dimension of a weight tensor: an output unit of a linear layer (a row of its
``(out, in)`` weight), an output channel of a convolution, but an *input* channel of a transposed
convolution (its weight is ``(in, out / groups, ...)``), as in the authors' code. Biases (any
tensor with at most one dimension) and the parameters of normalization layers (BatchNorm,
LayerNorm, GroupNorm, ...) get a zero direction, as in the authors' code (``ignore='biasbn'``):
moving them along random directions gives misleading pictures.

The random numbers come from a CPU generator seeded with ``seed`` in float64, so every rank and
every device draws the same directions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_landscape._core.checks import check_positive_int
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.vectors import flatten

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def normalization_parameters(module: nn.Module) -> set[int]:
    """The ``id`` of every parameter owned by a normalization layer of ``module`` (BatchNorm,
    InstanceNorm, LayerNorm, GroupNorm, RMSNorm)."""
    return {
        id(p)
        for m in module.modules()
        if isinstance(m, _NORM_TYPES)
        for p in m.parameters(recurse=False)
    }


def filter_normalize(
    direction: Sequence[Tensor],
    params: Sequence[Tensor],
    zero: Sequence[bool] | None = None,
    *,
    eps: float = 1e-12,
) -> list[Tensor]:
    """Rescale each filter of ``direction`` to the norm of the matching filter of ``params``.

    Args:
        direction: tensors shaped like ``params`` (not modified).
        params: the weights θ.
        zero: per tensor, ``True`` to give it a zero direction (normalization layers); tensors
            with at most one dimension (biases) are always zero.
        eps: guards the division for an all-zero direction filter.

    Returns:
        The normalized direction, one tensor per parameter, in float64 on the parameters' device.

    Raises:
        ValueError: if the lengths or shapes do not match.
    """
    if len(direction) != len(params) or (zero is not None and len(zero) != len(params)):
        raise ValueError(
            f"`direction`, `params` and `zero` must have the same length, got {len(direction)}, "
            f"{len(params)} and {None if zero is None else len(zero)}."
        )
    out = []
    for i, (d, p) in enumerate(zip(direction, params, strict=True)):
        if d.shape != p.shape:
            raise ValueError(
                f"`direction[{i}]` has shape {tuple(d.shape)}, expected {tuple(p.shape)}."
            )
        d64 = d.detach().to(device=p.device, dtype=torch.float64)
        if p.dim() <= 1 or (zero is not None and zero[i]):
            out.append(torch.zeros_like(d64))
            continue
        w = p.detach().to(torch.float64).reshape(p.shape[0], -1)
        rows = d64.reshape(p.shape[0], -1)
        scale = w.norm(dim=1) / rows.norm(dim=1).clamp(min=eps)
        out.append((rows * scale[:, None]).reshape(p.shape))
    return out


def filter_normalized_directions(
    params: Sequence[Tensor],
    *,
    num: int = 2,
    seed: int = 0,
    zero: Sequence[bool] | None = None,
) -> Tensor:
    """``num`` filter-normalized Gaussian directions around ``params``, as flat vectors.

    Args:
        params: the weights θ (e.g. a module's trainable parameters).
        num: number of directions.
        seed: seed of the CPU generator (identical directions on every rank and device).
        zero: per tensor, ``True`` for a zero direction (see :func:`normalization_parameters`).

    Returns:
        A ``(num, dim)`` tensor in the parameters' dtype and on their device.

    Raises:
        TypeError, ValueError: on an invalid ``num`` or mismatched ``zero``.

    Example::

        zero = [id(p) in normalization_parameters(model) for p in model.parameters()]
        d1, d2 = filter_normalized_directions(list(model.parameters()), num=2, zero=zero)
    """
    check_positive_int("num", num)
    params = list(params)
    if not params:
        raise ValueError("`params` is empty.")
    gen = make_generator(seed)
    rows = []
    for _ in range(num):
        raw = [gaussian(tuple(p.shape), gen, torch.float64, "cpu") for p in params]
        rows.append(flatten(filter_normalize(raw, params, zero)))
    return torch.stack(rows).to(dtype=params[0].dtype)
