"""The Hessian of a loss over fixed batches as a linear operator (:mod:`.linear`).

The Hessian is represented as H = Σ_b n_b H_b / Σ_b n_b, where H_b is the Hessian of the mean loss
of batch b (n_b samples), so batches of unequal size are weighted exactly. Under torch.distributed
every rank holds its own batches; sums of n_b H_b v and of n_b are reduced across ranks, so every
rank gets the Hessian of the union of all shards (one all-reduce of one flat vector per product).

Hessian-vector products (Pearlmutter 1994) come in five kinds (:mod:`.hvp`, :mod:`.compiled`,
:mod:`.finite_difference`), and ``"auto"`` chooses among them by trial (:mod:`.auto`). Memory
above the model's, in units of T, a training step on one batch, and of P, the number of
parameters: an exact product on a whole batch holds its gradient graph and the second backward's
temporaries, 2.2 T (ResNet-18, H200) to 4.3 T (GELU MLP, CPU) for ``"double_backward"``, 7.9 T a
vector for ``"func"`` (MLP); so by default (``micro_batch_size="auto"``, :mod:`.pieces`) batches
are cut into pieces small enough for a product to fit ``memory_budget`` (default 1 T, on a GPU a
quarter of its free memory if more: small pieces leave it idle), when the loss is a mean over
independent samples (the same matrix). ``"cached"`` keeps the graphs that fit ``memory_budget``
beside one product's working memory, differentiates the others per product: one budget in all
(none kept where a product needs all of it). ``"finite_difference"``: one gradient and 3 P. A
vmapped block of k vectors holds about 1 + 2k graphs, so blocks take fewer vectors at a time,
or smaller pieces, as the budget left beside the kept graphs needs.
A HessianMonitor measurement (benchmarks/memory.py, MLP): 0.85 T with pieces, 5.1 T without.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_landscape._core import batches as _batches
from lightning_landscape._core.checks import check_batches, check_callable, check_int, check_real
from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape._core.vectors import resolve_params
from lightning_landscape.curvature import auto as _auto
from lightning_landscape.curvature import compiled as _compiled
from lightning_landscape.curvature import finite_difference as _fd
from lightning_landscape.curvature import hvp as _hvp
from lightning_landscape.curvature import pieces as _pieces
from lightning_landscape.curvature import scripted as _scripted
from lightning_landscape.curvature.cache import (
    GraphCache,
    rng_state,
    set_rng_state,
)
from lightning_landscape.curvature.linear import LinearOperator, MatrixOperator

__all__ = ["HVPMode", "HessianOperator", "LinearOperator", "MatrixOperator"]

HVPMode = Literal["auto", "cached", "double_backward", "func", "compiled", "finite_difference"]
KINDS = ("auto", "cached", "double_backward", "func", "compiled", "finite_difference")
EXACT = ("cached", "double_backward", "func", "compiled")
FUNC = ("func", "compiled")  # forward-over-reverse: they need the module


class HessianOperator(LinearOperator):
    """The Hessian of a batch-averaged loss as a linear operator.

    Args:
        loss_fn: ``loss_fn(batch) -> scalar tensor``, the loss of one batch, mean-reduced over
            its samples.
        params: the tensors to differentiate with respect to (an ``nn.Module`` means its
            trainable parameters). When a module is given its buffers (BatchNorm statistics)
            are never written: forwards run on clones of them.
        batches: the batches; every product visits all of them.
        batch_size_fn: ``batch_size_fn(batch) -> int``; default: leading size of the batch's first
            tensor.
        distributed: reduce across ranks when a process group with several ranks is initialized.
        hvp: the kind of Hessian-vector product (costs in :mod:`.hvp`, memory above).
            ``"cached"`` (default): the gradient graphs of the batches that fit ``memory_budget``
            beside a product's working memory, built at the first product and kept (freed by
            :meth:`release` or a ``with`` block's end, rebuilt if the parameters change in
            place or a module switches train/eval), the others differentiated twice per product;
            ``"double_backward"`` (Pearlmutter); ``"func"``: torch.func forward-over-reverse,
            vmapped over blocks (needs ``params`` to be the ``nn.Module`` that ``loss_fn``
            calls); ``"compiled"``: the same compiled by ``torch.compile`` (:mod:`.compiled`:
            once per model and shape, seconds to minutes; eager with one warning if compiling
            fails), never chosen by ``"auto"``; ``"finite_difference"`` (:mod:`.finite_difference`):
            inexact, its error estimated (:attr:`product_error`), for kernels without a double
            backward; ``"auto"``: the fastest exact kind that works here, by trial
            (:mod:`.auto`), finite differences only if no exact kind works, with a warning why.
        block_hvp: the kind for blocks of several vectors (trace and density probes), or
            ``"columns"`` (one at a time); default ``hvp``, or with ``"auto"`` the faster of the
            chosen kind and ``"func"`` (vmapped), timed on the first block ("columns" if neither
            runs on blocks: a collective in the loss, which vmap refuses).
        memory_budget: bytes a product's working memory and the cached graphs may hold
            (:func:`~.cache.fits`). ``None``: :func:`~.cache.budget_bytes` (a training step; on a
            GPU at least a quarter of its free memory); ``0``: nothing kept; ``math.inf``: all.
        micro_batch_size: the most samples one pass of a product takes: batches are cut into
            pieces, weighted by their sizes (exact when the loss is a mean over independent
            samples). ``"auto"``: pieces only as small as ``memory_budget`` needs, after checking
            that the loss decomposes (:mod:`.pieces`; otherwise whole batches and one warning,
            ``"whole_batches"``); ``None``: whole batches.
        fd_step: the finite-difference step relative to the weights, ‖h v‖ = ``fd_step`` · ‖w‖;
            default ε_mach^{1/3} of the dtype (4.9e-3 in float32, 6.1e-6 in float64).
        fd_tolerance: finite differences warn (once) when their estimated relative error
            exceeds this.
        seed: seed for any randomness in the forward (dropout in train mode): the same masks
            are replayed for every product, so the operator is a fixed matrix. The global RNG
            is left untouched.

    Attributes:
        hvp_choice: the kind in use (for ``"auto"``: None until the first product).
        hvp_reason: why it was chosen.
        block_choice: the kind in use for blocks (None until decided).
        warn: ``warn(kind, message)`` receives the warnings (``kind``: ``"fd_fallback"``,
            ``"fd_inaccurate"``, ``"whole_batches"``, ``"compile_failed"``, ``"asymmetric"``,
            ``"unverified"``); default ``warnings.warn``.
        plan: how the batches were cut (a :class:`~.pieces.Plan`; None before the first product).
        choice: the trial of ``"auto"`` (an :class:`~.auto.Choice`: timings, failures).
        graphs: the :class:`~.cache.GraphCache`: ``cut`` batches cached, their measured
            ``graph_bytes``, the ``budget`` used and ``step_bytes``, the estimated training step;
            its ``suspects`` (a list: custom Functions compared, :mod:`.crosscheck`).
        fd_errors: the error estimates of the checked finite-difference products.

    Raises:
        TypeError: if ``loss_fn`` or ``batch_size_fn`` is not callable, ``params``/``batches``
            have the wrong type, or ``seed``, ``memory_budget``, ``fd_step`` or
            ``fd_tolerance`` is not a number.
        ValueError: if ``batches`` is empty, ``hvp`` or ``block_hvp`` is unknown, ``"func"`` or
            ``"compiled"`` is asked without a module, ``params`` is empty or holds a tensor
            that does not require grad, a batch size is not positive (or cannot be inferred),
            ``memory_budget`` is negative, or ``fd_step``, ``fd_tolerance`` or
            ``micro_batch_size`` is not positive.

    Example::

        with HessianOperator(lambda b: F.cross_entropy(model(b[0]), b[1]), model, batches) as op:
            hv = op @ torch.randn(op.dim)
    """

    def __init__(
        self,
        loss_fn: Callable[[Any], Tensor],
        params: nn.Module | Iterable[Tensor],
        batches: Sequence[Any],
        *,
        batch_size_fn: Callable[[Any], int] | None = None,
        distributed: bool = True,
        hvp: HVPMode = "cached",
        block_hvp: HVPMode | None = None,
        memory_budget: float | None = None,
        micro_batch_size: int | Literal["auto"] | None = "auto",
        fd_step: float | None = None,
        fd_tolerance: float = 1e-2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_callable("loss_fn", loss_fn)
        if hvp not in KINDS:
            raise ValueError(f"`hvp` must be one of {', '.join(map(repr, KINDS))}, got {hvp!r}.")
        if block_hvp not in (None, *EXACT, _auto.COLUMNS):
            raise ValueError(f"`block_hvp` must be None, 'columns' or in {EXACT}: {block_hvp!r}.")
        check_batches(batches)
        check_int("seed", seed)
        check_callable("batch_size_fn", batch_size_fn, allow_none=True)
        _pieces.check_memory_budget(memory_budget)
        if fd_step is not None:
            check_real("fd_step", fd_step, low=0.0, strict=True, what="a positive number")
        check_real("fd_tolerance", fd_tolerance, low=0.0, strict=True, what="a positive number")
        _pieces.check_micro_batch_size(micro_batch_size)
        self.module = params if isinstance(params, nn.Module) else None
        needs = [f"`{n}={k!r}`" for n, k in (("hvp", hvp), ("block_hvp", block_hvp)) if k in FUNC]
        if needs and self.module is None:
            raise ValueError(f"{needs[0]} needs `params` to be the nn.Module `loss_fn` calls.")
        self.params = resolve_params(params)
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.hvp = hvp
        self.memory_budget = memory_budget
        self.seed = int(seed)
        self.distributed = is_distributed(distributed)
        self._size_fn = batch_size_fn or _batches.default_batch_size
        self.batch_sizes = _batches.batch_sizes(self.batches, self._size_fn)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.dim = sum(p.numel() for p in self.params)
        rel_step = float(fd_step) if fd_step is not None else _fd.default_rel_step(self.dtype)
        self._fd = _fd.CentralDifferences(rel_step, float(fd_tolerance), lambda *a: self.warn(*a))
        total = torch.tensor([float(self.local_size)], dtype=torch.float64, device=self.device)
        self.total_size = float(all_reduce_sum_(total, self.distributed).item())
        self._cuda = sorted({p.device.index or 0 for p in self.params if p.device.type == "cuda"})
        self.micro_batch_size = micro_batch_size
        self.plan: _pieces.Plan | None = None
        self.graphs = GraphCache(
            loss_fn, self.params, [], [], memory_budget, self._cuda, self.distributed
        )
        self._cache_key: tuple | None = None
        self._forward_over_reverse = True
        # the func kinds refuse TorchScript and a submodule under two names
        self._func_refused = _scripted.refusal(self.module) or _hvp.shared_module(self.module)
        self.hvp_choice: str | None = None if hvp == "auto" else hvp
        self.hvp_reason = "" if hvp == "auto" else "requested"
        self.choice: _auto.Choice | None = None
        self.block_choice: str | None = block_hvp or (None if hvp == "auto" else hvp)
        self.warn: Callable[[str, str], None] = _warn

    @property
    def local_size(self) -> int:
        return sum(self.batch_sizes)  # samples on this rank

    @property
    def product_error(self) -> float:  # type: ignore[override]
        """Largest estimated relative error of the checked products (exact: 0; NaN: none yet)."""
        return 0.0 if self.exact else max(self._fd.errors, default=math.nan)

    @property
    def fd_errors(self) -> list[float]:
        """The error estimates of the checked finite-difference products (1st, 2nd, 4th, ...)."""
        return list(self._fd.errors)

    @property
    def exact(self) -> bool:
        """False when the products are finite differences."""
        return self.hvp_choice != "finite_difference"

    def _split(self) -> None:
        """Cut the batches into pieces once, before the first product (:mod:`.pieces`)."""
        if self.plan is not None:
            return
        _pieces.cut(self, "Hessian-vector products")
        g = self.graphs
        g.batches, g.sizes = self.batches, self.batch_sizes
        g.requested_budget = self.plan.cache_budget(self.memory_budget)

    def _matmat(self, Vt: Tensor) -> Tensor:
        self._split()
        if _auto.pending(self):  # "auto"'s trial, or its check of this operator's graphs
            hv = _auto.first_product(self, Vt[:1])  # this rank's product of Vt[:1] by its kind
            if hv is not None and len(Vt) == 1:
                return self._reduce(hv)
        if self.hvp_choice == "finite_difference":
            return self._fd.products(Vt, self.differences, self._reduce)
        if len(Vt) == 1:
            return self._reduce(self.local_products(self.hvp_choice, Vt))
        if self.block_choice is None:
            return self._reduce(_auto.resolve_blocks(self, Vt))
        return self._reduce(self.local_products(self.block_choice, Vt))

    def _reduce(self, acc: Tensor) -> Tensor:
        all_reduce_sum_(acc, self.distributed)
        return acc.div_(self.total_size)

    def local_products(self, kind: str, Vt: Tensor) -> Tensor:
        """This rank's Σ_b n_b H_b V by ``kind`` for a ``(k, dim)`` block: not reduced across
        ranks nor divided by Σ n_b (what the trials of ``"auto"`` time)."""
        self._split()
        if kind == "cached":
            return self._cached(Vt)
        if kind == _auto.COLUMNS:  # no kind runs on blocks: one vector at a time
            return torch.cat([self.local_products(self.hvp_choice, v[None]) for v in Vt])
        if kind in FUNC and self._forward_over_reverse:
            try:
                return self._batch_by_batch(kind, Vt)
            except RuntimeError as err:  # jvp(grad(F.mse_loss)) raises in torch 2.13
                if "ZeroTensor" not in str(err):
                    raise
                self._forward_over_reverse = False  # and start over: same masks, same RNG
        return self._batch_by_batch(kind, Vt)

    def _through_graph(self, grad: Tensor, Vt: Tensor, retain: bool, out: Tensor, alpha, n=0):
        """``out += alpha`` times a block through a gradient graph of ``n`` samples (0: the
        largest batch), as many vectors at a time as :meth:`.pieces.Plan.width` allows beside
        the kept graphs; on CPU above 5,000 parameters one at a time (vmap is slower there)."""
        step = self.plan.width(n or max(self.batch_sizes), self.graphs.held)
        step = step if _hvp.vmaps_graphs(self.device, self.dim) else 1
        return _hvp.hvp_from_graph_in_blocks(grad, self.params, Vt, retain, step, out, alpha)

    def _parts(self, batch: Any, n: int, k: int) -> list[tuple[int, Any]]:
        """(size, part): ``batch``, or for a vmapped block of ``k`` > 1 its pieces (block_piece)."""
        return _pieces.pieces_of(batch, n, self.plan.block_piece if k > 1 else 0, self._size_fn)

    def _cached(self, Vt: Tensor) -> Tensor:
        with _hvp.guard(self.module, self.params, self.seed, graph_kernels=True):
            key = self._key()
            if self._cache_key != key:  # first product, parameters updated, train/eval switched
                self.graphs.grad = None
                self.graphs.build()
                self._cache_key = key
            return self.graphs.products(Vt, self._through_graph)

    def _batch_by_batch(self, kind: str, Vt: Tensor) -> Tensor:
        if kind == "finite_difference":  # unreduced: only the "auto" trial asks for it
            return self.differences(Vt, [False] * len(Vt))
        acc = torch.zeros_like(Vt)
        graph = kind == "double_backward"
        fn = _hvp.hvp_func if kind == "func" else partial(_compiled.hvp_compiled, warn=self.warn)
        if not graph and self._func_refused is not None:
            raise RuntimeError(self._func_refused)
        vmapped = not graph or _hvp.vmaps_graphs(self.device, self.dim)  # else a column at a time
        with _hvp.guard(self.module, self.params, self.seed, graph_kernels=graph):
            for b, (size, whole) in enumerate(zip(self.batch_sizes, self.batches, strict=True)):
                for n, batch in self._parts(whole, size, len(Vt) if vmapped else 1):
                    if graph:
                        with torch.enable_grad():
                            grad = self.graphs.gradient(b, self.loss_fn(batch))
                        self._through_graph(grad, Vt, False, acc, n, n)
                        continue
                    step = self.plan.width(n, self.graphs.held)  # vmapped; the same masks a part
                    start = rng_state(self._cuda) if step < len(Vt) else None
                    for lo in range(0, len(Vt), step):
                        if lo:
                            set_rng_state(start, self._cuda)
                        fn(  # added into acc parameter by parameter
                            self.loss_fn, self.params, batch, Vt[lo : lo + step], self.module,
                            forward_over_reverse=self._forward_over_reverse,
                            out=acc[lo : lo + step], alpha=n,
                        )  # fmt: skip
        return acc

    def differences(self, Vt: Tensor, checked: list[bool]) -> Tensor:
        """This rank's unreduced finite differences of the rows of ``Vt`` (:func:`.differences`)."""
        with _hvp.guard(self.module, self.params, self.seed, first_order=True):
            return _fd.differences(
                self.loss_fn, self.params, self.batches, self.batch_sizes, Vt, checked,
                self._fd.rel_step, self._cuda,
            )  # fmt: skip

    def _key(self) -> tuple:
        """What the cached graphs depend on: parameter versions and train/eval flags."""
        flags = tuple(m.training for m in self.module.modules()) if self.module is not None else ()
        return tuple(p._version for p in self.params), flags

    def release(self) -> None:
        """Free the cached gradient graphs (``hvp="cached"``); the next product rebuilds them."""
        self.graphs.grad = None
        self._cache_key = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def gradient(self) -> Tensor:
        """The gradient of the batch-averaged loss, reduced across ranks (a flat vector)."""
        self._split()
        with _hvp.guard(self.module, self.params, self.seed, first_order=True):
            return _batches.mean_gradient(
                self.loss_fn, self.params, self.batches, batch_size_fn=self._size_fn,
                distributed=self.distributed,
            )[1]  # fmt: skip


def _warn(kind: str, message: str) -> None:
    """The default of :attr:`HessianOperator.warn`: a ``UserWarning``."""
    warnings.warn(message, stacklevel=5)
