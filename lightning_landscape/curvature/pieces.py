"""Exact products on pieces of each batch, so that an exact product fits a memory budget.

An exact Hessian-vector product holds one batch's gradient graph and its second backward: on an
activation-heavy MLP 4.3 training steps (T) by itself, whatever the algorithm around it. For a
loss that is a mean over independent samples (a mean-reduced loss of a model in eval mode: no
batch statistics, no dropout), the Hessian of a batch of n samples is the size-weighted mean of
the Hessians of its pieces, H_b = Σ_i n_i H_i / n, so the operator, which already weights batches
by their sizes (Σ_b n_b H_b / Σ_b n_b), can take the pieces as its batches: the same matrix, with
the memory of a product divided by the number of pieces. On a GPU smaller pieces use the device
less well, so pieces are made only as small as the budget needs.

:func:`plan` decides the piece size once per operator: it measures the bytes autograd saves for
one gradient graph on a slice of the first batch (``saved_tensors_hooks``, parameters excluded),
scales them to the batch, and asks each product's working memory, :data:`PRODUCT_FACTOR` graphs
(the graph and its second backward's temporaries), to fit the budget. Before using pieces it
checks that the loss decomposes: the loss of every batch equals the size-weighted mean of its
pieces' losses (one forward each, without gradients where the loss allows). A loss over pairs of
samples (contrastive), a sum-reduced loss, a token-weighted mean over masks of different lengths
(in any batch), BatchNorm in train mode or dropout fail this check, and so does a batch the loss
refuses to cut (a time-first batch): their products run on whole batches. The check is exact
only on the fixed batches it sees, which are the ones every product uses. Under torch.distributed
all ranks take the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_landscape._core.batches import batch_sizes, flat_grad, split_batch
from lightning_landscape._core.checks import check_int, check_real
from lightning_landscape._core.distributed import all_reduce_max_
from lightning_landscape.curvature.cache import FLOOR, PRODUCT_FACTOR, SavedBytes, budget_bytes
from lightning_landscape.curvature.hvp import COLUMNS, guard

__all__ = ["COLUMNS", "FLOOR", "PRODUCT_FACTOR", "VECTOR_FACTOR", "Plan", "choose", "cut",
           "pieces_of", "plan", "split_batch", "split_batches"]  # fmt: skip

#: A vmapped product of k vectors on s samples takes about 1 + VECTOR_FACTOR · k gradient graphs
#: of s samples (k = 1: PRODUCT_FACTOR). Measured on CPU, peak over graph at k = 8 (MLP, CNN,
#: Transformer): forward-over-reverse 10.8, 12.0, 15.9; a vmapped backward through a kept graph
#: 5.9, 7.2, 9.2 above that graph.
VECTOR_FACTOR = 2.0
SLICE = 8  # the graph is measured on 1/SLICE of the first batch, then scaled
#: A gradient graph over its forward's saved bytes, measured: 1.8 (MLP), 1.86 (CNN), 2.1
#: (Transformer); used only where the loss refuses a slice of the batch.
GRAPH_OVER_FORWARD = 2.0


@dataclass(frozen=True)
class Plan:
    """How a product splits the batches.

    Attributes:
        piece: the largest number of samples one product's pass takes (0: whole batches).
        graph_bytes: the first batch's gradient graph, estimated (bytes).
        step_bytes: a training step, estimated: the first batch's forward activations plus
            2 P numbers (bytes).
        budget: the budget used (bytes).
        reason: one sentence for the operator's ``hvp_reason``.
        block_piece: the most samples one vmapped product of several vectors takes, where blocks
            need pieces smaller than ``piece`` (0: blocks run on the pieces, :meth:`width` vectors
            at a time).
        per_sample: one sample's gradient graph over the budget (NaN: not measured, no limit).
    """

    piece: int
    graph_bytes: float
    step_bytes: float
    budget: float
    reason: str
    block_piece: int = 0
    per_sample: float = math.nan

    def width(self, samples: int, kept: float = 0.0) -> int:
        """The most vectors one vmapped product on ``samples`` samples may take within the
        budget left beside ``kept`` bytes (graphs kept between products): 1 + VECTOR_FACTOR · k
        graphs fit (between 1 and :data:`COLUMNS`; all of them where nothing was measured)."""
        if not self.per_sample > 0:
            return COLUMNS
        left = 1 - kept / self.budget if self.budget > 0 else 1.0
        k = (left / (self.per_sample * max(samples, 1)) - 1) / VECTOR_FACTOR
        return int(min(COLUMNS, max(1, math.floor(k))))

    def cache_budget(self, requested: float | None) -> float | None:
        """The cached graphs' budget: the one requested, or by default one training step on a
        whole batch when batches are cut (a piece's forward would under-count it)."""
        if requested is not None or not self.piece or math.isnan(self.step_bytes):
            return requested
        return self.budget


def check_micro_batch_size(value: Any) -> None:
    """Refuse a ``micro_batch_size`` that is not a positive int, ``"auto"`` or None.

    Raises:
        TypeError: if it is not an int (bools refused), ``"auto"`` or None.
        ValueError: if it is an int below 1.
    """
    if value is None or (isinstance(value, str) and value == "auto"):
        return
    check_int("micro_batch_size", value, low=1, what="a positive int, 'auto' or None")


def check_memory_budget(value: Any) -> None:
    """Refuse a ``memory_budget`` that is not None, math.inf or a number of bytes >= 0.

    Raises:
        TypeError: if it is not a real number (bools refused) or None.
        ValueError: if it is negative or NaN.
    """
    if value is not None and not (value == math.inf):
        check_real("memory_budget", value, low=0.0, what="a number of bytes >= 0")


def split_batches(
    batches: Sequence[Any], sizes: Sequence[int], piece: int, size_fn: Callable[[Any], int]
) -> tuple[list[Any], list[int]]:
    """Every batch cut into pieces of at most ``piece`` samples, and the pieces' sizes.

    Raises:
        ValueError: if the pieces' sizes (by ``size_fn``) do not add up to their batch's.
    """
    pieces: list[tuple[int, Any]] = []
    for i, (n, batch) in enumerate(zip(sizes, batches, strict=True)):
        parts = pieces_of(batch, n, piece, size_fn)
        if sum(k for k, _ in parts) != n:
            raise ValueError(f"batch {i} cannot be cut into pieces along its leading dimension")
        pieces += parts
    return [b for _, b in pieces], [k for k, _ in pieces]


def choose(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batches: Sequence[Any],
    sizes: Sequence[int],
    size_fn: Callable[[Any], int],
    micro_batch_size: int | str | None,
    memory_budget: float | None,
    distributed: bool = False,
) -> Plan:
    """The operator's plan: pieces of ``micro_batch_size`` samples (None: whole batches), or with
    ``"auto"`` the :func:`plan` for ``memory_budget`` (0, nothing cached, plans for one
    training step)."""
    if micro_batch_size == "auto":
        budget = memory_budget or None
        return plan(loss_fn, params, batches, sizes, budget, size_fn, distributed)
    size = int(micro_batch_size or 0)
    reason = f"pieces of at most {size} samples (micro_batch_size)" if size else ""
    return Plan(size, math.nan, math.nan, math.nan, reason)


def cut(op: Any, what: str) -> None:
    """Plan the pieces of an operator's batches once, before its first product: set
    ``op.plan``, cut ``op.batches`` and ``op.batch_sizes``, and when whole batches stay above the
    budget warn through ``op.warn("whole_batches", ...)`` about ``what`` (its products). ``op``
    has the attributes of :class:`~.operator.HessianOperator` this reads (``loss_fn``,
    ``params``, ``module``, ``seed``, ``_size_fn``, ``micro_batch_size``, ``memory_budget``,
    ``distributed``).

    Raises:
        ValueError: if an explicit ``micro_batch_size`` meets batches that cannot be cut (then
            ``op`` is left unchanged).
    """
    with guard(op.module, op.params, op.seed):
        chosen = choose(
            op.loss_fn, op.params, op.batches, op.batch_sizes, op._size_fn,
            op.micro_batch_size, op.memory_budget, op.distributed,
        )  # fmt: skip
    if chosen.piece:
        op.batches, op.batch_sizes = split_batches(
            op.batches, op.batch_sizes, chosen.piece, op._size_fn
        )
    elif chosen.reason and not chosen.block_piece:
        op.warn("whole_batches", f"{what} on {chosen.reason}.")
    op.plan = chosen


def plan(
    loss_fn: Callable[[Any], Tensor],
    params: Sequence[Tensor],
    batches: Sequence[Any],
    sizes: Sequence[int],
    budget: float | None,
    size_fn: Callable[[Any], int],
    distributed: bool = False,
) -> Plan:
    """The piece size for products within ``budget`` bytes (None: :func:`~.cache.budget_bytes`,
    one training step, at least :data:`FLOOR` and a share of a GPU's free memory; math.inf:
    whole batches). Runs inside :func:`~.hvp.guard` (the forwards draw
    the products' masks). Under torch.distributed every rank takes the same decision (all-reduces
    of the largest graph per sample and batch, block piece and gap): cutting is exact on any
    rank, but a forward with collectives in it must run as often on every rank."""
    if budget is not None and math.isinf(budget):
        return Plan(0, math.nan, math.nan, math.inf, "")
    n = sizes[0]
    graph, step, failure = _estimate(loss_fn, params, batches[0], n, size_fn)
    limit = budget_bytes(budget, step, params[0].device, distributed)
    # the graph scales with the samples: the largest batch on any rank must fit
    ratio = graph / n / limit if limit > 0 else math.inf
    per_sample, top = _max([ratio, max(sizes)], distributed)
    largest = int(top)
    need = math.ceil(PRODUCT_FACTOR * per_sample * largest) if per_sample < math.inf else largest
    piece = 0 if need <= 1 else max(1, math.floor(1 / (PRODUCT_FACTOR * per_sample)))
    block = _block_piece(Plan(0, graph, step, limit, "", 0, per_sample), piece or largest)  # alike
    if not (piece or block):
        return Plan(0, graph, step, limit, "", 0, per_sample)
    gap = _gap(loss_fn, batches, sizes, piece, size_fn, failure, distributed, block)
    if gap < 0:  # every loss is non-finite: nothing to measure, nothing to cut
        return Plan(0, graph, step, limit, "", 0, per_sample)
    tol = min(1e3 * torch.finfo(params[0].dtype).eps, 2e-2)
    if gap > tol and block:  # blocks keep the pieces (fewer vectors at a time); check those
        block = 0
        gap = _gap(loss_fn, batches, sizes, piece, size_fn, failure, distributed) if piece else 0
    if gap > tol:
        cause = failure or "a piece's loss fails, or the pieces' sizes do not add up"
        why = (
            f"the batches cannot be cut along their leading dimension ({cause})"
            if math.isinf(gap)
            else "the loss is not a mean over independent samples (a batch's loss differs from "
            f"its pieces' mean by {gap:.2g}, relative)"
        )
        return Plan(0, graph, step, limit, (
            f"whole batches, above the memory budget: {why}, so its products take about "
            f"{PRODUCT_FACTOR * graph / 2**20:.3g} MiB over memory_budget {limit / 2**20:.3g} MiB"
        ), 0, per_sample)  # fmt: skip
    if not (piece or block):  # single products fit; blocks take fewer vectors at a time
        return Plan(0, graph, step, limit, "", 0, per_sample)
    parts = [f"pieces of at most {piece} sample{'s' if piece > 1 else ''}"] if piece else []
    parts += [f"blocks of vectors on pieces of at most {block}"] if block else []
    reason = (
        f"{' and '.join(parts)} (a product on a whole batch would take about "
        f"{PRODUCT_FACTOR * graph / 2**20:.3g} MiB; memory_budget {limit / 2**20:.3g} MiB)"
    )
    return Plan(piece, graph, step, limit, reason, block, per_sample)


def _block_piece(plan: Plan, whole: int) -> int:
    """The most samples one vmapped product of :data:`COLUMNS` vectors takes within the budget,
    when that is fewer than ``whole`` (the samples a single product takes), and no fewer than
    ``whole / COLUMNS`` (which keeps a block's passes as large as a single product's); 0 when
    the blocks fit on the pieces as they are."""
    if plan.width(whole) >= COLUMNS:
        return 0
    fit = math.floor(1 / (plan.per_sample * (1 + VECTOR_FACTOR * COLUMNS)))
    block = max(1, math.ceil(whole / COLUMNS), fit)
    return block if block < whole else 0


def _gap(
    loss_fn: Callable[[Any], Tensor], batches: Sequence[Any], sizes: Sequence[int], piece: int,
    size_fn: Callable[[Any], int], failure: str, distributed: bool, sub: int = 0,
) -> float:  # fmt: skip
    """The largest :func:`_decomposition_gap` over the batches and ranks (inf when the batches
    cannot be sliced; −1 when every loss is non-finite)."""
    gaps = [math.inf] if failure else [
        _decomposition_gap(loss_fn, b, k, piece, size_fn, sub)
        for k, b in zip(sizes, batches, strict=True)
    ]  # fmt: skip
    finite = [g for g in gaps if not math.isnan(g)]  # NaN: a non-finite loss, no objection
    return _max([max(finite) if finite else -1.0], distributed)[0]


def _max(values: Sequence[float], distributed: bool) -> list[float]:
    """The largest of each value over ranks (one all-reduce)."""
    out = all_reduce_max_(torch.tensor(list(values), dtype=torch.float64), distributed)
    return out.tolist()


def _estimate(
    loss_fn: Callable[[Any], Tensor], params: Sequence[Tensor], batch: Any, n: int, size_fn
) -> tuple[float, float, str]:
    """The gradient graph and the training step of ``batch`` (bytes), and why it cannot be
    sliced ("" when it can). The graph is measured on a slice of 1/:data:`SLICE` of the batch
    and scaled; where the loss refuses a slice, from the whole batch's forward
    (:data:`GRAPH_OVER_FORWARD` times its saved bytes, without building the graph)."""
    two_p = 2 * sum(p.numel() for p in params) * params[0].element_size()
    try:
        head = split_batch(batch, n, max(1, math.ceil(n / SLICE)))[0]
        forward, saved = _graph_bytes(loss_fn, params, head)
        scale = n / size_fn(head)
        return saved * scale, forward * scale + two_p, ""
    except Exception as err:  # noqa: BLE001 - e.g. a time-first batch: its loss refuses a slice
        with torch.enable_grad(), SavedBytes(exclude=params) as counter:
            loss_fn(batch)
        reason = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
        return GRAPH_OVER_FORWARD * counter.bytes, counter.bytes + two_p, reason


def _graph_bytes(
    loss_fn: Callable[[Any], Tensor], params: Sequence[Tensor], batch: Any
) -> tuple[int, int]:
    """Bytes autograd saves for ``batch``'s forward and for its gradient graph."""
    with torch.enable_grad(), SavedBytes(exclude=params) as counter:
        loss = loss_fn(batch)
        forward = counter.bytes
        flat_grad(loss, params, create_graph=True)
    return forward, counter.bytes


def _value(loss_fn: Callable[[Any], Tensor], batch: Any) -> float:
    """The loss of ``batch`` as a float, without gradients where the loss allows it (a loss
    that differentiates inside, a PINN residual or a gradient penalty, gets them, detached)."""
    try:
        with torch.no_grad():
            return float(loss_fn(batch).double())
    except RuntimeError:
        with torch.enable_grad():
            return float(loss_fn(batch).detach().double())


def _decomposition_gap(
    loss_fn: Callable[[Any], Tensor], batch: Any, n: int, piece: int, size_fn, sub: int = 0
) -> float:
    """|L(batch) − Σ n_i L(part_i) / n| / |L(batch)| for the batch cut as the products cut it:
    into pieces of at most ``piece`` samples (0: whole), each cut again into pieces of at most
    ``sub`` (0: not) for blocks. 0 when nothing is cut; inf when the batch cannot be cut or a
    part's loss fails; NaN when a loss is not finite."""
    try:
        parts = pieces_of(batch, n, piece, size_fn)
        if sub:
            parts = [q for k, p in parts for q in pieces_of(p, k, sub, size_fn)]
        if len(parts) == 1:
            return 0.0
        if sum(k for k, _ in parts) != n:
            return math.inf
        whole = _value(loss_fn, batch)
        mean = sum(k * _value(loss_fn, p) for k, p in parts) / n
    except Exception:  # noqa: BLE001 - a piece the loss refuses: the batch cannot be cut
        return math.inf
    if not (math.isfinite(whole) and math.isfinite(mean)):
        return math.nan
    return abs(whole - mean) / max(abs(whole), 1e-30)


def pieces_of(batch: Any, n: int, piece: int, size_fn: Callable) -> list[tuple[int, Any]]:
    """(size, part) of ``batch`` cut into pieces of at most ``piece`` samples (0: whole)."""
    if not piece or n <= piece:
        return [(n, batch)]
    parts = split_batch(batch, n, piece)
    return list(zip(batch_sizes(parts, size_fn), parts, strict=True))
