"""The objectives of the sharpness measures: the loss at flat weights ``w`` as ``value(w)`` and
``value_and_grad(w)``, counting the forward and backward passes spent, and its Hessian at ``w``
as a linear operator of the curvature engine, ``hessian_at(w)`` (pure torch).

:class:`FunctionObjective` wraps a function of a flat tensor, :class:`BatchObjective` the mean
loss of fixed batches at moved parameters, reduced across ranks, with the same dropout masks in
every evaluation (one fixed function). Import them from
:mod:`lightning_landscape.landscape.sharpness`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.batches import mean_gradient, mean_value
from lightning_landscape._core.checks import check_callable, check_choice
from lightning_landscape._core.random import fixed_rng
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.curvature.operator import HessianOperator, LinearOperator


class _FunctionHessian(LinearOperator):
    """The Hessian of ``fn`` at ``w``: the gradient graph is built once, then one backward a
    product (Pearlmutter 1994)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], w: Tensor) -> None:
        super().__init__()
        self.dim, self.dtype, self.device = w.numel(), w.dtype, w.device
        self._x = w.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (self._grad,) = torch.autograd.grad(fn(self._x), self._x, create_graph=True)

    def _matmat(self, Vt: Tensor) -> Tensor:
        if not self._grad.requires_grad:  # fn is linear: H = 0
            return torch.zeros_like(Vt)
        rows = [torch.autograd.grad(self._grad, self._x, v, retain_graph=True)[0] for v in Vt]
        return torch.stack(rows)


