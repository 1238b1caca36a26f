"""Batches and batch-weighted means over fixed batches, reduced across ranks.

Every mean here is Σ_b n_b f_b / Σ_b n_b over this rank's batches and then over all ranks (sums
and counts are all-reduced, never means), so a multi-rank answer equals the single-process answer
on the union of the shards. Gradients go through ``torch.autograd.grad``: ``.grad`` is never
touched.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.checks import check_loss
from lightning_landscape._core.distributed import all_reduce_sum_
from lightning_landscape._core.vectors import flatten


def default_batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor, searched depth-first
    through tuples, lists, dicts, named tuples and dataclass instances (their fields in order).

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


def _is_dataclass_instance(obj: Any) -> bool:
    """Whether ``obj`` is an instance of a dataclass (not the class itself)."""
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj if obj.dim() > 0 else None
    if _is_dataclass_instance(obj):  # an init=False field never set is skipped
        obj = [getattr(obj, f.name, None) for f in dataclasses.fields(obj)]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, list | tuple):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_sizes(
    batches: Sequence[Any], batch_size_fn: Callable[[Any], int] | None = None
) -> list[int]:
    """The size of each batch (``batch_size_fn`` or :func:`default_batch_size`).

    Raises:
        ValueError: if a size is not a positive whole number (or cannot be inferred).
    """
    size_fn = batch_size_fn or default_batch_size
    sizes = [size_fn(b) for b in batches]
    for i, n in enumerate(sizes):
        if isinstance(n, float) and not n.is_integer():  # 2.5 was truncated to 2
            raise ValueError(f"`batch_size_fn` gave batch {i} the size {n}: not a whole number.")
        if int(n) < 1:
            raise ValueError(f"batch {i} has size {n}; sizes must be positive.")
    return [int(n) for n in sizes]


def flat_grad(
    loss: Tensor,
    params: Sequence[Tensor],
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> Tensor:
    """Flat gradient of ``loss`` (:func:`~.checks.check_loss`); parameters the loss does not
    reach get zeros."""
    grads = torch.autograd.grad(
        check_loss(loss),
        params,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
    )
    return flatten(
        [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    )


def mean_gradient(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batches: Sequence[Any],
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
    distributed: bool = True,
) -> tuple[float, Tensor]:
    """The batch-weighted mean loss Σ n_b L_b / Σ n_b and its flat gradient over all ranks (one
    all-reduce of sums and counts)."""
    dim = sum(p.numel() for p in params)
    acc = torch.zeros(dim + 2, dtype=params[0].dtype, device=params[0].device)
    with torch.enable_grad():
        for n, batch in zip(batch_sizes(batches, batch_size_fn), batches, strict=True):
            loss = loss_fn(batch)
            acc[:dim].add_(flat_grad(loss, params), alpha=n)
            acc[dim] += n * loss.detach()
            acc[dim + 1] += n
    all_reduce_sum_(acc, distributed)
    total = acc[dim + 1]
    return float(acc[dim] / total), acc[:dim] / total


@torch.no_grad()
def mean_value(
    fn: Callable[[Any], Tensor],
    batches: Sequence[Any],
    *,
    batch_size_fn: Callable[[Any], int] | None = None,
    distributed: bool = True,
) -> float:
    """Σ_b n_b fn(b) / Σ_b n_b over all ranks' batches (a loss or a metric such as accuracy)."""
    acc = torch.zeros(2, dtype=torch.float64)
    for n, batch in zip(batch_sizes(batches, batch_size_fn), batches, strict=True):
        acc[0] += n * float(fn(batch))
        acc[1] += n
    all_reduce_sum_(acc, distributed)
    return float(acc[0] / acc[1])


def split_batch(batch: Any, n: int, piece: int) -> list[Any]:
    """``batch`` cut into ⌈n / piece⌉ consecutive pieces of near-equal sizes (at most ``piece``
    samples each): every tensor whose leading size is ``n`` is sliced (views, no copies); tuples,
    lists, dicts, named tuples and dataclass instances are rebuilt around the slices; everything
    else is shared by all pieces.

    A dataclass instance is rebuilt by :func:`dataclasses.replace` with its ``init`` fields
    sliced; its ``init=False`` fields are not sliced: they get what the class's ``__init__`` and
    ``__post_init__`` give them (a default, a value derived from the sliced fields), and where
    those give none, the batch's own value. Where the class refuses to be rebuilt so (a custom
    ``__init__``, a ``__post_init__`` that raises), each piece is a shallow copy with the sliced
    fields set and the ``init=False`` fields as they are."""
    k = -(-n // piece)
    cuts = [i * n // k for i in range(k + 1)]
    return [_slice(batch, n, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]


def _slice(obj: Any, n: int, lo: int, hi: int) -> Any:
    if isinstance(obj, Tensor):
        return obj[lo:hi] if obj.dim() > 0 and obj.shape[0] == n else obj
    if _is_dataclass_instance(obj):
        return _slice_dataclass(obj, n, lo, hi)
    if isinstance(obj, Mapping):
        items = {k: _slice(v, n, lo, hi) for k, v in obj.items()}
        try:
            return type(obj)(items)
        except TypeError:  # a mapping built otherwise (a defaultdict): a copy, updated
            out = copy.copy(obj)
            out.update(items)  # type: ignore[attr-defined]
            return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_slice(v, n, lo, hi) for v in obj))
    if isinstance(obj, list | tuple):
        return type(obj)(_slice(v, n, lo, hi) for v in obj)
    return obj


def _slice_dataclass(obj: Any, n: int, lo: int, hi: int) -> Any:
    names = [f.name for f in dataclasses.fields(obj) if f.init and hasattr(obj, f.name)]
    sliced = {name: _slice(getattr(obj, name), n, lo, hi) for name in names}
    try:
        out = dataclasses.replace(obj, **sliced)
    except Exception:  # noqa: BLE001 - a class that cannot be rebuilt from its fields: a copy
        out = copy.copy(obj)
        for name, value in sliced.items():
            object.__setattr__(out, name, value)  # frozen dataclasses too
        return out
    for f in dataclasses.fields(obj):  # set after construction (no default): the original's
        if not f.init and hasattr(obj, f.name) and not hasattr(out, f.name):
            object.__setattr__(out, f.name, getattr(obj, f.name))
    return out
