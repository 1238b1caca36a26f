"""Whether a gradient graph can be differentiated again: the checks the graph products and the
GGN's linearizations run on each batch's first graph (a kernel can be reached by some batches
only), and the dense oracle on every batch's.

Autograd does not always say when it cannot differentiate a backward: through a
``@once_differentiable`` backward, or a custom ``autograd.Function`` whose backward runs
outside autograd (fused kernels of model libraries: CUDA extensions, Triton), a second
backward silently drops every term through it (torch 2.13). These checks raise instead, so
that ``hvp="auto"`` takes another route (finite differences) and a kind asked for by name
fails loudly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import BackwardCFunction

from lightning_landscape._core.batches import flat_grad

_CPP = "torch::autograd::CppNode<"  # the nodes of C++ extensions' autograd Functions


class NotTwiceDifferentiable(RuntimeError):
    """A gradient's graph passes through a backward that cannot be differentiated again."""


def check_twice_differentiable(*grads: Tensor) -> None:
    """Raise if the gradients' graphs pass through a backward marked ``@once_differentiable``.

    Such a backward runs without a graph and hands autograd an error node on fake leaves; a
    second backward towards the parameters never visits that node, so it would silently drop
    every second-order term through it (torch 2.13) instead of raising. Walks the graph once.

    Raises:
        NotTwiceDifferentiable: if one is found.
    """
    for node in _nodes(*grads):
        if node.name() == "torch::autograd::Error":
            raise NotTwiceDifferentiable(
                "no double backward: the gradient passes through a backward marked "
                "@once_differentiable (a custom autograd.Function)"
            )


def checked_gradient(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``flat_grad(loss, params, create_graph=True)``, raising where that gradient cannot be
    differentiated again: through a ``@once_differentiable`` backward
    (:func:`check_twice_differentiable`) or a backward outside autograd
    (:func:`outside_autograd_refused`)."""
    with outside_autograd_refused(loss):
        grad = flat_grad(loss, params, create_graph=True)
    check_twice_differentiable(grad)
    return grad


@contextlib.contextmanager
def outside_autograd_refused(root: Tensor) -> Iterator[None]:
    """Raise at the end of the block if a backward with ``create_graph`` from ``root`` inside it
    passed through a custom autograd Function (Python's ``autograd.Function`` or a C++
    extension's) whose backward returned a nonzero gradient without a graph for an input that
    needs one. Such a backward ran outside autograd (a CUDA extension's or a Triton kernel's, or
    under ``torch.no_grad``): a double backward drops every second-order term through it
    without a word, symmetric ones included (a fused loss at the end of the graph loses the
    whole Gauss-Newton term), where the symmetry check of ``"auto"`` sees only one-sided drops.
    A linear custom Function fed a constant gradient is refused too (nothing is dropped there,
    but it cannot be told apart); one whose backward runs outside autograd but is fed a
    gradient with a graph (a loss weighted by a learnable factor) is not seen. Walks the graph
    once, hooking each custom Function's node for the block.

    Raises:
        NotTwiceDifferentiable: naming the Function, if one is found.
    """
    found: list[str] = []
    handles = []
    try:
        for node in _nodes(root):
            if isinstance(node, BackwardCFunction) or node.name().startswith(_CPP):
                handles.append(node.register_hook(_outside_autograd(node, found)))
        yield
    finally:
        for handle in handles:
            handle.remove()
    if found:
        raise NotTwiceDifferentiable(
            f"no double backward: the backward of {found[0]} (a custom autograd Function) "
            "returns gradients outside autograd, so their derivatives would be dropped"
        )


def _outside_autograd(node: Any, found: list[str]) -> Callable:
    needed = [f is not None for f, _ in node.next_functions]  # which inputs need a gradient

    def hook(grad_inputs: Sequence[Tensor | None], grad_outputs: Sequence[Tensor | None]) -> None:
        if not torch.is_grad_enabled():  # a backward without create_graph
            return
        for g, need in zip(grad_inputs, needed, strict=False):
            if g is None or not need or g.requires_grad or _integral(g):
                continue
            if any(g is o for o in grad_outputs):  # passed through (module hooks): nothing lost
                continue
            if bool(g.any()):
                found.append(node.name())
                return

    return hook


def _integral(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def _nodes(*roots: Tensor) -> Iterator[Any]:
    """Every node of the roots' graphs, once."""
    seen, stack = set(), [root.grad_fn for root in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(f for f, _ in node.next_functions)
