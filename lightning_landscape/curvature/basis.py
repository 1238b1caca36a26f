"""An orthonormal basis that grows as a Krylov method runs, stored in chunks.

A Lanczos run of m steps needs its m basis vectors (full reorthogonalization, Ritz vectors, the
deflation subspace of the trace), but how many steps it will take is known only at the end. The
basis therefore grows by chunks of a few vectors and is never allocated for ``max_steps`` up
front: after j steps it holds at most j + ``chunk`` − 1 vectors per chain (``chunk`` · P is kept
under about 16 M numbers, so for large models a chunk is one vector). It may live in host memory
(``device="cpu"``) while products run on an accelerator, for models where k · P does not fit the
device; projections are then computed on the host and only P-sized vectors cross the bus. Or it
may spill: its first chunks on the device up to a number of bytes, the later ones in host memory
(``spill="cpu"``, the ``basis_device="auto"`` of the algorithms), so that a short run keeps the
device's speed and a long one the device's memory.
"""

from __future__ import annotations

import math
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
        spill: where the chunks go once those on ``device`` would exceed ``device_bytes`` (host
            memory, pinned when ``device`` is a GPU); default none: all on ``device``.
        device_bytes: the most bytes of chunks on ``device`` when ``spill`` is set, a number or a
            callable read when a chunk is allocated (a budget known only after the first product).

    Memory: ``b · (j + chunk − 1) · dim`` numbers after ``j`` vectors, on ``device`` up to
    ``device_bytes`` and on ``spill`` past them. Projections are computed where each chunk lives;
    a spilled part costs two P-vector transfers per projection (the vector there, its correction
    back) and a pass over those chunks in host memory.
    """

    def __init__(
        self,
        chains: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        chunk: int | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        spill: torch.device | str | None = None,
        device_bytes: float | Callable[[], float] = math.inf,
    ) -> None:
        self.chains, self.dim, self.dtype = chains, dim, dtype
        self.reduce = reduce or _same
        self.device = torch.device(device)
        self.spill = None if spill is None else torch.device(spill)
        self._device_bytes = device_bytes
        self.chunk = chunk or max(1, min(16, _CHUNK_NUMBERS // max(1, chains * dim)))
        self._chunks: list[Tensor] = []
        self._on_device = 0  # the first chunks, on ``device``; the others on ``spill``
        self._len = 0

    @classmethod
    def from_rows(cls, rows: Tensor, reduce: Callable[[Tensor], Tensor] | None = None) -> Basis:
        """One chain whose basis is the orthonormal rows of a ``(j, dim)`` tensor (not copied)."""
        out = cls(
            1, rows.shape[1], rows.dtype, rows.device, chunk=max(1, rows.shape[0]), reduce=reduce
        )
        out._chunks, out._len, out._on_device = [rows[None]], rows.shape[0], 1
        return out

    def __len__(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        """Vectors per chain allocated so far."""
        return sum(c.shape[1] for c in self._chunks)

    @property
    def spilled(self) -> int:
        """Vectors per chain allocated on the ``spill`` device (0 without one)."""
        return sum(c.shape[1] for c in self._chunks[self._on_device :])

    @property
    def held(self) -> int:
        """Bytes of the chunks allocated on ``device`` (the spilled ones excluded)."""
        size = torch.finfo(self.dtype).bits // 8 * self.chains * self.dim
        return size * sum(c.shape[1] for c in self._chunks[: self._on_device])

    def spill_to(self, keep: float = 0.0) -> None:
        """Move the chunks on ``device`` to ``spill``, the last first, until at most ``keep``
        bytes of them are left there (nothing moves without ``spill``). The moved part is then
        projected on the host: two transfers of the projected block and a pass over those
        chunks in host memory per projection; later chunks go to ``spill`` too."""
        if self.spill is None:
            return
        pin = self.device.type == "cuda" and self.spill.type == "cpu"
        while self._on_device > 0 and self.held > keep:
            i = self._on_device - 1
            c = self._chunks[i]
            moved = torch.empty(c.shape, dtype=c.dtype, device=self.spill, pin_memory=pin)
            self._chunks[i] = moved.copy_(c)
            del c  # freed on the device before the next chunk moves
            self._on_device = i

    def _new_chunk(self) -> Tensor:
        """The next chunk: on ``device`` while the chunks there stay within ``device_bytes``,
        then (and every later chunk) on ``spill``."""
        shape = (self.chains, self.chunk, self.dim)
        size = torch.finfo(self.dtype).bits // 8 * self.chains * self.chunk * self.dim
        if self.spill is not None and (
            self._on_device < len(self._chunks) or size * (self._on_device + 1) > self._limit()
        ):
            pin = self.device.type == "cuda" and self.spill.type == "cpu"
            return torch.empty(shape, dtype=self.dtype, device=self.spill, pin_memory=pin)
        self._on_device += 1
        return torch.empty(shape, dtype=self.dtype, device=self.device)

    def _limit(self) -> float:
        return self._device_bytes() if callable(self._device_bytes) else self._device_bytes

    def _home(self, x: Tensor) -> torch.device:
        """Where a vector is projected: its own device when chunks live there, else the first
        chunk's (a basis all on the host projects there: one transfer each way)."""
        devices = {c.device for c in self._chunks}
        return x.device if x.device in devices or not devices else self._chunks[0].device

    def _coefficients(self, chunks: list[Tensor], x: Tensor, equation: str) -> list[Tensor]:
        """Each chunk's inner products with ``x`` (on ``x``'s device), reduced together: one
        collective for the whole basis."""
        copies = {x.device: x}
        parts = []
        for c in chunks:
            if c.device not in copies:
                copies[c.device] = x.to(c.device)
            parts.append(torch.einsum(equation, c, copies[c.device]).to(x.device))
        whole = self.reduce(torch.cat(parts, dim=1 if equation.startswith("b") else 0))
        sizes = [c.shape[-2] for c in chunks]
        return list(torch.split(whole, sizes, dim=1 if equation.startswith("b") else 0))

    def _combination(self, chunks: list[Tensor], coef: list[Tensor], out: Tensor, eq: str) -> None:
        """``out += Σ chunk · coef``: summed into ``out`` for the chunks on its device, and once
        on each other device, then moved (one transfer)."""
        elsewhere: dict[torch.device, Tensor] = {}
        for c, a in zip(chunks, coef, strict=True):
            if c.device == out.device:  # multiplied and added in place: no block besides out
                a = a.to(c.device)
                if eq == "jd,jk->dk":
                    out.addmm_(c.T, a)
                else:  # "bjd,bj->bd", chain by chain
                    out.unsqueeze(1).baddbmm_(a.unsqueeze(1), c)
                continue
            term = torch.einsum(eq, c, a.to(c.device))
            if c.device in elsewhere:
                elsewhere[c.device].add_(term)
            else:
                elsewhere[c.device] = term
        for part in elsewhere.values():
            out.add_(part.to(out.device))

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
            self._chunks.append(self._new_chunk())
        last = self._chunks[-1]
        last[:, self._len - (self.capacity - last.shape[1])] = q.to(last.device, self.dtype)
        self._len += 1

    def orthogonalize(self, w: Tensor, passes: int = 2) -> Tensor:
        """``(I − QQᵀ) w`` per chain for a ``(b, dim)`` block, on ``w``'s device: classical
        Gram-Schmidt ``passes`` times ("twice is enough"), each chunk's part computed where the
        chunk lives."""
        if self._len == 0:
            return w
        x = w.to(self._home(w), self.dtype)
        x = x.clone() if x is w else x  # the caller's vector is left as it is
        chunks = self._filled()
        for _ in range(passes):  # all coefficients first (classical), then x -= Q coef in place
            coef = self._coefficients(chunks, x, "bjd,bd->bj")
            self._combination(chunks, [a.neg() for a in coef], x, "bjd,bj->bd")
        return x.to(w.device, w.dtype)

    def coefficients(self, X: Tensor, chain: int = 0) -> Tensor:
        """``Qᵀ X``: the ``(j, k)`` coefficients of a ``(dim, k)`` block, on ``X``'s device."""
        chunks = [c[chain] for c in self._filled()]
        if not chunks:
            return X.new_zeros(0, X.shape[1])
        Xb = X.to(self._home(X), self.dtype)
        return torch.cat(self._coefficients(chunks, Xb, "jd,dk->jk")).to(X.device)

    def combine(
        self,
        C: Tensor,
        chain: int = 0,
        device: torch.device | None = None,
        out: Tensor | None = None,
    ) -> Tensor:
        """``Q C``: the ``(dim, k)`` combination of the basis with ``(j, k)`` coefficients, on
        ``device`` (default the basis's own); with ``out`` (a ``(dim, k)`` block of the basis's
        dtype, a transposed view is fine), added into it in place and returned."""
        if out is None:
            where = torch.device(device) if device is not None else self.device
            out = torch.zeros(self.dim, C.shape[1], dtype=self.dtype, device=where)
        chunks = [c[chain] for c in self._filled()]
        coef = torch.split(C.to(self.dtype), [c.shape[0] for c in chunks])
        self._combination(chunks, list(coef), out, "jd,jk->dk")
        return out

    def tensor(self) -> Tensor:
        """The whole basis as one ``(b, j, dim)`` tensor on ``device`` (a copy, unless it is one
        chunk there)."""
        chunks = [c.to(self.device) for c in self._filled()]
        if len(chunks) == 1:
            return chunks[0]
        if not chunks:
            return torch.empty(self.chains, 0, self.dim, dtype=self.dtype, device=self.device)
        return torch.cat(chunks, dim=1)


def check_basis_device(value: object) -> torch.device | str | None:
    """The ``basis_device`` argument as a ``torch.device`` (``None``, the operator's device, and
    ``"auto"``, spilling to the host past the budget, pass as they are).

    Raises:
        TypeError: if it is not ``None``, a string or a ``torch.device``.
        ValueError: if the string names no device.
    """
    if (
        value is None
        or isinstance(value, torch.device)
        or (isinstance(value, str) and value == "auto")
    ):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f'`basis_device` must be None, "auto", a string or a torch.device, got {value!r}.'
        )
    try:
        return torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"`basis_device` must name a device, got {value!r}.") from err
