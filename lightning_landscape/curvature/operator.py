"""Linear operators: the Hessian of a loss over fixed batches, and a dense matrix wrapper.

The Hessian is represented as H = Σ_b n_b H_b / Σ_b n_b, where H_b is the Hessian of the mean loss
of batch b (n_b samples), so batches of unequal size are weighted exactly. Under torch.distributed
every rank holds its own batches; sums of n_b H_b v and of n_b are reduced across ranks, so every
rank gets the Hessian of the union of all shards (one all-reduce of one flat vector per product).

Hessian-vector products (Pearlmutter 1994) come in three kinds, see :mod:`.hvp`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_landscape._core.batches import default_batch_size, mean_gradient
from lightning_landscape._core.checks import check_callable, check_int
from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape._core.vectors import resolve_params
from lightning_landscape.curvature import hvp as _hvp

HVPMode = Literal["double_backward", "cached", "func"]


class LinearOperator:
    """A symmetric linear operator on flat vectors: ``matvec``, ``matmat``, ``@``, ``dim``,
    ``dtype``, ``device``. Subclasses implement :meth:`_matmat` on a ``(k, dim)`` block.

    What the algorithms read from an operator, and nothing else:

    Attributes:
        dim, dtype, device: the vectors' length, dtype and device.
        distributed: True when the products are reduced across ranks (every rank must then
            take part in every product, and random seeds are broadcast so probes agree).
        num_matvecs: products so far (blocks count their columns).
        on_matvec: optional progress hook, called with ``num_matvecs`` after each block.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    distributed: bool = False

    def __init__(self) -> None:
        self.num_matvecs = 0
        self.on_matvec: Callable[[int], None] | None = None  # progress hook: total products so far

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``H v`` for a flat vector ``v`` of length ``dim``.

        Raises:
            ValueError: if ``v`` is not of shape ``(dim,)``.
        """
        if v.dim() != 1 or v.shape[0] != self.dim:
            raise ValueError(f"`v` must have shape ({self.dim},), got {tuple(v.shape)}.")
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``H V`` for a ``(dim, k)`` block (products batched where the kind allows).

        Raises:
            ValueError: if ``V`` is not of shape ``(dim, k)``.
        """
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"`V` must have shape ({self.dim}, k), got {tuple(V.shape)}.")
        out = self._matmat(V.T.to(dtype=self.dtype, device=self.device).contiguous())
        self.num_matvecs += V.shape[1]
        if self.on_matvec is not None:
            self.on_matvec(self.num_matvecs)
        return out.T

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matvec(other) if other.dim() == 1 else self.matmat(other)

    def _matmat(self, Vt: Tensor) -> Tensor:  # (k, dim) -> (k, dim)
        raise NotImplementedError