class FunctionObjective:
    """The loss as a function ``f(w) -> scalar tensor`` of a flat weight vector.

    Attributes:
        num_forward, num_backward, num_hvp: evaluations of ``f``, of its gradient and of
            Hessian-vector products so far.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
        self.fn = fn
        self.num_forward = 0
        self.num_backward = 0
        self.num_hvp = 0

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

    @contextlib.contextmanager
    def hessian_at(self, w: Tensor) -> Iterator[LinearOperator]:
        """The Hessian of ``fn`` at ``w`` as an operator (its products count in its
        ``num_matvecs``; building it costs one gradient with its graph)."""
        op = _FunctionHessian(self.fn, w)
        try:
            yield op
        finally:
            self.num_hvp += op.num_matvecs


#: The product kinds of :meth:`BatchObjective.hessian_at` (the func kinds need a module).
HVP_KINDS = ("auto", "cached", "double_backward", "finite_difference")


class BatchObjective:
    """The batch-size-weighted mean loss of fixed batches at moved parameters, over all ranks.

    One fixed function of ``w``, also where the forward is random (dropout in train mode): every
    evaluation (:meth:`value`, :meth:`value_and_grad` and the products of :meth:`hessian_at`)
    seeds the generators with ``seed`` and visits the batches in order, so batch b draws the
    same dropout masks in every evaluation, and L(w) and L(w+ε) differ only by the weights; the
    global RNG is put back after each (:func:`~lightning_landscape._core.random.fixed_rng`, the
    mechanism of the Hessian's products, so the operator is the Hessian of this very function;
    on CUDA, where a batch cut into pieces draws its masks per piece, only of the same function
    when the batches are whole).

    Args:
        loss_fn: ``loss_fn(batch) -> scalar`` mean loss of one batch.
        params: the parameters that ``w`` sets (a :class:`ParamVector`).
        batches: this rank's batches.
        batch_size_fn: ``batch_size_fn(batch) -> int``, the weight of a batch; default the
            leading size of its first tensor (see
            :func:`~lightning_landscape._core.batches.default_batch_size`).
        distributed: reduce across ranks when a process group is up.
        seed: the seed of the forwards' randomness (dropout masks), the same on every rank.
        hvp: the kind of the products of :meth:`hessian_at` (``"cached"``,
            ``"double_backward"``, ``"finite_difference"``, or ``"auto"``: the first operator
            chooses by trial, the fastest exact kind that works, else finite differences, and
            the later ones reuse its choice; see :mod:`~lightning_landscape.curvature.auto`).

    Attributes:
        num_forward, num_backward, num_hvp: forward and backward passes and Hessian-vector
            products over single batches so far.
        seed: as above; one measurement keeps it, so that it measures one function.
        hvp, hvp_reason: the kind in use (``"auto"`` until an operator has chosen) and why.
        warn: None (the operators' ``UserWarning``) or ``warn(key, message)``, handed to the
            operators for their fallback and accuracy warnings.
        checks: whether ``"auto"``'s trial listed custom autograd Functions: then every
            operator compares its products with finite differences where its own graphs list
            one (:mod:`~lightning_landscape.curvature.crosscheck`).

    Raises:
        TypeError: if ``batch_size_fn`` is not callable or None.
    """

    def __init__(
        self,
        loss_fn: Callable[[Any], Tensor],
        params: ParamVector,
        batches: Sequence[Any],
        *,
        batch_size_fn: Callable[[Any], int] | None = None,
        distributed: bool = True,
        seed: int = 0,
        hvp: str = "cached",
    ) -> None:
        check_choice("hvp", hvp, HVP_KINDS)
        self.loss_fn = loss_fn
        self.params = params
        self.batches = list(batches)
        self.batch_size_fn = check_callable("batch_size_fn", batch_size_fn, allow_none=True)
        self.distributed = distributed
        self.num_forward = 0
        self.num_backward = 0
        self.num_hvp = 0
        self.seed = seed
        self.hvp, self.hvp_reason = hvp, "" if hvp == "auto" else "requested"
        self.warn: Callable[[str, str], None] | None = None
        self.checks = False

    @property
    def hvp_seed(self) -> int:
        """The former name of :attr:`seed` (kept so that code setting it still works)."""
        return self.seed

    @hvp_seed.setter
    def hvp_seed(self, value: int) -> None:
        self.seed = value

    def value(self, w: Tensor) -> float:
        self.num_forward += len(self.batches)
        with self.params.moved_to(w), fixed_rng(self.seed, self.params.params):
            return mean_value(
                self.loss_fn,
                self.batches,
                batch_size_fn=self.batch_size_fn,
                distributed=self.distributed,
            )

    def value_and_grad(self, w: Tensor) -> tuple[float, Tensor]:
        self.num_forward += len(self.batches)
        self.num_backward += len(self.batches)
        with self.params.moved_to(w), fixed_rng(self.seed, self.params.params):
            return mean_gradient(
                self.loss_fn,
                self.params.params,
                self.batches,
                batch_size_fn=self.batch_size_fn,
                distributed=self.distributed,
            )

    @contextlib.contextmanager
    def hessian_at(self, w: Tensor) -> Iterator[LinearOperator]:
        """The Hessian of the batch-weighted loss at ``w`` (over all ranks) as a
        :class:`~lightning_landscape.curvature.HessianOperator` of the kind :attr:`hvp`: the
        parameters hold ``w`` inside the block and are restored bit for bit afterwards. Each
        product visits every batch with the dropout masks of :meth:`value` (seeded by ``seed``);
        the first also builds their gradient graphs. With ``hvp="auto"`` the first product of
        the first operator decides the kind (kept on the objective)."""
        with (
            self.params.moved_to(w),
            HessianOperator(
                self.loss_fn,
                self.params.params,
                self.batches,
                batch_size_fn=self.batch_size_fn,
                distributed=self.distributed,
                seed=self.seed,
                hvp=self.hvp,
            ) as op,
        ):
            if self.warn is not None:
                op.warn = self.warn
            if self.checks:
                op.graphs.suspects = []
            try:
                yield op
            finally:
                self.num_hvp += op.num_matvecs * len(self.batches)
                choice = op.choice  # none where every kind gave NaN: decided next time
                if self.hvp == "auto" and choice is not None and (choice.seconds or not op.exact):
                    self.hvp, self.hvp_reason = choice.kind, choice.reason
                    self.checks = op.graphs.listed


Objective = FunctionObjective | BatchObjective
