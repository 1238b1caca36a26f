"""Convolutions and eval-mode BatchNorm whose double backwards take fewer, standard kernels.

A Hessian-vector product through a kept gradient graph (``hvp="cached"``, ``"double_backward"``)
differentiates each convolution's backward once more. PyTorch's own double backward of a
convolution (``_convolution_double_backward``) computes the weight terms as convolutions with
the batch and channel dimensions swapped, whose kernels are as large as the feature maps, and
the input terms as transposed convolutions: at the H200 shapes of a CIFAR ResNet-18, 19 of its
78 convolution calls have 4x4 to 32x32 kernels, and on CPU they run at 0.58x the FLOP rate of
the 3x3 ones (``benchmarks/product_profile.py``). The same second-order terms are the three
first-order operations of a convolution, which every backend tunes for training: with gradient
g = ∂L/∂y of y = conv(x, w), the backward is (dgrad(g; w), wgrad(x; g)), and its derivative
along (u, W) (the directions of those two outputs) is

- towards g: conv(u, w) + conv(x, W);
- towards w: wgrad(u; g);
- towards x: dgrad(g; W).

:func:`standard_convolutions` routes the ``nn.Conv1d/2d/3d`` modules of a model through an
``autograd.Function`` that does exactly this, for the time of the products, and puts the modules
back after. Exact (the same sums, in another order: 2e-16 relative in float64). Measured on CPU
for a cached product on ResNet-18, interleaved runs in one process, per product over a gradient:
8 images 2.60x before, 2.33x after (float32), 2.72x and 2.09x (float64); 32 images 2.54x and
2.21x. GPU: not measured yet. Forward-mode AD (``hvp="func"``) does not go through it (the
Function has no ``jvp``): only the graph kinds use it. Modules with ``padding_mode`` other than
zeros or string padding keep PyTorch's own path.

:func:`affine_batch_norms` does the same for eval-mode BatchNorm layers (running statistics):
y = x s + t with s = w / √(var + ε) and t = b − mean s, the same function, whose double backward
is a few products and sums instead of ``NativeBatchNormBackwardBackward0`` (528 of the 884
computing ops of a cached product on ResNet-18). Exact (3e-16 in float64); with both, a cached
product on ResNet-18 (8 images, CPU) is 2.20x a gradient against 2.29x with the convolutions
alone and 2.58x with neither (float32; float64 2.17x, 2.27x, 2.89x).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

_aten = torch.ops.aten


def _backward(g: Tensor, x: Tensor, w: Tensor, cfg: tuple, mask: list[bool]) -> tuple:
    stride, padding, dilation, groups = cfg
    zeros = [0] * (w.dim() - 2)
    out = _aten.convolution_backward(
        g, x, w, None, stride, padding, dilation, False, zeros, groups, mask + [False]
    )
    return out[0], out[1]


def _conv(x: Tensor, w: Tensor, cfg: tuple) -> Tensor:
    stride, padding, dilation, groups = cfg
    return _aten.convolution(
        x, w, None, stride, padding, dilation, False, [0] * (w.dim() - 2), groups
    )


class _ConvBackward(torch.autograd.Function):
    """(dgrad(g; w), wgrad(x; g)) as a function of (x, w, g), with its own backward (above)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, g: Tensor, cfg: tuple, mask: tuple) -> Any:
        ctx.save_for_backward(x, w, g)
        ctx.cfg = cfg
        return _backward(g, x, w, cfg, list(mask))

    @staticmethod
    def backward(ctx: Any, u: Tensor | None, W: Tensor | None) -> tuple:
        x, w, g = ctx.saved_tensors
        need_x, need_w, need_g = ctx.needs_input_grad[:3]
        gx = gw = gg = None
        if u is not None:
            gg = _conv(u, w, ctx.cfg) if need_g else None
            gw = _backward(g, u, w, ctx.cfg, [False, True])[1] if need_w else None
        if W is not None:
            if need_g:
                t = _conv(x, W, ctx.cfg)
                gg = t if gg is None else gg + t
            gx = _backward(g, x, W, ctx.cfg, [True, False])[0] if need_x else None
        return gx, gw, gg, None, None


class _Conv(torch.autograd.Function):
    """conv(x, w) whose backward is :class:`_ConvBackward` (so it can be differentiated)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, cfg: tuple) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.cfg = cfg
        return _conv(x, w, cfg)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple:
        x, w = ctx.saved_tensors
        mask = tuple(ctx.needs_input_grad[:2])
        gx, gw = _ConvBackward.apply(x, w, g, ctx.cfg, mask)
        return gx, gw, None


def _conv_forward(self: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    cfg = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
    y = _Conv.apply(x, weight, cfg)
    return y if bias is None else y + bias.view(1, -1, *([1] * (y.dim() - 2)))


def _routable(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and "_conv_forward" not in m.__dict__
    )


def standard_convolutions(module: nn.Module | None) -> contextlib.AbstractContextManager:
    """Route ``module``'s convolution layers through :class:`_Conv` while inside (an instance
    attribute on each, removed on exit); nothing else changes."""
    routed = [m for m in module.modules() if _routable(m)] if module is not None else []
    return _instance_methods(routed, "_conv_forward", _conv_forward)


@contextlib.contextmanager
def _instance_methods(modules: list[nn.Module], name: str, fn: Any) -> Iterator[None]:
    """``fn`` as the method ``name`` of each of ``modules`` while inside (instance attributes,
    removed on exit, so the class's method is back)."""
    try:
        for m in modules:
            setattr(m, name, types.MethodType(fn, m))
        yield
    finally:
        for m in modules:
            m.__dict__.pop(name, None)


def _affine_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    s = torch.rsqrt(self.running_var + self.eps)
    s = s if self.weight is None else self.weight * s
    t = -self.running_mean * s if self.bias is None else self.bias - self.running_mean * s
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * s.view(shape) + t.view(shape)


def affine_batch_norms(module: nn.Module | None) -> contextlib.AbstractContextManager:
    """Run ``module``'s eval-mode BatchNorm layers (with running statistics) as x s + t while
    inside (an instance ``forward`` on each, removed on exit); train-mode ones are untouched."""
    layers = [
        m
        for m in (module.modules() if module is not None else [])
        if isinstance(m, _BatchNorm) and not m.training and m.track_running_stats
        and m.running_var is not None and not is_lazy(m.running_var)
        and "forward" not in m.__dict__
    ]  # fmt: skip
    return _instance_methods(layers, "forward", _affine_forward)
