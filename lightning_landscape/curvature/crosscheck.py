"""Exact products checked against finite differences, where the graph alone cannot tell.

The checks of ``hvp="auto"`` compare an exact kind's product of a vector v with central
differences of gradients at steps h and 2h (four gradients, :meth:`.HessianOperator.differences`),
whose own relative error is estimated as e = ‖D_2h − D_h‖ / ‖D_h‖
(:func:`.finite_difference.relative_error`):

- :func:`differences_better`: after an asymmetric exact product, whether finite differences
  are better (e below a quarter of the asymmetry).
- :func:`verdict`: where the model runs a custom autograd Function whose backward the graph
  cannot clear (:func:`.differentiable.outside_autograd_refused`: a gradient returned without
  a graph, one whose graph reaches neither the Function's inputs nor its output, or a tensor
  saved without a graph). Such a backward is either exact (a linear Function: a custom mean
  reduction, a gradient reversal) or drops second-order terms silently (a kernel run outside
  autograd; a fused loss weighted by a learnable factor: the Hessian 47 % off; a
  memory-efficient Swish that keeps its sigmoid from the forward: 6 %). With
  d = ‖Hv − D_h‖ / ‖D_h‖ and the resolution r = max(4 e, tol): d > r is "wrong" (finite
  differences are taken, with one warning naming the Function), d ≤ r ≤ 0.1 "exact", and
  otherwise (finite differences too inaccurate to tell, across kinks) "undecided": the exact
  kind stays, with one warning that it is unchecked. A "wrong" verdict is trusted only where
  finite differences are symmetric themselves (below: a stop-gradient makes them differ
  whatever a Function does); else the exact kind stays, with that warning.

The comparison runs in every operator whose graphs list such a Function: in the trial of
``"auto"`` (:func:`checked`), and in the later operators of a fit whose trial listed one
(:func:`recheck`; the monitors pass that on; forward over reverse, which cannot list, compares
in each), since a term that vanished at one point (a fused Huber loss whose residuals all lay
beyond δ) need not vanish at the next.

- :func:`nonconservative`: finite differences see the Jacobian of the gradient, which is not
  symmetric where the gradient is not a scalar's (a stop-gradient on a path the parameters
  also take: SimSiam, VQ-VAE, semi-gradient TD; a straight-through estimator), while the exact
  kinds hold the detached values fixed: there the two differ whatever a Function does. So
  before a "wrong" verdict, and when they are a fallback, finite differences are checked for
  symmetry (four gradients more after a comparison, eight in a fallback): a comparison then
  keeps the exact kind (with a warning), a fallback says so. HessianMonitor checks finite
  differences asked for by name, and a sharded model's (always finite differences), once per
  fit the same way.

Under torch.distributed each rank compares its own local products (a rank's local Hessian is a
Hessian on its own) and the verdicts are summed over ranks, so every rank decides alike; the
symmetry check is taken on the products of the union of the ranks' batches, as one process
would take it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_landscape._core.distributed import all_reduce_sum_
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.sharding import ShardedSpace
from lightning_landscape._core.space import space_of
from lightning_landscape.curvature.differentiable import NotTwiceDifferentiable
from lightning_landscape.curvature.finite_difference import relative_error

if TYPE_CHECKING:
    from lightning_landscape.curvature.auto import Choice
    from lightning_landscape.curvature.operator import HessianOperator
    from lightning_landscape.curvature.sharded import ShardedHessianOperator

RESOLUTION = 0.1  # the largest resolution r at which a product counts as checked
Verdict = Literal["exact", "wrong", "undecided"]


def differences_better(op: HessianOperator, v: Tensor, asymmetry: float) -> bool:
    """Whether finite differences of ``v`` are finite on every rank, with an estimated relative
    error (steps h and 2h compared) below a quarter of the exact kinds' asymmetry: then they
    are the better products. Four gradients."""
    try:
        both = op.differences(v, [True])
        good = bool(torch.isfinite(both).all()) and relative_error(both[0], both[1]) < asymmetry / 4
    except Exception:  # noqa: BLE001 - no finite differences here: the exact kind stays
        good = False
    flag = torch.tensor([float(not good)], dtype=torch.float64)
    return float(all_reduce_sum_(flag, op.distributed)[0]) == 0


def verdict(
    op: HessianOperator, v: Tensor, product: Tensor, tol: float
) -> tuple[Verdict, float, float, Tensor | None]:
    """Compare this rank's exact product of the ``(1, dim)`` block ``v`` (``product``, local)
    with finite differences (module docstring). Four gradients. Returns the verdict agreed by
    all ranks, this rank's d and e (NaN where the differences failed), and the differences of
    v at h and 2h (None where they failed: :func:`nonconservative` reuses them)."""
    d = e = float("nan")
    both = None
    try:
        both = op.differences(v, [True])
        if bool(torch.isfinite(both).all()):
            e, d = relative_error(both[0], both[1]), relative_error(both[0], product[0])
    except Exception:  # noqa: BLE001 - no finite differences here: nothing to compare with
        pass
    r = max(4 * e, tol)
    wrong = d > r
    undecided = not wrong and not r <= RESOLUTION  # NaN: undecided
    flags = torch.tensor([float(wrong), float(undecided)], dtype=torch.float64)
    all_reduce_sum_(flags, op.distributed)
    if flags[0] > 0:
        return "wrong", d, e, both
    return ("undecided" if flags[1] > 0 else "exact"), d, e, both


STOP_GRADIENT = (
    "the loss's gradient is not the gradient of a scalar (a detach or stop-gradient on a path "
    "that the parameters also take: SimSiam's target branch, a VQ-VAE's commitment and codebook "
    "terms, semi-gradient TD targets; or a backward that is not its forward's derivative, as a "
    "straight-through estimator's), so finite differences measure the Jacobian of that "
    "gradient (asymmetric), not the Hessian autograd differentiates with the detached values "
    "held fixed, which the exact kinds measure"
)


def fell_back(op: HessianOperator, v: Tensor, why: str, tol: float, check: bool = True) -> None:
    """Warn (once, ``fd_fallback``) that the products fall back to finite differences, and
    with ``check`` whether they see an asymmetric Jacobian (:func:`nonconservative`: eight
    gradients), whose Lanczos values are not a Hessian's eigenvalues."""
    note = ""
    if check and asymmetric(asymmetry := nonconservative(op, v, tol)):
        note = (
            f" They see an asymmetric Jacobian here ({asymmetry:.1e}): {STOP_GRADIENT}; its "
            "Lanczos values are not eigenvalues of a Hessian."
        )
    op.warn(
        "fd_fallback",
        f"Hessian-vector products fall back to finite differences: {why}. They are inexact; "
        f"their error estimate is `product_error`.{note}",
    )


