"""Linearizations of the model kept between GGN products, within a memory budget.

A product G v of :class:`~.ggn.GGNOperator` needs, for each batch, the model's output graph (for
Jᵀw), the graph of Jᵀu for a dummy cotangent u (for J v, the transpose trick) and the output
Hessian: a linearization. Kept for every batch, they hold all batches' activations and about a
gradient graph each, so, as :class:`~.cache.GraphCache` does for Hessian-vector products, only
the linearizations of the first batches (pieces) whose measured bytes fit the budget beside one
product's working memory are kept (:func:`~.cache.fits`); the others are rebuilt for every
product, one at a time, drawing the same dropout masks (the generators' state before the first
uncached batch is replayed).

The bytes are measured, not guessed: the distinct storages autograd saves while a linearization
is built (:class:`~.cache.SavedBytes`, parameters excluded). Not counted: the output-sized
tensors a linearization holds besides (the output, u, the output Hessian's probabilities).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.vectors import flatten
from lightning_landscape.curvature import hvp as _hvp
from lightning_landscape.curvature.cache import (
    SavedBytes,
    budget_bytes,
    fits,
    largest_graph,
    rng_state,
    set_rng_state,
)
from lightning_landscape.curvature.differentiable import (
    check_twice_differentiable,
    outside_autograd_refused,
)
from lightning_landscape.curvature.output_hessian import output_hessian


def split_output(result: Any) -> tuple[Tensor, Tensor]:
    """``model_fn(batch)``'s ``(output, target)``.

    Raises:
        TypeError: if it is not a pair of tensors.
    """
    if (
        not isinstance(result, tuple | list)
        or len(result) != 2
        or not all(isinstance(t, Tensor) for t in result)
    ):
        raise TypeError(
            "`model_fn(batch)` must return a pair (output, target) of tensors, got "
            f"{type(result).__name__}."
        )
    return result[0], result[1]


class Linearized:
    """One batch's model output with the graphs a GGN product needs: the output (for Jᵀw), the
    dummy cotangent u and Jᵀu (for J v), and the output Hessian. With ``counter`` (a
    :class:`~.cache.SavedBytes` around it), :attr:`forward_bytes` is what the forward saved."""

    def __init__(
        self,
        model_fn,
        loss,
        params: Sequence[Tensor],
        batch: Any,
        counter: SavedBytes | None = None,
    ) -> None:
        with torch.enable_grad():
            output, target = split_output(model_fn(batch))
            self.forward_bytes = counter.bytes if counter is not None else 0
            self.shape = output.shape
            self.hout = output_hessian(loss, output, target)
            self.output = output.reshape(-1)
            self.reaches = output.requires_grad
            if self.reaches:
                self.u = torch.zeros_like(self.output, requires_grad=True)
                jtu = torch.autograd.grad(
                    self.output, params, self.u, create_graph=True, allow_unused=True
                )
                self.jtu = flatten(
                    [
                        torch.zeros_like(p) if g is None else g
                        for g, p in zip(jtu, params, strict=True)
                    ]
                )

    def check(self, params: Sequence[Tensor]) -> None:
        """Raise where J v cannot be computed: it differentiates Jᵀu again
        (:mod:`~.differentiable`). A backward of its own from the output, with u = 1 (through a
        backward outside autograd, a nonzero gradient without a graph shows; the kept graph's
        u = 0 would hide it, and a backward that is not linear in its incoming gradient, a
        clipping one, is linearized at 0 as it should be). One backward more, once per batch and
        operator."""
        if not self.reaches:
            return
        probe = torch.ones_like(self.output, requires_grad=True)
        with torch.enable_grad(), outside_autograd_refused(self.output):
            parts = torch.autograd.grad(
                self.output, params, probe, create_graph=True, retain_graph=True, allow_unused=True
            )
        check_twice_differentiable(*(part for part in parts if part is not None))

    def product(
        self, params: Sequence[Tensor], Vt: Tensor, retain: bool, out: Tensor, alpha: float
    ) -> Tensor:
        """``out += alpha (J_bᵀ H_b J_b V)ᵀ`` for a ``(k, dim)`` block, parameter by parameter
        (no block of products besides ``out``)."""
        if not self.reaches:  # the output does not depend on the parameters
            return out
        k = Vt.shape[0]
        jv = _hvp.hvp_from_graph(self.jtu, [self.u], Vt, retain=True)  # (k, outputs): J V
        w = self.hout(jv.reshape(k, *self.shape)).reshape(k, -1).to(self.output.dtype)
        return _hvp.hvp_from_graph(self.output, params, w, retain, out, alpha)


class Linearizations:
    """The linearizations of the first ``cut`` batches, within a budget.

    Args:
        model_fn, loss, params: the GGN operator's.
        cuda_devices: the CUDA devices whose generators the forwards draw from.

    Attributes:
        batches, sizes: the batches (pieces) and their sizes, set by the operator.
        requested_budget: bytes the kept linearizations and one product's working memory may take
            together (:func:`~.cache.fits`); None: :func:`~.cache.budget_bytes` (:attr:`step_bytes`,
            at least :data:`~.cache.FLOOR`, on a GPU a share of its free memory); 0: nothing kept.
        kept: the linearizations of batches ``:cut``.
        rng: the generators' state before batch ``cut`` (None when every batch is kept).
        lin_bytes: measured bytes of each linearization built (the first ``cut`` + 1 at most).
        largest: the largest batch's linearization as estimated from those.
        step_bytes: a training step, estimated: batch 0's forward activations plus 2 P numbers.
        budget: the budget used, in bytes.
    """

    def __init__(
        self,
        model_fn,
        loss,
        params: Sequence[Tensor],
        cuda_devices: Sequence[int],
        distributed: bool = False,  # the operator's: every rank takes the same budget
    ):
        self.model_fn, self.loss, self.params, self.cuda = model_fn, loss, params, cuda_devices
        self.distributed = distributed
        self.batches: list[Any] = []
        self.sizes: list[int] = []
        self.requested_budget: float | None = 0.0
        self.kept: list[Linearized] = []
        self.rng: tuple[Tensor, list[Tensor]] | None = None
        self.lin_bytes: list[int] = []
        self.largest = 0.0
        self.step_bytes = 0
        self.budget = 0.0
        self.checked: set[int] = set()  # batches whose linearization passed its check

    @property
    def cut(self) -> int:
        """Batches whose linearizations are kept."""
        return len(self.kept)

    @property
    def cached_bytes(self) -> int:
        """Measured bytes of the linearizations kept."""
        return sum(self.lin_bytes[: self.cut])

    def release(self) -> None:
        """Drop the kept linearizations (the next product rebuilds them with :meth:`build`)."""
        self.kept, self.rng = [], None

    def _checked(self, i: int, lin: Linearized) -> Linearized:
        """``lin``, batch i's, checked (:meth:`Linearized.check`) the first time (a kernel can
        be used by some batches only: a mixture of experts' routing)."""
        if i not in self.checked:
            lin.check(self.params)
            self.checked.add(i)  # only once it passed: a retry checks again
        return lin

    def build(self) -> None:
        """Linearize batch by batch until the next one would not fit the budget beside a
        product's working memory (that one is dropped). Runs inside :func:`~.hvp.guard`: the
        forwards draw their masks in batch order, as the products of an operator that keeps
        nothing do."""
        self.release()
        self.lin_bytes, total = [], 0
        if self.requested_budget == 0:  # nothing kept: no linearization to build now
            self.rng, self.budget = rng_state(self.cuda), 0.0
            return
        numel_bytes = sum(p.numel() for p in self.params) * self.params[0].element_size()
        for i, batch in enumerate(self.batches):
            self.rng = rng_state(self.cuda)
            with SavedBytes(exclude=self.params) as counter:
                lin = Linearized(self.model_fn, self.loss, self.params, batch, counter)
            lin, nbytes = self._checked(i, lin), counter.bytes
            if i == 0:
                self.step_bytes = lin.forward_bytes + 2 * numel_bytes
                self.budget = budget_bytes(
                    self.requested_budget, self.step_bytes, self.params[0].device, self.distributed
                )
            self.lin_bytes.append(nbytes)
            self.largest = largest_graph(self.lin_bytes, self.sizes)
            if not fits(total + nbytes, self.largest, self.budget):
                return  # this one is dropped; batches i: are linearized per product
            total += nbytes
            self.kept.append(lin)
        self.rng = None

    def products(self, Vt: Tensor, step: int) -> Tensor:
        """Σ_b n_b (J_bᵀ H_b J_b V)ᵀ for a ``(k, dim)`` block, ``step`` columns at a time:
        through the kept linearizations, then each other batch linearized and dropped in turn.
        Runs inside :func:`~.hvp.guard`, after :meth:`build`."""
        acc = torch.zeros_like(Vt)
        for n, lin in zip(self.sizes, self.kept, strict=False):
            for lo in range(0, len(Vt), step):
                lin.product(self.params, Vt[lo : lo + step], True, acc[lo : lo + step], n)
        if self.cut < len(self.batches):
            set_rng_state(self.rng, self.cuda)  # the masks batch `cut` draws in sequence
            rest = zip(self.sizes[self.cut :], self.batches[self.cut :], strict=True)
            for i, (n, batch) in enumerate(rest, start=self.cut):
                lin = self._checked(i, Linearized(self.model_fn, self.loss, self.params, batch))
                for lo in range(0, len(Vt), step):
                    last = lo + step >= len(Vt)
                    chunk = Vt[lo : lo + step]
                    lin.product(self.params, chunk, not last, acc[lo : lo + step], n)
                del lin
        return acc
