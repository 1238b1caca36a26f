"""Whether a gradient graph can be differentiated again: the checks the graph products and the
GGN's linearizations run on each batch's first graph (a kernel can be reached by some batches
only), and the dense oracle on every batch's.

Autograd does not always say when it cannot differentiate a backward: through a
``@once_differentiable`` backward, or a custom ``autograd.Function`` whose backward runs
outside autograd (fused kernels of model libraries: CUDA extensions, Triton), a second
backward silently drops every term through it (torch 2.13). These checks raise instead, so
that a kind asked for by name fails loudly; under ``hvp="auto"`` the Functions that the graph
cannot clear are listed instead, and the products compared with finite differences
(:mod:`.crosscheck`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import BackwardCFunction

from lightning_landscape._core.batches import flat_grad
from lightning_landscape._core.checks import check_loss

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


def checked_gradient(
    loss: Tensor, params: Sequence[Tensor], found: list[tuple[str, str]] | None = None
) -> Tensor:
    """``flat_grad(loss, params, create_graph=True)``, raising where that gradient cannot be
    differentiated again: through a ``@once_differentiable`` backward
    (:func:`check_twice_differentiable`) or a backward outside autograd
    (:func:`outside_autograd_refused`; with ``found``, listed there instead)."""
    with outside_autograd_refused(check_loss(loss), found):
        grad = flat_grad(loss, params, create_graph=True)
    check_twice_differentiable(grad)
    return grad


@contextlib.contextmanager
def outside_autograd_refused(
    root: Tensor, found: list[tuple[str, str]] | None = None
) -> Iterator[None]:
    """Raise at the end of the block if a backward with ``create_graph`` from ``root`` inside it
    passed through a custom autograd Function (Python's ``autograd.Function`` or a C++
    extension's) whose backward returned a nonzero gradient without a graph for an input that
    needs one ("detached"). Such a backward ran outside autograd (a CUDA extension's or a
    Triton kernel's, or under ``torch.no_grad``): a double backward drops every second-order
    term through it without a word, symmetric ones included (a fused loss at the end of the
    graph loses the whole Gauss-Newton term), where the symmetry check of ``"auto"`` sees only
    one-sided drops. Walks the graph once, hooking each custom Function's node for the block.

    The graph cannot tell such a backward from a linear Function's fed a constant gradient
    (nothing dropped), nor see every drop: a backward that multiplies the gradient it is fed by
    a factor computed outside autograd ("constant": its graph reaches neither the Function's
    inputs nor its output, only the gradient it was fed; a fused loss weighted by a learnable
    factor drops terms so, a gradient reversal is exact so), or one that uses a tensor saved
    without a graph ("saved": a statistic computed in the forward, as a memory-efficient
    Swish's sigmoid; more such tensors than inputs that need no gradient). With
    ``found``, nothing raises: each such Function is listed once, as ``(name, how)``, for
    :mod:`.crosscheck` to compare the products with finite differences.

    Raises:
        NotTwiceDifferentiable: naming the first detached Function, without ``found``.
    """
    seen: list[tuple[str, str]] = [] if found is None else found
    handles = []
    try:
        for node in _nodes(root):
            if isinstance(node, BackwardCFunction) or node.name().startswith(_CPP):
                handles.append(node.register_hook(_suspect(node, seen, found is not None)))
        yield
    finally:
        for handle in handles:
            handle.remove()
    if found is None and seen:
        raise NotTwiceDifferentiable(
            f"no double backward: the backward of {seen[0][0]} (a custom autograd Function) "
            "returns gradients outside autograd, so their derivatives would be dropped"
        )


def _suspect(node: Any, found: list[tuple[str, str]], listing: bool) -> Callable:
    """The hook that lists ``node`` in ``found`` if it is detached, or (with ``listing``)
    constant or saved (see :func:`outside_autograd_refused`)."""
    inputs = [f for f, _ in node.next_functions]  # None: an input that needs no gradient

    def hook(grad_inputs: Sequence[Tensor | None], grad_outputs: Sequence[Tensor | None]) -> None:
        listed = {how for name, how in found if name == node.name()}
        if not torch.is_grad_enabled() or "detached" in listed:
            return  # a backward without create_graph, or listed already
        fed = {o.grad_fn for o in grad_outputs if o is not None and o.grad_fn is not None}
        how = None
        for g, source in zip(grad_inputs, inputs, strict=False):
            if g is None or source is None or _integral(g):
                continue
            if any(g is o for o in grad_outputs):  # passed through (module hooks): nothing lost
                continue
            if not g.requires_grad and bool(g.any()):
                how = "detached"
                break
            if listing and not listed and how is None and g.requires_grad:
                if not _reaches(g, {node, *inputs}, fed):
                    how = "constant"
                elif _saved_without_graph(node, inputs):
                    how = "saved"
        if how is not None:
            found.append((node.name(), how))

    return hook


def _saved_without_graph(node: Any, inputs: list) -> bool:
    """Whether a Python Function's node saved more floating tensors without a graph than it has
    inputs that need no gradient (those may be saved: a convolution's input images, which
    :mod:`.conv` saves); C++ extensions' saved tensors cannot be read: False."""
    try:
        saved = node.saved_tensors
    except (AttributeError, RuntimeError):  # not a Python Function, or freed
        return False
    bare = sum(t is not None and not _integral(t) and not t.requires_grad for t in saved)
    return bare > sum(f is None for f in inputs)


def _reaches(g: Tensor, targets: set, fed: set) -> bool:
    """Whether ``g``'s graph reaches one of the nodes ``targets`` other than through the nodes
    ``fed`` (the graphs of the gradients a backward was fed); stops at the first found."""
    seen, stack = set(), [g.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in fed:
            continue
        if node in targets:
            return True
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return False


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
