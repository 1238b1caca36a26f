"""Hessian-vector products (Pearlmutter 1994), batched over blocks of vectors.

The kinds differ by what they recompute per product. ``double_backward`` builds the gradient
graph per product (forward + backward + one more backward); ``cached`` keeps the gradient graph
of the batches and pays one backward per product; ``func`` is torch.func forward-over-reverse
``jvp(grad(f))`` (falling back to ``vjp(grad(f))`` where that raises, as on ``F.mse_loss`` in
torch 2.13). Measured on CPU, per product over a gradient, on 2.4k / 405k-parameter MLPs
(``benchmarks/curvature.py``): cached 1.3x / 2.0-2.3x, double backward 2.9x / 3.2x, func
8.6x / 4.1x. Blocks of k vectors go through ``is_grads_batched`` (vmap) in one backward instead
of k.

None of them touches ``.grad``: everything goes through ``torch.autograd.grad`` or ``torch.func``.
All run inside :func:`guard`, which routes fused attention, cuDNN RNNs and torch.compile'd code
through kernels that have a double backward (:mod:`.kernels`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.batches import flat_grad
from lightning_landscape._core.random import fixed_rng
from lightning_landscape._core.vectors import flatten, unflatten
from lightning_landscape.curvature.conv import affine_batch_norms, standard_convolutions
from lightning_landscape.curvature.kernels import twice_differentiable


def gradient_graph(
    loss_fn: Callable[[Any], Tensor], params: Sequence[Tensor], batch: Any
) -> Tensor:
    """The flat gradient of one batch's loss with its graph kept for later products."""
    with torch.enable_grad():
        return flat_grad(loss_fn(batch), params, create_graph=True)


def add_by_parameter(
    out: Tensor, parts: Sequence[Tensor | None], params: Sequence[Tensor], alpha: float
) -> Tensor:
    """``out += alpha · parts`` for a ``(k, dim)`` block and one ``(k, *shape)`` part per
    parameter (None: zero), each into its parameter's columns: the parts are never
    concatenated into a block of their own."""
    k, start = out.shape[0], 0
    for part, p in zip(parts, params, strict=True):
        if part is not None:
            out[:, start : start + p.numel()].add_(part.reshape(k, -1), alpha=alpha)
        start += p.numel()
    return out


