"""Parameters and flat vectors: what a curvature or landscape quantity is taken with respect to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


def resolve_params(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    """Return the list of tensors a curvature quantity is taken with respect to.

    Args:
        params: an ``nn.Module`` (its parameters with ``requires_grad``) or an iterable of
            tensors that require grad.

    Raises:
        TypeError: if ``params`` is neither, or holds something that is not a tensor, or a
            complex tensor (:func:`check_real`).
        ValueError: if it is empty or a tensor does not require grad.
    """
    if isinstance(params, nn.Module):
        out = [p for p in params.parameters() if p.requires_grad]
    elif isinstance(params, Tensor):
        raise TypeError(
            "`params` must be an nn.Module or a sequence of tensors, got a single Tensor; "
            "wrap it in a list."
        )
    elif isinstance(params, Iterable):
        out = list(params)
        for i, p in enumerate(out):
            if not isinstance(p, Tensor):
                raise TypeError(f"`params[{i}]` must be a torch.Tensor, got {type(p).__name__}.")
            if not p.requires_grad:
                raise ValueError(f"`params[{i}]` does not require grad.")
    else:
        raise TypeError(
            f"`params` must be an nn.Module or a sequence of tensors, got {type(params).__name__}."
        )
    if not out:
        raise ValueError("`params` holds no trainable tensor.")
    check_real(out)
    return out


def check_real(params: Sequence[Tensor]) -> None:
    """Refuse complex parameters (Fourier neural operators' spectral weights, say).

    Raises:
        TypeError: naming the first complex tensor: the estimators work in a real vector space,
            and a complex tensor would be flattened into a complex vector (whose Lanczos is not
            the real Hessian's) or cast to real (losing its imaginary part).
    """
    for i, p in enumerate(params):
        if p.is_complex():
            raise TypeError(
                f"`params[{i}]` is complex ({p.dtype}, shape {tuple(p.shape)}): the curvature and "
                "landscape estimators take real parameters only; hold the real and imaginary "
                "parts as two real parameters (torch.complex(re, im) in the forward) to measure "
                "this model."
            )


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector (or a batch ``(k, d)`` of them) into views shaped like ``like``."""
    lead = vec.shape[:-1]
    chunks = torch.split(vec, [t.numel() for t in like], dim=-1)
    return [c.reshape((*lead, *t.shape)) for c, t in zip(chunks, like, strict=True)]


class ParamVector:
    """A list of parameter tensors seen as one flat vector, with bit-exact save and restore.

    Args:
        params: the tensors (e.g. a module's trainable parameters).

    Example::

        pv = ParamVector(list(model.parameters()))
        with pv.moved_to(pv.get() + delta):
            loss = ...
        # parameters are bit for bit what they were (restored from a saved copy)
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        check_real(self.params)
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def get(self) -> Tensor:
        """A flat copy of the current values."""
        return flatten([p.detach() for p in self.params]).clone()

    @torch.no_grad()
    def set_(self, flat: Tensor) -> None:
        """Write a flat vector into the parameters."""
        for p, v in zip(self.params, unflatten(flat.to(self.dtype), self.params), strict=True):
            p.copy_(v)

    @contextlib.contextmanager
    def moved_to(self, flat: Tensor) -> Iterator[None]:
        """Temporarily set the parameters to ``flat``; restore the saved copy afterwards."""
        saved = [p.detach().clone() for p in self.params]
        try:
            self.set_(flat)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)
