"""An orthonormal basis that grows as a Krylov method runs, stored in chunks.

A Lanczos run of m steps needs its m basis vectors (full reorthogonalization, Ritz vectors, the
deflation subspace of the trace), but how many steps it will take is known only at the end. The
basis therefore grows by chunks of a few vectors and is never allocated for ``max_steps`` up
front: after j steps it holds at most j + ``chunk`` − 1 vectors per chain (``chunk`` · P is kept
under about 16 M numbers, so for large models a chunk is one vector). It may live in host memory
(``device="cpu"``) while products run on an accelerator, for models where k · P does not fit the
device; projections are then computed on the host and only P-sized vectors cross the bus.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_CHUNK_NUMBERS = 1 << 24  # one chunk holds at most this many numbers (or one vector per chain)


def _same(partial: Tensor) -> Tensor:
    return partial


class Basis:
    """Orthonormal rows of ``b`` chains, ``(b, j, dim)`` in chunks on ``device``.

    Args:
        chains: number of independent chains ``b``.
        dim: length of a vector.
        dtype: the vectors' dtype.
        device: where the vectors are kept (the products may run elsewhere).
        chunk: vectors per chunk; default the most that keeps a chunk under 2^24 numbers (1 to 16).
        reduce: turns partial inner products into whole ones (the operator's
            :meth:`~lightning_landscape._core.space.Space.reduce`: an all-reduce when the vectors
            are this rank's shards); default none.

    Memory: ``b · (j + chunk − 1) · dim`` numbers after ``j`` vectors.
    """

    def __init__(
        self,
        chains: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        chunk: int | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.chains, self.dim, self.dtype = chains, dim, dtype
        self.reduce = reduce or _same
        self.device = torch.device(device)
        self.chunk = chunk or max(1, min(16, _CHUNK_NUMBERS // max(1, chains * dim)))
        self._chunks: list[Tensor] = []
        self._len = 0

    @classmethod
    def from_rows(cls, rows: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Basis:
        """One chain whose basis is the orthonormal rows of a ``(j, dim)`` tensor (not copied)."""
        out = cls(
            1, rows.shape[1], rows.dtype, rows.device, chunk=max(1, rows.shape[0]), reduce=reduce
        )
        out._chunks, out._len = [rows[None]], rows.shape[0]
        return out

    def __len__(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        """Vectors per chain allocated so far."""
        return sum(c.shape[1] for c in self._chunks)

    def _filled(self) -> list[Tensor]:
        """The chunks, the last one cut to the vectors written."""
        out, left = [], self._len
        for c in self._chunks:
            out.append(c[:, : min(left, c.shape[1])])
            left -= out[-1].shape[1]
        return [c for c in out if c.shape[1] > 0]

    def append(self, q: Tensor) -> None:
        """Add one ``(b, dim)`` vector per chain (a new chunk is allocated when the last is full)."""
        if self._len == self.capacity:
            self._chunks.append(
                torch.empty(self.chains, self.chunk, self.dim, dtype=self.dtype, device=self.device)
            )
        last = self._chunks[-1]
        last[:, self._len - (self.capacity - last.shape[1])] = q.to(self.device, self.dtype)
        self._len += 1

    def orthogonalize(self, w: Tensor, passes: int = 2) -> Tensor:
        """``(I − QQᵀ) w`` per chain for a ``(b, dim)`` block, on ``w``'s device: classical
        Gram-Schmidt ``passes`` times ("twice is enough"), computed where the basis lives."""
        if self._len == 0:
            return w
        x = w.to(self.device, self.dtype)
        chunks = self._filled()
        for _ in range(passes):
            coef = [self.reduce(torch.einsum("bjd,bd->bj", c, x)) for c in chunks]
            for c, a in zip(chunks, coef, strict=True):
                x = x - torch.einsum("bjd,bj->bd", c, a)
        return x.to(w.device, w.dtype)

    def coefficients(self, X: Tensor, chain: int = 0) -> Tensor:
        """``Qᵀ X``: the ``(j, k)`` coefficients of a ``(dim, k)`` block, on ``X``'s device."""
        Xb = X.to(self.device, self.dtype)
        out = [c[chain] @ Xb for c in self._filled()]
        if not out:
            return X.new_zeros(0, X.shape[1])
        return self.reduce(torch.cat(out)).to(X.device)

    def combine(self, C: Tensor, chain: int = 0, device: torch.device | None = None) -> Tensor:
        """``Q C``: the ``(dim, k)`` combination of the basis with ``(j, k)`` coefficients, on
        ``device`` (default the basis's own)."""
        Cb = C.to(self.device, self.dtype)
        out = torch.zeros(self.dim, C.shape[1], dtype=self.dtype, device=self.device)
        start = 0
        for c in self._filled():
            n = c.shape[1]
            out += c[chain].T @ Cb[start : start + n]
            start += n
        return out.to(device or self.device)

    def tensor(self) -> Tensor:
        """The whole basis as one ``(b, j, dim)`` tensor (a copy, unless it is one chunk)."""
        chunks = self._filled()
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            return torch.empty(self.chains, 0, self.dim, dtype=self.dtype, device=self.device)
        return torch.cat(chunks, dim=1)


def check_basis_device(value: object) -> torch.device | None:
    """The ``basis_device`` argument as a ``torch.device`` (``None`` passes: the operator's).

    Raises:
        TypeError: if it is not ``None``, a string or a ``torch.device``.
        ValueError: if the string names no device.
    """
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise TypeError(f"`basis_device` must be None, a string or a torch.device, got {value!r}.")
    try:
        return torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"`basis_device` must name a device, got {value!r}.") from err