def nonconservative(
    op: HessianOperator | ShardedHessianOperator,
    v: Tensor,
    tol: float,
    at_v: Tensor | None = None,
) -> float | None:
    """The asymmetry uᵀDv − vᵀDu of finite differences (scaled as
    :attr:`.auto.Choice.asymmetry`, a second Gaussian u drawn as a probe is), where it is above
    max(4 e, ``tol``) with e their own error estimate, the larger of v's and u's (steps h and
    2h: a kink that only u's steps cross looked like an asymmetry); None where they are
    symmetric to their accuracy, NaN where they failed (an exception or a non-finite value on
    some rank). ``v``: a ``(1, local_dim)`` block. Eight gradients, four where ``at_v`` holds
    v's differences at h and 2h already (:func:`verdict`'s; spent: reduced and overwritten in
    place). Memory: u and u's differences (3 P in the model's dtype) beside v's; float64 sums
    are taken chunk by chunk.

    Taken on the products of every rank's batches (under DDP each rank's differences are
    summed first: 4 P numbers all-reduced; a sharded operator's are shards of them already),
    so the answer is the same on every rank and equals one process's on the union. A sharded
    operator's differences are collectives (FSDP passes), which one rank cannot leave alone:
    there an exception propagates instead of being answered with NaN.

    Raises:
        ValueError: if ``v`` is not one row.
    """
    if v.dim() != 2 or v.shape[0] != 1:
        raise ValueError(f"`v` must be one row, shape (1, local_dim); got {tuple(v.shape)}.")
    space = space_of(op)
    sharded = isinstance(space, ShardedSpace)
    u = space.draw(gaussian, (1, space.dim), make_generator(op.seed, "conservative"))
    u = u.to(dtype=v.dtype, device=v.device)
    at_u = None
    try:
        at_v = op.differences(v, [True]) if at_v is None else at_v
        at_u = op.differences(u, [True])
        failed = not (bool(torch.isfinite(at_v).all()) and bool(torch.isfinite(at_u).all()))
    except Exception:  # noqa: BLE001 - no finite differences here: nothing to say
        if sharded:
            raise
        failed = True
    flag = torch.tensor([float(failed)], dtype=torch.float64)
    if float(all_reduce_sum_(flag, op.distributed)[0]):
        return math.nan
    if not sharded:  # each rank's part of the sums over batches
        all_reduce_sum_(at_v, op.distributed)
        all_reduce_sum_(at_u, op.distributed)
    (dv, dv2), (du, du2) = at_v, at_u
    dv2.sub_(dv), du2.sub_(du)  # D_2h − D_h, in place
    pairs = [(u[0], dv), (v[0], du), (u[0], u[0]), (dv, dv), (v[0], v[0]), (du, du)]
    sums = space.reduce(_sums([*pairs, (dv2, dv2), (du2, du2)]))
    a, b, uu, dvdv, vv, dudu, ev, eu = sums.tolist()
    scale = math.sqrt(uu * dvdv) + math.sqrt(vv * dudu)
    e = max(_ratio(ev, dvdv), _ratio(eu, dudu))
    if not scale > 0 or not math.isfinite(e):
        return None
    asymmetry = abs(a - b) * space.dim**0.5 / scale
    return asymmetry if asymmetry > max(4 * e, tol) else None


