"""The generalized Gauss-Newton matrix and the residual H − G as linear operators.

For a loss ℓ(f(w)) of the model output f (Schraudolph 2002; Martens 2020, "New insights and
perspectives on the natural gradient method"),

    ∇²ℓ = J_fᵀ ∇²_f ℓ J_f + Σ_k ∂ℓ/∂f_k ∇²f_k = G + R.

G, the generalized Gauss-Newton (GGN) matrix, is PSD when ℓ is convex in f (cross-entropy, MSE)
and carries the outliers of the spectrum (about one per class); the residual R carries the bulk
and the negative eigenvalues (Sagun et al. 2017/2018, "Empirical analysis of the Hessian of
over-parametrized neural networks"; Papyan 2019, "Measurements of three-level hierarchical
structure in the outliers in the spectrum of deepnet Hessians").

Over fixed batches, G = Σ_b n_b J_bᵀ H_b J_b / Σ_b n_b with H_b the output Hessian of batch b's
mean loss (:mod:`.output_hessian`), weighted and reduced across ranks exactly as
:class:`~.operator.HessianOperator`.

A product G v is a Jacobian-vector product, a multiplication by H_b, and a vector-Jacobian
product. The Jacobian-vector product uses the transpose trick: u ↦ Jᵀu is linear in a dummy
output cotangent u, so the backward of v through that graph is J v. It needs no
``torch.func``, works with any list of parameters and through train-mode BatchNorm. Measured on
CPU (``benchmarks/ggn_products.py``: tanh MLPs of 3.5k and 301k parameters, batch 256, one
thread), per product over one gradient: graphs kept (``cache=True``, two backwards, no forward)
1.8-2.1x, which is 0.5-0.85x a cached Hessian-vector product; rebuilt per product 3.5-5.2x;
``torch.func`` jvp then vjp 4.2-4.5x.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_landscape._core.batches import batch_sizes, default_batch_size
from lightning_landscape._core.checks import check_batches, check_bool, check_callable, check_int
from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape._core.vectors import resolve_params
from lightning_landscape.curvature import hvp as _hvp
from lightning_landscape.curvature import pieces as _pieces
from lightning_landscape.curvature.linear import writable
from lightning_landscape.curvature.linearization import Linearizations, split_output
from lightning_landscape.curvature.operator import LinearOperator
from lightning_landscape.curvature.output_hessian import (
    LossKind,
    OutputLoss,
    check_loss,
    loss_value,
)


class GGNOperator(LinearOperator):
    """The generalized Gauss-Newton matrix G = Σ_b n_b J_bᵀ H_b J_b / Σ_b n_b as an operator.

    Args:
        model_fn: ``model_fn(batch) -> (output, target)``: the model's output on one batch and
            what the loss compares it with; the loss of the batch is ``loss(output, target)``.
        params: the tensors to differentiate with respect to (an ``nn.Module`` means its
            trainable parameters; its buffers are never written, see :func:`.hvp.guard`).
        batches: the batches; every product visits all of them.
        loss: the mean-reduced loss of one batch, which identifies the output Hessian H_b:
            ``"cross_entropy"`` (``F.cross_entropy``, class on dimension 1: H_b =
            (diag(p) − ppᵀ)/N per position), ``"mse"`` (``F.mse_loss``: H_b = (2/M) I over M
            output elements) or a callable ``loss(output, target) -> scalar`` (H_b by double
            backward through the loss alone). See :mod:`.output_hessian`. G is PSD when the
            loss is convex in the output.
        batch_size_fn: ``batch_size_fn(batch) -> int``; default: leading size of the batch's first
            tensor.
        distributed: reduce across ranks when a process group with several ranks is initialized
            (one all-reduce of one flat vector per product).
        cache: keep the linearizations (output and Jᵀu graphs, :mod:`.linearization`) of the
            first batches whose measured bytes fit ``memory_budget`` beside one product's
            working memory (:func:`~.cache.fits`); per product two backwards
            through each kept one (about 2 gradients), a forward and three backwards for each
            other batch (3.5-5x a gradient, the memory of one batch). ``False``: keep nothing.
            Kept graphs are rebuilt if the parameters change in place or a module switches
            train/eval; :meth:`release` frees them. Results do not depend on what is kept.
        memory_budget: bytes the kept linearizations and one product's working memory (which
            ``micro_batch_size="auto"`` cuts the batches for) may hold together: as for
            :class:`~.operator.HessianOperator`, None is one training step (at least
            :data:`~.cache.FLOOR`; on a CUDA device at least a quarter of its free memory), 0
            keeps nothing, ``math.inf`` keeps every batch, whole.
        micro_batch_size: the most samples one linearization takes: batches are cut into
            pieces weighted by their sizes (the same G when the loss is a mean over independent
            samples). ``"auto"``: :func:`.pieces.plan` on :meth:`loss_fn`, after checking that
            the loss decomposes (otherwise whole batches and one warning, ``"whole_batches"``);
            ``None``: whole batches. The plan's estimate is a Hessian gradient graph of
            :meth:`loss_fn` (measured on a slice of the first batch, times
            :data:`~.pieces.PRODUCT_FACTOR`), not a linearization: a linearization holds about
            as much (the forward, and a backward with ``create_graph``, less the loss's own
            few output-sized tensors), and a GGN product's two backwards need no more than a
            double backward, so the estimate is close and, if anything, high. What is kept
            is measured.
        seed: seed of the forward's randomness (dropout masks replayed for every product); the
            global RNG is left untouched.

    Raises:
        TypeError: if ``model_fn`` or ``batch_size_fn`` is not callable, ``loss`` is neither a
            known name nor callable, ``params``/``batches`` have the wrong type, or ``seed`` is not
            an int, ``memory_budget`` is not a number or ``micro_batch_size`` not an int,
            ``"auto"`` or None; at the first product, if ``model_fn`` does not return two
            tensors.
        ValueError: if ``batches`` is empty, ``loss`` is an unknown name, ``params`` is empty or
            holds a tensor that does not require grad, a batch size is not positive,
            ``memory_budget`` is negative or ``micro_batch_size`` below 1; at the
            first product, for an MSE target shaped unlike the output, a cross-entropy output
            of fewer than 2 dimensions, or a callable loss that does not return a scalar.

    Example::

        G = GGNOperator(lambda b: (model(b[0]), b[1]), model, batches, loss="cross_entropy")
        H = HessianOperator(G.loss_fn, model, batches)
        R = ResidualOperator(H, G)  # H − G
    """

    def __init__(
        self,
        model_fn: Callable[[Any], tuple[Tensor, Tensor]],
        params: nn.Module | Iterable[Tensor],
        batches: Sequence[Any],
        *,
        loss: LossKind | OutputLoss = "cross_entropy",
        batch_size_fn: Callable[[Any], int] | None = None,
        distributed: bool = True,
        cache: bool = True,
        memory_budget: float | None = None,
        micro_batch_size: int | Literal["auto"] | None = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_callable("model_fn", model_fn)
        check_loss(loss)
        check_batches(batches)
        check_bool("cache", cache)
        check_int("seed", seed)
        check_callable("batch_size_fn", batch_size_fn, allow_none=True)
        _pieces.check_memory_budget(memory_budget)
        _pieces.check_micro_batch_size(micro_batch_size)
        self.module = params if isinstance(params, nn.Module) else None
        self.params = resolve_params(params)
        self.model_fn = model_fn
        self.loss = loss
        self.batches = list(batches)
        self.cache = cache
        self.seed = int(seed)
        self.distributed = is_distributed(distributed)
        self.memory_budget = memory_budget
        self.micro_batch_size = micro_batch_size
        self._size_fn = batch_size_fn or default_batch_size
        self.batch_sizes = batch_sizes(self.batches, self._size_fn)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.dim = sum(p.numel() for p in self.params)
        total = torch.tensor(
            [float(sum(self.batch_sizes))], dtype=torch.float64, device=self.device
        )
        self.total_size = float(all_reduce_sum_(total, self.distributed).item())
        cuda = sorted({p.device.index or 0 for p in self.params if p.device.type == "cuda"})
        self.plan: _pieces.Plan | None = None
        self.linearizations = Linearizations(
            self.model_fn, loss, self.params, cuda, self.distributed
        )
        self._cache_key: tuple | None = None
        self.warn: Callable[[str, str], None] = _warn

    def loss_fn(self, batch: Any) -> Tensor:
        """The loss of one batch whose GGN this is, ``loss(*model_fn(batch))``: give it to
        :class:`~.operator.HessianOperator` so that H − G is the Gauss-Newton residual."""
        output, target = split_output(self.model_fn(batch))
        return loss_value(self.loss, output, target)

    def _split(self) -> None:
        """Cut the batches into pieces once, before the first product (:mod:`.pieces`), and
        set the linearizations' budget."""
        if self.plan is not None:
            return
        _pieces.cut(self, "GGN products")
        lins = self.linearizations
        lins.batches, lins.sizes = self.batches, self.batch_sizes
        lins.requested_budget = self.plan.cache_budget(self.memory_budget) if self.cache else 0.0

    def _matmat(self, Vt: Tensor) -> Tensor:
        self._split()
        with _hvp.guard(self.module, self.params, self.seed):
            key = self._key()
            if self._cache_key != key:  # first product, parameters updated, train/eval switched
                self.linearizations.build()
                self._cache_key = key
            # A block is one vmapped backward, as many vectors as the budget left beside the kept
            # linearizations allows (Plan.width); on CPU that pays only for small models (as for
            # HessianOperator's cached products), so larger ones take the columns one by one.
            step = self.plan.width(max(self.batch_sizes), self.linearizations.cached_bytes)
            step = step if _hvp.vmaps_graphs(self.device, self.dim) else 1
            acc = self.linearizations.products(Vt, step)
        all_reduce_sum_(acc, self.distributed)
        return acc.div_(self.total_size)

    def _key(self) -> tuple:
        """What the cached graphs depend on: parameter versions and train/eval flags."""
        flags = tuple(m.training for m in self.module.modules()) if self.module is not None else ()
        return tuple(p._version for p in self.params), flags

    def release(self) -> None:
        """Free the cached graphs; the next product rebuilds them."""
        self.linearizations.release()
        self._cache_key = None

    def __enter__(self) -> GGNOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ResidualOperator(LinearOperator):
    """The Gauss-Newton residual R = H − G = Σ_k ∂ℓ/∂f_k ∇²f_k as an operator.

    Its most negative eigenvalues are those of the Hessian's negative directions, none of which
    G has (G is PSD for a convex loss; Sagun et al. 2018, Papyan 2019).

    Args:
        hessian: the Hessian operator, e.g. ``HessianOperator(ggn.loss_fn, ...)`` on the same
            parameters and batches as ``ggn`` (R is the Gauss-Newton residual only if both
            belong to the same loss).
        ggn: the GGN operator.

    Raises:
        TypeError: if either is not a :class:`~.operator.LinearOperator`.
        ValueError: if their dimensions, dtypes, devices or ``distributed`` flags differ.

    Cost: each product is one Hessian-vector product and one GGN product (both operators'
    ``num_matvecs`` count them too).
    """

    def __init__(self, hessian: LinearOperator, ggn: LinearOperator) -> None:
        super().__init__()
        for name, op in (("hessian", hessian), ("ggn", ggn)):
            if not isinstance(op, LinearOperator):
                raise TypeError(f"`{name}` must be a LinearOperator, got {type(op).__name__}.")
        for attr in ("dim", "dtype", "device", "distributed"):
            a, b = getattr(hessian, attr), getattr(ggn, attr)
            if a != b:
                raise ValueError(f"`hessian` and `ggn` differ in {attr}: {a!r} vs {b!r}.")
        self.hessian = hessian
        self.ggn = ggn
        self.dim = hessian.dim
        self.dtype = hessian.dtype
        self.device = hessian.device
        self.distributed = hessian.distributed

    def _matmat(self, Vt: Tensor) -> Tensor:
        V = Vt.T
        out = self.hessian.matmat(V).T  # a block of its own (LinearOperator): H V − G V there
        if out.dtype != Vt.dtype or not writable(out, Vt):
            return out - self.ggn.matmat(V).T
        return out.sub_(self.ggn.matmat(V).T)


def _warn(kind: str, message: str) -> None:
    """The default of :attr:`GGNOperator.warn`: a ``UserWarning``."""
    warnings.warn(message, stacklevel=5)
