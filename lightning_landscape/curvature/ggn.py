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

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.batches import batch_sizes, default_batch_size
from lightning_landscape._core.checks import check_batches, check_bool, check_callable, check_int
from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape._core.vectors import flatten, resolve_params
from lightning_landscape.curvature import hvp as _hvp
from lightning_landscape.curvature.operator import LinearOperator
from lightning_landscape.curvature.output_hessian import (
    LossKind,
    OutputLoss,
    check_loss,
    loss_value,
    output_hessian,
)


class _Linearized:
    """One batch's model output with the graphs a GGN product needs: the output (for Jᵀw), the
    dummy cotangent u and Jᵀu (for J v), and the output Hessian."""

    def __init__(self, model_fn, loss, params: Sequence[Tensor], batch: Any) -> None:
        with torch.enable_grad():
            output, target = _split(model_fn(batch))
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

    def product(self, params: Sequence[Tensor], Vt: Tensor, retain: bool) -> Tensor:
        """``(J_bᵀ H_b J_b V)ᵀ`` for a ``(k, dim)`` block."""
        if not self.reaches:  # the output does not depend on the parameters
            return torch.zeros_like(Vt)
        k = Vt.shape[0]
        jv = _hvp.hvp_from_graph(self.jtu, [self.u], Vt, retain=True)  # (k, outputs): J V
        w = self.hout(jv.reshape(k, *self.shape)).reshape(k, -1)
        return _hvp.hvp_from_graph(self.output, params, w.to(self.output.dtype), retain=retain)


def _split(result: Any) -> tuple[Tensor, Tensor]:
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
        cache: keep each batch's output and Jᵀu graphs from the first product on (memory of the
            activations of all batches, about twice a gradient's graph; per product two
            backwards, about 2 gradients); ``False`` rebuilds them per product (a forward and
            three backwards, 3.5-5x a gradient, memory of one batch). Cached graphs are rebuilt if the parameters
            change in place or a module switches train/eval; :meth:`release` frees them.
        seed: seed of the forward's randomness (dropout masks replayed for every product); the
            global RNG is left untouched.

    Raises:
        TypeError: if ``model_fn`` or ``batch_size_fn`` is not callable, ``loss`` is neither a
            known name nor callable, ``params``/``batches`` have the wrong type, or ``seed`` is not
            an int; at the first product, if ``model_fn`` does not return two tensors.
        ValueError: if ``batches`` is empty, ``loss`` is an unknown name, ``params`` is empty or
            holds a tensor that does not require grad, or a batch size is not positive; at the
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
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_callable("model_fn", model_fn)
        check_loss(loss)
        check_batches(batches)
        check_bool("cache", cache)
        check_int("seed", seed)
        check_callable("batch_size_fn", batch_size_fn, allow_none=True)
        self.module = params if isinstance(params, nn.Module) else None
        self.params = resolve_params(params)
        self.model_fn = model_fn
        self.loss = loss
        self.batches = list(batches)
        self.cache = cache
        self.seed = int(seed)
        self.distributed = is_distributed(distributed)
        size_fn = batch_size_fn or default_batch_size
        self.batch_sizes = batch_sizes(self.batches, size_fn)
        first = self.params[0]
        self.dtype = first.dtype
        self.device = first.device
        self.dim = sum(p.numel() for p in self.params)
        total = torch.tensor(
            [float(sum(self.batch_sizes))], dtype=torch.float64, device=self.device
        )
        self.total_size = float(all_reduce_sum_(total, self.distributed).item())
        self._cache: list[_Linearized] | None = None
        self._cache_key: tuple = ()

    def loss_fn(self, batch: Any) -> Tensor:
        """The loss of one batch whose GGN this is, ``loss(*model_fn(batch))``: give it to
        :class:`~.operator.HessianOperator` so that H − G is the Gauss-Newton residual."""
        output, target = _split(self.model_fn(batch))
        return loss_value(self.loss, output, target)

    def _matmat(self, Vt: Tensor) -> Tensor:
        acc = torch.zeros_like(Vt)
        # A block is one vmapped backward; on CPU that pays only for small models (as for
        # HessianOperator's cached products), so larger ones take the columns one by one.
        step = len(Vt) if self.device.type != "cpu" or self.dim <= 5000 else 1
        if self.cache:
            if self._cache is not None and self._cache_key != self._key():
                self._cache = None  # parameters updated in place, or train/eval switched
            if self._cache is None:
                with _hvp.guard(self.module, self.params, self.seed):
                    self._cache_key = self._key()
                    self._cache = [
                        _Linearized(self.model_fn, self.loss, self.params, b) for b in self.batches
                    ]
            for n, lin in zip(self.batch_sizes, self._cache, strict=True):
                for lo in range(0, len(Vt), step):
                    chunk = Vt[lo : lo + step]
                    acc[lo : lo + step].add_(lin.product(self.params, chunk, True), alpha=n)
        else:
            with _hvp.guard(self.module, self.params, self.seed):
                for n, batch in zip(self.batch_sizes, self.batches, strict=True):
                    lin = _Linearized(self.model_fn, self.loss, self.params, batch)
                    for lo in range(0, len(Vt), step):
                        last = lo + step >= len(Vt)
                        chunk = Vt[lo : lo + step]
                        acc[lo : lo + step].add_(lin.product(self.params, chunk, not last), alpha=n)
                    del lin
        all_reduce_sum_(acc, self.distributed)
        return acc.div_(self.total_size)

    def _key(self) -> tuple:
        """What the cached graphs depend on: parameter versions and train/eval flags."""
        flags = tuple(m.training for m in self.module.modules()) if self.module is not None else ()
        return tuple(p._version for p in self.params), flags

    def release(self) -> None:
        """Free the cached graphs; the next product rebuilds them."""
        self._cache = None

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
        return (self.hessian.matmat(V) - self.ggn.matmat(V)).T
