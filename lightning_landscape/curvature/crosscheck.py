"""Exact products checked against finite differences, where the graph alone cannot tell.

Two checks of ``hvp="auto"``'s trial (:mod:`.auto`) compare the chosen exact kind's product of
the trial vector v with central differences of gradients at steps h and 2h (four gradients,
once per operator, :meth:`.HessianOperator.differences`), whose own relative error is
estimated as e = ‖D_2h − D_h‖ / ‖D_h‖ (:func:`.finite_difference.relative_error`):

- :func:`differences_better`: after an asymmetric exact product, whether finite differences
  are better (e below a quarter of the asymmetry).
- :func:`verdict`: where the model runs a custom autograd Function whose backward the graph
  cannot clear (:func:`.differentiable.outside_autograd_refused`: a gradient returned
  without a graph, or one whose graph reaches neither the Function's inputs nor its output).
  Such a backward is either exact (a linear Function: a gradient reversal, a straight-through
  estimator) or drops second-order terms silently (a kernel run outside autograd, a fused loss
  weighted by a learnable factor: 47 % off the top eigenvalue without a word). With
  d = ‖Hv − D_h‖ / ‖D_h‖ and the resolution r = max(4 e, tol): d > r is "wrong" (the exact
  kinds drop terms), d ≤ r ≤ 0.1 is "exact", and otherwise (finite differences too inaccurate
  to tell, across kinks) "undecided".

Under torch.distributed each rank compares its own local products (a rank's local Hessian is
a Hessian on its own) and the verdicts are summed over ranks, so every rank decides alike.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_landscape._core.distributed import all_reduce_sum_
from lightning_landscape.curvature.finite_difference import relative_error

if TYPE_CHECKING:
    from lightning_landscape.curvature.auto import Choice
    from lightning_landscape.curvature.operator import HessianOperator

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
) -> tuple[Verdict, float, float]:
    """Compare this rank's exact product of the ``(1, dim)`` block ``v`` (``product``, local)
    with finite differences (module docstring). Four gradients. Returns the verdict agreed by
    all ranks, and this rank's d and e (NaN where the differences failed)."""
    d = e = float("nan")
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
        return "wrong", d, e
    return ("undecided" if flags[1] > 0 else "exact"), d, e


def suspected(op: HessianOperator) -> tuple[list[str], bool]:
    """The custom Functions this rank's graphs listed (:attr:`.cache.GraphCache.suspects`),
    and whether any rank listed one (so that all ranks compare, or none)."""
    names = list(dict.fromkeys(name for name, _ in op.graphs.suspects or ()))
    flag = torch.tensor([float(bool(names))], dtype=torch.float64)
    return names, float(all_reduce_sum_(flag, op.distributed)[0]) > 0


def detached(op: HessianOperator) -> bool:
    """Whether a rank's graphs listed a Function returning gradients without a graph."""
    flag = torch.tensor(
        [float(any(how == "detached" for _, how in op.graphs.suspects or ()))],
        dtype=torch.float64,
    )
    return float(all_reduce_sum_(flag, op.distributed)[0]) > 0


def checked(
    op: HessianOperator,
    v: Tensor,
    choice: Choice,
    product: Tensor | None,
    names: list[str],
    tol: float,
) -> tuple[Choice, Tensor | None]:
    """The choice after comparing its product with finite differences (:func:`verdict`)
    where the graph listed custom Functions it cannot clear: kept (those Functions then trusted
    for the rest of the operator's life, :attr:`.cache.GraphCache.trusted`), replaced by finite
    differences, or kept with a warning when neither can be told."""
    if product is None:
        product = op.local_products(choice.kind, v)
    outcome, d, e = verdict(op, v, product, tol)
    fns = f"the backward of {', '.join(names) or 'a custom autograd Function (on another rank)'}"
    if outcome == "exact":
        op.graphs.trusted.update(names)
        note = f"; {fns} checked: {d:.1e} from finite differences (their error {e:.1e})"
        return replace(choice, reason=choice.reason + note), product
    if outcome == "wrong" or detached(op):
        why = (
            f"{fns} (a custom autograd Function) drops second-order terms: the exact products "
            f"differ from finite differences by {d:.1e} (relative; their own error {e:.1e})"
            if outcome == "wrong"
            else f"{fns} (a custom autograd Function) returns gradients outside autograd, and "
            f"finite differences are too inaccurate here ({e:.1e}) to check the exact kinds"
        )
        failed = "drops terms" if outcome == "wrong" else "unchecked"
        dropped = {**choice.failures, **dict.fromkeys(choice.seconds, failed)}
        return replace(
            choice, kind="finite_difference", reason=why, seconds={}, failures=dropped
        ), None
    op.warn(
        "unverified",
        f"Hessian-vector products by {choice.kind!r} are unchecked: {fns} (a custom autograd "
        "Function) scales the gradient it is fed by a factor computed outside autograd, which "
        "is exact for a linear Function (a gradient reversal) and drops terms otherwise, and "
        f"finite differences are too inaccurate here ({e:.1e}) to tell.",
    )
    return choice, product
