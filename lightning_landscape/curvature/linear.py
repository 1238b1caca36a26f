"""Linear operators on flat vectors: the interface every algorithm reads, and a dense wrapper.

An algorithm (Lanczos, trace, density) sees an operator only through ``matvec``/``matmat``/``@``,
``dim``, ``dtype``, ``device``, ``distributed`` and ``product_error``, so a dense matrix, the
Hessian of a training loss (:class:`~.operator.HessianOperator`) or any user operator serve alike
(hessian-eigenthings' ``LambdaOperator``, curvlinops' ``PyTorchLinearOperator``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class LinearOperator:
    """A symmetric linear operator on flat vectors: ``matvec``, ``matmat``, ``@``, ``dim``,
    ``dtype``, ``device``. Subclasses implement :meth:`_matmat` on a ``(k, dim)`` block, and
    return a block of their own (the algorithms may write into it: the trace computes its
    residual there, when the block is a plain tensor not sharing the input's storage).

    What the algorithms read from an operator, and nothing else:

    Attributes:
        dim, dtype, device: the vectors' length, dtype and device.
        distributed: True when the products are reduced across ranks (every rank must then
            take part in every product, and random seeds are broadcast so probes agree).
        num_matvecs: products so far (blocks count their columns).
        on_matvec: optional progress hook, called with ``num_matvecs`` after each block.
        product_error: estimated relative error of a product (0 for exact products; finite
            differences estimate theirs, NaN before the first product).
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    distributed: bool = False
    product_error: float = 0.0

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


def writable(out: Tensor, other: Tensor) -> bool:
    """Whether a product block may be overwritten: a plain contiguous tensor outside autograd
    that shares no storage with ``other`` (an operator returning its input, say)."""
    plain = out.is_contiguous() and not out.requires_grad and not out.is_inference()
    return plain and out.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()


class MatrixOperator(LinearOperator):
    """Wrap a dense symmetric matrix as an operator (for tests and small problems).

    Raises:
        ValueError: if ``matrix`` is not a square 2-D tensor, is complex, or is not symmetric
            (beyond 1000 round-offs of its largest entry, at most 1 %: Lanczos would return
            numbers that are no eigenvalues, silently).

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
        if matrix.is_complex():  # the estimators work in a real vector space
            raise ValueError(f"`matrix` must be real, got {matrix.dtype}.")
        # (a matrix with NaN passes: its products report it)
        if matrix.is_floating_point() and matrix.numel() and bool(torch.isfinite(matrix).all()):
            gap, top = float((matrix - matrix.T).abs().amax()), float(matrix.abs().amax())
            if not gap <= min(1000 * torch.finfo(matrix.dtype).eps, 1e-2) * top:
                raise ValueError(
                    f"`matrix` must be symmetric: it differs from its transpose by {gap:.3g} "
                    f"(largest entry {top:.3g})."
                )
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def _matmat(self, Vt: Tensor) -> Tensor:
        return Vt @ self.matrix.T