class MatrixOperator(LinearOperator):
    """Wrap a dense symmetric matrix as an operator (for tests and small problems).

    Raises:
        ValueError: if ``matrix`` is not a square 2-D tensor.

    Example::

        op = MatrixOperator(Q @ torch.diag(eigs) @ Q.T)
    """

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        if (
            not isinstance(matrix, Tensor)
            or matrix.dim() != 2
            or matrix.shape[0] != matrix.shape[1]
        ):
            raise ValueError("`matrix` must be a square 2-D tensor.")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matmat(self, Vt: Tensor) -> Tensor:
        return Vt @ self.matrix.T


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
        hvp: the kind of Hessian-vector product. ``"cached"`` (default, the fastest measured:
            1.3x / 2.0-2.3x a gradient on 2.4k / 405k-parameter MLPs on CPU, against 2.9x / 3.2x
            for double backward and 8.6x / 4.1x for ``"func"``, ``benchmarks/curvature.py``): the gradient graph of every batch
            is built at the first product (about 3 gradients) and kept, then each product is one
            backward through it; it holds the activations of all the batches until
            :meth:`release` (or the end of a ``with`` block, or the operator's deletion), and is
            rebuilt if the parameters change in place or a module switches train/eval.
            ``"double_backward"`` (Pearlmutter): the gradient graph is built afresh for each
            product, memory of one batch at a time. ``"func"``: torch.func forward-over-reverse
            ``jvp(grad)`` (``vjp(grad)`` where that raises, e.g. on ``F.mse_loss``); needs
            ``params`` to be the ``nn.Module`` that ``loss_fn`` calls; slow on small models
            unless products come in blocks.
        seed: seed for any randomness in the forward (dropout in train mode): the same masks
            are replayed for every product, so the operator is a fixed matrix. The global RNG
            is left untouched.

    Raises:
        TypeError: if ``loss_fn`` or ``batch_size_fn`` is not callable, ``params``/``batches``
            have the wrong type, or ``seed`` is not an int.
        ValueError: if ``batches`` is empty, ``hvp`` is unknown, ``hvp="func"`` is asked without
            a module, ``params`` is empty or holds a tensor that does not require grad, or a
            batch size is not positive (or cannot be inferred).

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
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_callable("loss_fn", loss_fn)
        if hvp not in ("double_backward", "cached", "func"):
            raise ValueError(f"`hvp` must be 'double_backward', 'cached' or 'func', got {hvp!r}.")
        if isinstance(batches, Tensor) or not isinstance(batches, Sequence):
            raise TypeError(
                f"`batches` must be a sequence of batches, got {type(batches).__name__}."
            )
        if len(batches) == 0:
            raise ValueError("`batches` is empty.")
        check_int("seed", seed)
        check_callable("batch_size_fn", batch_size_fn, allow_none=True)
        self.module = params if isinstance(params, nn.Module) else None
        if hvp == "func" and self.module is None:
            raise ValueError(
                "`hvp='func'` needs `params` to be the nn.Module that `loss_fn` calls."
            )
        self.params = resolve_params(params)
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.hvp = hvp
        self.seed = int(seed)
        self.distributed = is_distributed(distributed)
        self._size_fn = batch_size_fn or default_batch_size
        self.batch_sizes = [int(self._size_fn(b)) for b in self.batches]
        for i, n in enumerate(self.batch_sizes):
            if n < 1:
                raise ValueError(f"batch {i} has size {n}; sizes must be positive.")
        first = self.params[0]
        self.dtype = first.dtype
        self.device = first.device
        self.dim = sum(p.numel() for p in self.params)
        total = torch.tensor(
            [float(sum(self.batch_sizes))], dtype=torch.float64, device=self.device
        )
        self.total_size = float(all_reduce_sum_(total, self.distributed).item())
        self._cache: Tensor | None = None
        self._cache_key: tuple = ()
        self._forward_over_reverse = True

    @property
    def local_size(self) -> int:
        """Number of samples on this rank."""
        return sum(self.batch_sizes)

    def _matmat(self, Vt: Tensor) -> Tensor:
        if self.hvp == "func" and self._forward_over_reverse:
            try:
                return self._products(Vt)
            except RuntimeError as err:  # jvp(grad(F.mse_loss)) raises in torch 2.13
                if "ZeroTensor" not in str(err):
                    raise
                self._forward_over_reverse = False  # and start over: same masks, same RNG
        return self._products(Vt)

    def _products(self, Vt: Tensor) -> Tensor:
        acc = torch.zeros_like(Vt)
        if self.hvp == "cached":
            if self._cache is not None and self._cache_key != self._key():
                self._cache = None  # parameters updated in place, or train/eval switched
            if self._cache is None:
                with _hvp.guard(self.module, self.params, self.seed):
                    self._cache_key = self._key()
                    # one tensor Σ n_b ∇L_b holding every batch's graph: one backward a product
                    self._cache = sum(
                        n * _hvp.gradient_graph(self.loss_fn, self.params, b)
                        for n, b in zip(self.batch_sizes, self.batches, strict=True)
                    )
            # A block is one vmapped backward; on CPU that pays only for small models (per
            # product, 0.75x against 1.29x a gradient at 2.4k parameters, 2.6x against 1.8x at
            # 400k: benchmarks/curvature.py), so larger ones take the columns one by one.
            step = len(Vt) if self.device.type != "cpu" or self.dim <= 5000 else 1
            for lo in range(0, len(Vt), step):
                acc[lo : lo + step] = _hvp.hvp_from_graph(
                    self._cache, self.params, Vt[lo : lo + step]
                )
        else:
            with _hvp.guard(self.module, self.params, self.seed):
                for n, batch in zip(self.batch_sizes, self.batches, strict=True):
                    if self.hvp == "func":
                        product = _hvp.hvp_func(
                            self.loss_fn,
                            self.params,
                            batch,
                            Vt,
                            self.module,
                            forward_over_reverse=self._forward_over_reverse,
                        )
                    else:
                        product = _hvp.hvp_double_backward(self.loss_fn, self.params, batch, Vt)
                    acc.add_(product, alpha=n)
        all_reduce_sum_(acc, self.distributed)
        return acc.div_(self.total_size)

    def _key(self) -> tuple:
        """What the cached graphs depend on: parameter versions and train/eval flags."""
        flags = tuple(m.training for m in self.module.modules()) if self.module is not None else ()
        return tuple(p._version for p in self.params), flags

    def release(self) -> None:
        """Free the cached gradient graphs (``hvp="cached"``); the next product rebuilds them."""
        self._cache = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def gradient(self) -> Tensor:
        """The gradient of the batch-averaged loss, reduced across ranks (a flat vector)."""
        with _hvp.guard(self.module, self.params, self.seed):
            return mean_gradient(
                self.loss_fn,
                self.params,
                self.batches,
                batch_size_fn=self._size_fn,
                distributed=self.distributed,
            )[1]
