"""Small helpers shared by the curvature engine: parameters, flat vectors, batch sizes, seeds."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape.curvature.distributed import broadcast_int


def resolve_params(params: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    """Return the list of tensors a curvature quantity is taken with respect to.

    Args:
        params: an ``nn.Module`` (its parameters with ``requires_grad``) or an iterable of
            tensors that require grad.

    Raises:
        TypeError: if ``params`` is neither, or holds something that is not a tensor.
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
    return out


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector (or a batch ``(k, d)`` of them) into views shaped like ``like``."""
    lead = vec.shape[:-1]
    chunks = torch.split(vec, [t.numel() for t in like], dim=-1)
    return [c.reshape(*lead, *t.shape) for c, t in zip(chunks, like, strict=True)]


def default_batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor (searched depth-first).

    Raises:
        ValueError: if the batch holds no tensor with at least one dimension.
    """
    found = _first_tensor(batch)
    if found is None:
        raise ValueError(
            "cannot infer the batch size: the batch holds no tensor with a leading dimension; "
            "pass `batch_size_fn`."
        )
    return int(found.shape[0])


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj if obj.dim() > 0 else None
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def resolve_seed(seed: int | None, distributed: bool = True) -> int:
    """A seed identical on every rank: ``seed`` itself, or a fresh one (from ``os.urandom``, so
    the global torch RNG is never consumed), broadcast from rank 0 when ``distributed`` (the
    operator's own flag: an operator that does not reduce across ranks may run on one rank
    only, where a broadcast would wait forever).

    Raises:
        TypeError: if ``seed`` is neither an int nor None.
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int or None, got {seed!r}.")
        return seed
    fresh = int.from_bytes(os.urandom(7), "little")
    return broadcast_int(fresh) if distributed else fresh


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator with the given seed (probes are drawn on CPU, then moved: identical
    on every rank and every device)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def rademacher(shape: tuple[int, ...], gen: torch.Generator, dtype, device) -> Tensor:
    """Random ±1 entries."""
    bits = torch.randint(0, 2, shape, generator=gen, dtype=torch.int8)
    return (bits.to(dtype) * 2 - 1).to(device)


def gaussian(shape: tuple[int, ...], gen: torch.Generator, dtype, device) -> Tensor:
    """Standard normal entries drawn in float64 on CPU (identical everywhere), then cast."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is a positive int."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a positive int, got {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