def asymmetric(found: float | None) -> bool:
    """Whether :func:`nonconservative` found an asymmetry (not None, not NaN)."""
    return found is not None and not math.isnan(found)


CHUNK = 1 << 22  # entries converted to float64 at a time (32 MiB)


def _sums(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Σ a·b in float64 for each pair of flat vectors (on the host), converting ``CHUNK``
    entries at a time: no float64 copy of a whole vector."""
    out = torch.zeros(len(pairs), dtype=torch.float64, device=pairs[0][0].device)
    for i in range(0, pairs[0][0].numel(), CHUNK):
        for j, (x, y) in enumerate(pairs):
            out[j] += x[i : i + CHUNK].double() @ y[i : i + CHUNK].double()
    return out.cpu()


def _ratio(squared: float, base: float) -> float:
    """√(squared / base), with 0 / 0 = 0 (as :func:`.finite_difference.relative_error`)."""
    return 0.0 if squared == 0.0 else math.sqrt(squared / base) if base > 0 else math.inf


@functools.cache
def _collective_nodes() -> frozenset[str]:
    """The backward nodes of PyTorch's differentiable collectives (``torch.distributed.nn``:
    a gathered contrastive loss) and of SyncBatchNorm."""
    names = {"SyncBatchNormBackward"}
    try:
        from torch.distributed.nn import functional as collectives
    except ImportError:  # pragma: no cover - a build without torch.distributed
        return frozenset(names)
    for value in vars(collectives).values():
        if isinstance(value, type) and issubclass(value, torch.autograd.Function):
            names.add(f"{value.__name__}Backward")
    return frozenset(names)


def collective_listed(op: HessianOperator) -> bool:
    """Whether this rank's graphs listed a collective's backward (:func:`_collective_nodes`),
    on any rank (the same answer on all). Blocks are then computed a vector at a time: a
    vmapped backward failed inside the collective on one rank only, and the ranks hung."""
    names = {name for name, _ in op.graphs.suspects or ()}
    flag = torch.tensor([float(bool(names & _collective_nodes()))], dtype=torch.float64)
    return float(all_reduce_sum_(flag, op.distributed)[0]) > 0


def suspected(op: HessianOperator) -> list[str]:
    """The custom Functions this rank's graphs listed (:attr:`.cache.GraphCache.suspects`); sets
    the graphs' ``listed``: whether any rank listed one (so that all ranks compare, or none)."""
    names = list(dict.fromkeys(name for name, _ in op.graphs.suspects or ()))
    flag = torch.tensor([float(bool(names))], dtype=torch.float64)
    op.graphs.listed = float(all_reduce_sum_(flag, op.distributed)[0]) > 0
    return names