def hvp_from_graph(
    grad: Tensor,
    params: Sequence[Tensor],
    Vt: Tensor,
    retain: bool = True,
    out: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """``(H V)ᵀ`` for a ``(k, dim)`` block from a gradient with its graph (one batched backward).
    With ``out``, ``out += alpha (H V)ᵀ`` parameter by parameter and ``out`` is returned: no
    block of products is made (a caller's accumulator holds them)."""
    k = Vt.shape[0]
    if not grad.requires_grad:  # the loss is linear in the parameters: H = 0
        return torch.zeros_like(Vt) if out is None else out
    if k == 1:
        grads = torch.autograd.grad(grad, params, Vt[0], retain_graph=retain, allow_unused=True)
    else:
        grads = torch.autograd.grad(
            grad, params, Vt, retain_graph=retain, allow_unused=True, is_grads_batched=True
        )
    if out is not None:
        return add_by_parameter(out, grads, params, alpha)
    if k == 1:
        return flatten(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
        )[None]
    return torch.cat(
        [
            (
                torch.zeros(k, p.numel(), dtype=Vt.dtype, device=Vt.device)
                if g is None
                else g.reshape(k, -1)
            )
            for g, p in zip(grads, params, strict=True)
        ],
        dim=1,
    )


COLUMNS = 8  # at most this many vectors go through one vmapped backward


def vmaps_graphs(device: torch.device, dim: int) -> bool:
    """Whether a block goes through a gradient graph as vmapped backwards: on CPU only up to
    5,000 parameters (above, one column at a time is faster: :func:`hvp_from_graph_in_blocks`;
    such a block needs no smaller pieces than a single product)."""
    return device.type != "cpu" or dim <= 5000


def hvp_from_graph_in_blocks(
    grad: Tensor,
    params: Sequence[Tensor],
    Vt: Tensor,
    retain: bool,
    step: int,
    out: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """:func:`hvp_from_graph` for blocks of ``step`` columns at a time, each added into ``out``
    (``alpha`` times; default a new block) as it comes: one block of products is held, never
    its parts as well. A block is one vmapped backward; on CPU that pays only for small models
    (per product, 0.75x against 1.29x a gradient at 2.4k parameters, 2.6x against 1.8x at 400k:
    benchmarks/curvature.py), so the operator takes the columns of larger ones one by one."""
    if out is None:
        out = torch.zeros_like(Vt)
    for lo in range(0, len(Vt), step):
        more = retain or lo + step < len(Vt)
        hvp_from_graph(grad, params, Vt[lo : lo + step], more, out[lo : lo + step], alpha)
    return out


def hvp_double_backward(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batch: Any,
    Vt: Tensor,
    module: nn.Module | None = None,
) -> Tensor:
    """``(H_b V)ᵀ`` by double backward: build the gradient graph, then one batched backward."""
    return hvp_from_graph(gradient_graph(loss_fn, params, batch), params, Vt, retain=False)


class _LossOf(nn.Module):
    """Holds the measured module so ``functional_call`` can substitute its parameters."""

    def __init__(self, module: nn.Module, loss_fn: Callable[[Any], Tensor]) -> None:
        super().__init__()
        self.m = module
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(batch)


def hvp_func(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batch: Any,
    Vt: Tensor,
    module: nn.Module | None = None,
    *,
    forward_over_reverse: bool = True,
    out: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """``(H_b V)ᵀ`` by torch.func, vmapped over the block; with ``out``, added into it
    (``alpha`` times) parameter by parameter: the block of products is never concatenated, one
    block of P numbers less a call (the vmapped products themselves are one block).

    ``forward_over_reverse=True``: ``jvp(grad(f))``. It raises "ZeroTensors are immutable" on
    ``F.mse_loss`` in torch 2.13; the caller then retries with ``False``: reverse-over-reverse
    ``vjp(grad(f))``. (``jvp(jacrev(f))`` runs on ``F.mse_loss`` but is silently wrong, by
    1-30 %, through a train-mode BatchNorm in torch 2.13, so it is not used.)
    """
    if module is None:
        raise ValueError("the 'func' product needs the module that `loss_fn` calls.")
    with batch_norm_stats_frozen(module), data_assignments_checked():
        inputs = func_inputs(loss_fn, params, batch, module)
        if out is None:
            return func_products(*inputs, Vt, forward_over_reverse)
        parts = func_products(*inputs, Vt, forward_over_reverse, flat=False)
    return add_by_parameter(out, parts, params, alpha)


def func_inputs(
    loss_fn: Callable[[Any], Tensor], params: Sequence[Tensor], batch: Any, module: nn.Module
) -> tuple[nn.Module, list[str], dict[str, Tensor], tuple[Tensor, ...], Any]:
    """What :func:`func_products` takes: the module and loss as one ``nn.Module``, the names of
    the trainable parameters, the frozen ones, the detached parameters and the batch. The
    frozen ones go in as aliases (same storage): a loss that reassigns their ``.data`` (a
    momentum encoder's update) reassigns the alias, never the parameter, which would otherwise
    keep a transformed tensor and crash the process at its next use."""
    names = [f"m.{n}" for n, p in module.named_parameters() if p.requires_grad]
    frozen = {f"m.{n}": p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    return _LossOf(module, loss_fn), names, frozen, tuple(p.detach() for p in params), batch


def func_products(
    wrapper: nn.Module,
    names: list[str],
    frozen: dict[str, Tensor],
    primals: tuple[Tensor, ...],
    batch: Any,
    Vt: Tensor,
    forward_over_reverse: bool = True,
    flat: bool = True,
) -> Tensor | tuple[Tensor, ...]:
    """``(H_b V)ᵀ`` by torch.func on the inputs of :func:`func_inputs`: a pure function of its
    arguments, which :mod:`.compiled` also compiles. ``flat=False``: the products parameter by
    parameter, ``(k, *shape)`` each, not concatenated."""

    def loss_of(*ps: Tensor) -> Tensor:
        return torch.func.functional_call(
            wrapper, {**frozen, **dict(zip(names, ps, strict=True))}, (batch,), strict=False
        )

    grad_fn = torch.func.grad(loss_of, argnums=tuple(range(len(primals))))

    def one(v: Tensor) -> Tensor:
        tangents = tuple(unflatten(v, primals))
        if forward_over_reverse:
            _, hv = torch.func.jvp(grad_fn, primals, tangents)
        else:
            _, pullback = torch.func.vjp(grad_fn, *primals)
            hv = pullback(tangents)
        return flatten(hv) if flat else tuple(hv)

    if Vt.shape[0] == 1:
        hv = one(Vt[0])
        return hv[None] if flat else tuple(h[None] for h in hv)
    return torch.func.vmap(one, randomness="same")(Vt)


def shared_module(module: nn.Module | None) -> str | None:
    """Why ``torch.func`` cannot run ``module``: a submodule under two names (T5's shared
    embedding), whose parameters ``functional_call`` puts back wrong (a fit crashed: "Cannot
    access data pointer of Tensor that doesn't have storage"); or None. Tied parameters pass."""
    seen: dict[int, str] = {}
    for name, sub in [] if module is None else module.named_modules(remove_duplicate=False):
        if id(sub) in seen:
            return (
                f"torch.func's functional_call cannot run a module registered under two names "
                f"({seen[id(sub)] or 'the root'!r} and {name!r}: it leaves a transformed tensor "
                "in its parameters); use the 'double_backward' or 'cached' products ('auto' does)."
            )
        seen[id(sub)] = name
    return None


def _checked_data(tensor: Tensor, value: Tensor) -> None:
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor(value)
    if wrapped or torch._C._functorch.is_batchedtensor(value):
        raise RuntimeError(
            "the loss sets a tensor's `.data` to a tensor of a torch.func transform (a "
            "momentum encoder's update in training_step?): PyTorch would keep it and crash the "
            "process at the tensor's next use, so the 'func' products cannot run this loss"
        )
    _DATA.__set__(tensor, value)


_DATA = getattr(torch._C, "TensorBase", getattr(torch._C, "_TensorBase", None)).data


@contextlib.contextmanager
def data_assignments_checked() -> Iterator[None]:
    """``tensor.data = value`` raises while inside when ``value`` belongs to a torch.func
    transform, instead of crashing the process later (torch 2.13 accepts it silently)."""
    if "data" in torch.Tensor.__dict__:  # nested: the outer one checks
        yield
        return
    torch.Tensor.data = property(_DATA.__get__, _checked_data)  # type: ignore[method-assign]
    try:
        yield
    finally:
        del torch.Tensor.data


@contextlib.contextmanager
def guard(
    module: nn.Module | None,
    params: Sequence[Tensor],
    seed: int,
    graph_kernels: bool = False,
    first_order: bool = False,
) -> Iterator[None]:
    """The context every product runs in: kernels with a double backward, a fixed RNG (same
    dropout masks every product: :func:`~lightning_landscape._core.random.fixed_rng`) with the
    global RNG untouched, and the module's buffers untouched.

    Kernels (:func:`~lightning_landscape.curvature.kernels.twice_differentiable`): attention
    through the math backend, cuDNN off when ``module`` holds a CUDA RNN, torch.compile'd code
    run eagerly; with ``graph_kernels`` (the graph kinds) convolutions whose double backward
    uses the standard kernels and eval-mode BatchNorm as an affine map (:mod:`.conv`); all
    restored on exit. Pass the module the loss calls: without it cuDNN is left
    as it is. ``first_order``: only gradients are taken inside (finite differences), so
    activation checkpoints keep recomputing (reentrant ones run non-reentrant).

    Every buffer is swapped for a clone while inside, and the original tensor objects are put
    back afterwards: a train-mode forward updates the clones (BatchNorm running statistics), never
    the caller's buffers, and graphs kept for later products (``hvp="cached"``) hold the clones,
    so restoring the buffers cannot invalidate them.
    """
    swapped, clones = [], {}
    if module is not None:
        for mod in module.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None:  # one clone a tensor: a buffer two modules share stays one
                    swapped.append((mod, name, buf))
                    mod._buffers[name] = clones.setdefault(id(buf), buf.detach().clone())
    _ENTRIES.append(next(_COUNT))
    try:
        with (
            fixed_rng(seed, params),
            torch.enable_grad(),
            twice_differentiable(module, first_order=first_order),
            standard_convolutions(module if graph_kernels else None),
            affine_batch_norms(module if graph_kernels else None),
        ):
            yield
    finally:
        _ENTRIES.pop()
        for mod, name, buf in swapped:
            mod._buffers[name] = buf


_ENTRIES: list[int] = []  # the guards entered and not left, innermost last
_COUNT = itertools.count(1)


def guarding() -> int:
    """0 outside :func:`guard`; inside, the number of the innermost entry, new at each (products
    run now, on clones of the module's buffers made at that entry)."""
    return _ENTRIES[-1] if _ENTRIES else 0


@contextlib.contextmanager
def batch_norm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Stop train-mode BatchNorm layers from updating their running statistics.

    torch.func transforms refuse in-place updates of captured tensors. In train mode BatchNorm
    normalizes with the batch statistics, so switching ``track_running_stats`` off for the call
    leaves its output, and hence the Hessian, unchanged; the flags are restored afterwards.
    """
    touched = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    try:
        for m in touched:
            m.track_running_stats = False
        yield
    finally:
        for m in touched:
            m.track_running_stats = True