def _outcome(
    op: HessianOperator, v: Tensor, kind: str, product: Tensor, names: list[str], tol: float
) -> tuple[str | None, str]:
    """Compare and say so: why the products are wrong (None where they stand; a warning if
    unchecked), and what the comparison found."""
    op.graphs.compared = True
    outcome, d, e, at_v = verdict(op, v, product, tol)
    fns = "the backward of " + (
        ", ".join(names)
        or "a custom autograd Function (on another rank, or unnamed: forward "
        "over reverse cannot name it)"
    )
    found = f"{fns} compared with finite differences: {d:.1e} apart (their error {e:.1e})"
    if outcome == "wrong" and asymmetric(asymmetry := nonconservative(op, v, tol, at_v)):
        op.warn(
            "unverified",
            f"Hessian-vector products by {kind!r} are unchecked: {fns} (a custom autograd "
            f"Function) could not be compared with finite differences, which see an "
            f"asymmetric Jacobian here ({asymmetry:.1e}, beyond their own error estimate): "
            f"probably {STOP_GRADIENT}.",
        )
        return None, found
    if outcome == "wrong":
        return (
            f"{fns} (a custom autograd Function) drops second-order terms: the exact products "
            f"differ from finite differences by {d:.1e} (relative; their own error {e:.1e})"
        ), found
    if outcome == "undecided":
        op.warn(
            "unverified",
            f"Hessian-vector products by {kind!r} are unchecked: {fns} (a custom autograd "
            "Function) returns gradients outside autograd, or through factors computed "
            "outside it, which is exact for a linear Function and drops terms otherwise, and "
            f"finite differences are too inaccurate here (their error {e:.1e}) to tell.",
        )
    return None, found


def checked(
    op: HessianOperator,
    v: Tensor,
    choice: Choice,
    product: Tensor | None,
    names: list[str],
    tol: float,
) -> tuple[Choice, Tensor | None]:
    """The trial's choice after comparing its product of ``v`` with finite differences: kept, or
    replaced by finite differences (the caller warns)."""
    if product is None:
        product = op.local_products(choice.kind, v)
    why, found = _outcome(op, v, choice.kind, product, names, tol)
    if why is None:
        return replace(choice, reason=f"{choice.reason}; {found}"), product
    dropped = {**choice.failures, **dict.fromkeys(choice.seconds, "drops terms")}
    return replace(choice, kind="finite_difference", reason=why, seconds={}, failures=dropped), None


def recheck(op: HessianOperator, v: Tensor, tol: float) -> Tensor | None:
    """The first product of an operator whose exact kind an earlier trial chose while listing
    custom Functions (``op.graphs.suspects`` a list). The graph kinds list this operator's own
    and compare where any rank lists one; forward over reverse cannot list, so it compares
    always. A backward that is refused here (``@once_differentiable``, reached by this
    operator's batches only) takes finite differences, as the trial would. Where the products
    are wrong the operator takes finite differences, with one warning. Four gradients where it
    compares (four more before a "wrong" verdict, :func:`nonconservative`). Returns this rank's
    product of ``v`` by the operator's kind (None after a switch)."""
    kind, graphs = op.hvp_choice, op.graphs
    product, why = None, None
    try:
        product = op.local_products(kind, v)
    except NotTwiceDifferentiable as err:
        why = f"{err} (reached by this measurement's batches)"
    flag = torch.tensor([float(why is not None)], dtype=torch.float64)
    refused = float(all_reduce_sum_(flag, op.distributed)[0]) > 0  # every rank switches alike
    if refused:
        why = why or "a backward that cannot be differentiated again, on another rank"
    elif kind in ("cached", "double_backward"):
        names = suspected(op)
        why = _outcome(op, v, kind, product, names, tol)[0] if graphs.listed else None
    else:  # forward over reverse: no graph to list from
        why = _outcome(op, v, kind, product, [], tol)[0]
    graphs.compared = True
    if why is None:
        return product
    op.hvp_choice, op.hvp_reason = "finite_difference", why
    op.release()
    fell_back(op, v, why, tol, check=refused)  # a wrong verdict has checked already
    return None
