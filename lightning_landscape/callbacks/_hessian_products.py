"""HessianMonitor's products: the operator of each measurement, and the kind ``hvp="auto"``
chose, kept for the rest of the fit and stated once.

Under FSDP2 (``ModelParallelStrategy``) and FSDP (v1) (``FSDPStrategy``) the operator is a
:class:`~lightning_landscape.curvature.ShardedHessianOperator` (shards, finite differences);
otherwise a :class:`~lightning_landscape.curvature.HessianOperator` of the monitor's kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info

from lightning_landscape._core.checks import check_distinct
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.space import space_of
from lightning_landscape.callbacks.context import MeasureContext
from lightning_landscape.curvature import (
    HessianOperator,
    ShardedHessianOperator,
    analyze,
    crosscheck,
    top_eigenvalues,
)
from lightning_landscape.curvature.auto import symmetry_tolerance
from lightning_landscape.curvature.eigen import EigenResult, Which
from lightning_landscape.curvature.linear import LinearOperator
from lightning_landscape.curvature.operator import FUNC


def reset_choice(monitor: Any) -> None:
    """Forget what ``hvp="auto"`` decided (at construction and at each fit's setup): the kind
    (``hvp_choice``, ``hvp_reason``), the kind for blocks, and whether its trial listed custom
    autograd Functions to compare with finite differences in every operator
    (:mod:`~lightning_landscape.curvature.crosscheck`), and whether requested or sharded
    finite differences were checked for symmetry (:func:`check_symmetry`)."""
    auto = monitor.hvp == "auto"
    monitor.hvp_choice = None if auto else monitor.hvp
    monitor.hvp_reason = "" if auto else "requested"
    monitor._block_choice = None
    monitor._checks = False
    monitor._symmetry_checked = False


def make_operator(
    monitor: Any,
    ctx: MeasureContext,
    params: Any,
    seed: int,
    loss_fn: Callable | None = None,
    cache: bool = True,
):
    """An operator of the kind of this fit (``"auto"`` until the first one has chosen), of the
    Hessian of ``loss_fn`` (default the context's loss); with ``cache=False`` it keeps no graph
    (unless the budget is infinite), its products piece by piece within the budget."""
    sharded = ctx.sharded_module
    if sharded is not None:
        return ShardedHessianOperator(
            ctx.loss_fn,
            sharded,
            ctx.batches,
            params=None if params is ctx.module else params,
            step=monitor.fd_step,
            seed=seed,
            batch_size_fn=monitor.batch_size_fn,
        )
    kind = monitor.hvp_choice or "auto"
    blocks = monitor._block_choice
    if not isinstance(params, torch.nn.Module) and {kind, blocks} & set(FUNC):
        kind, blocks = ("cached" if kind in FUNC else kind), None  # func needs the module
    op = HessianOperator(
        loss_fn or ctx.loss_fn,
        params,
        ctx.batches,
        hvp=kind,
        block_hvp=blocks,
        memory_budget=monitor.memory_budget if cache or monitor.memory_budget == math.inf else 0,
        micro_batch_size=monitor.micro_batch_size,
        seed=seed,
        batch_size_fn=monitor.batch_size_fn,
    )
    op.warn = lambda key, message: ctx.warn(f"HessianMonitor-{key}", f"HessianMonitor: {message}")
    if monitor._checks:  # the trial listed custom Functions: each operator compares its own
        op.graphs.suspects = []
    return op


def derived_eigenvalues(
    monitor: Any,
    ctx: MeasureContext,
    wrap: Callable[[HessianOperator], LinearOperator],
    what: str,
    purpose: str,
    *,
    which: Which = "largest",
    loss_fn: Callable | None = None,
    cache: bool = True,
) -> EigenResult:
    """The top (or most negative) eigenvalue of an operator built on the Hessian, ``wrap(H)``
    (the preconditioned Hessian, the residual H − G), by one Lanczos run with the fit's product
    kind, ``memory_budget`` and ``basis_device``; the Hessian's graphs are released after.
    ``cache=False`` where ``wrap`` holds graphs of its own within the budget (the GGN's)."""
    seed = ctx.seed_for("operator")
    hessian = make_operator(monitor, ctx, ctx.module, seed, loss_fn, cache)
    op = wrap(hessian)
    op.on_matvec = lambda n: ctx.status(what, n)
    try:
        return top_eigenvalues(
            op,
            which=which,
            tol=monitor.tol,
            max_matvecs=monitor.max_matvecs,
            seed=ctx.seed_for(purpose),
            basis_device=monitor.basis_device,
        )
    finally:
        hessian.release()


def record_choice(monitor: Any, op: Any) -> None:
    """Keep the kind ``"auto"`` chose for the rest of the fit, and say it once."""
    if not isinstance(op, HessianOperator):
        return
    if monitor.hvp_choice is not None or op.hvp_choice is None:
        return
    if op.choice is not None and op.choice.exact and not op.choice.seconds:
        return  # no kind gave finite products (a NaN loss): decide at the next measurement
    monitor.hvp_choice, monitor.hvp_reason = op.hvp_choice, op.hvp_reason
    monitor._block_choice = op.block_choice if op.exact else None
    monitor._checks = op.graphs.listed
    if op.exact:  # the fallback to finite differences has warned already
        pieces = f"; on {op.plan.reason}" if op.plan is not None and op.plan.reason else ""
        rank_zero_info(
            f"HessianMonitor: Hessian-vector products by {op.hvp_choice!r} "
            f"(hvp='auto': {op.hvp_reason}){pieces}."
        )


def product_metrics(op: Any) -> dict[str, float]:
    """``hvp_exact`` (1, or 0 for finite differences) and, with finite differences, ``hvp_error``
    (their estimated relative error; sharded operators log ``fd_error`` instead)."""
    if isinstance(op, ShardedHessianOperator):
        return {"hvp_exact": 0.0}
    out = {"hvp_exact": float(op.exact)}
    if not op.exact:
        out["hvp_error"] = op.product_error
    return out


def check_symmetry(monitor: Any, ctx: MeasureContext, op: Any) -> None:
    """Once per fit, where the products are finite differences because they were asked for
    (``hvp="finite_difference"``) or the model is sharded: warn (``fd_asymmetric``) if they see
    an asymmetric Jacobian (a stop-gradient loss), whose Lanczos values are no Hessian's
    eigenvalues (:func:`~lightning_landscape.curvature.crosscheck.nonconservative`; the
    fallback of ``"auto"`` checks in its own warning). Eight gradients, on every rank; a check
    that failed (a NaN loss) is taken again at the next measurement."""
    sharded = isinstance(op, ShardedHessianOperator)
    if monitor._symmetry_checked or not (sharded or monitor.hvp == "finite_difference"):
        return
    ctx.status("finite differences, symmetry check")
    gen = make_generator(ctx.seed_for("symmetry"))
    v = space_of(op).draw(gaussian, (1, op.dim), gen)
    tol = symmetry_tolerance(op.dtype, op.device, op.module)
    asymmetry = crosscheck.nonconservative(op, v, tol)
    monitor._symmetry_checked = asymmetry is None or not math.isnan(asymmetry)  # else: again
    if not crosscheck.asymmetric(asymmetry):
        return
    remedy = (
        "a sharded model has no exact products; measured unsharded (DDP), the exact kinds give "
        "autograd's Hessian"
        if sharded
        else "hvp='auto' or an exact kind measures autograd's Hessian"
    )
    ctx.warn(
        "HessianMonitor-fd_asymmetric",
        f"HessianMonitor: the finite-difference products see an asymmetric Jacobian here "
        f"({asymmetry:.1e} of their scale, beyond their own error): {crosscheck.STOP_GRADIENT}. "
        f"Their Lanczos values are not eigenvalues of a Hessian ({remedy}).",
    )


def analyze_block(monitor: Any, ctx: MeasureContext, params: Any, top_k: int, block: str | None):
    """One :func:`analyze` of the Hessian of ``params`` (the whole spectrum when ``block`` is
    None, else the top eigenvalue and trace of that diagonal block) and, for a sharded
    module, the finite-difference error of its top eigenvalue."""
    full = block is None
    salt = () if full else (block,)
    op = make_operator(monitor, ctx, params, ctx.seed_for("operator", *salt))
    what = "full Hessian" if full else f"block {block}"
    op.on_matvec = lambda n: ctx.status(f"{what}, Hessian-vector products", n)
    try:
        if full:
            check_symmetry(monitor, ctx, op)
        result = analyze(
            op,
            top_k=top_k,
            smallest=monitor.min_eigenvalue and full,
            trace=monitor.trace,
            trace_probes=monitor.trace_probes,
            density=monitor.density and full,
            density_steps=monitor.density_steps,
            density_probes=monitor.density_probes,
            tol=monitor.tol,
            max_steps=max(
                monitor.max_matvecs, monitor.density_steps if monitor.density and full else 1
            ),
            seed=ctx.seed_for("analyze", *salt),
            basis_device=monitor.basis_device,
            probe_block=monitor.probe_block,
        )
        fd: dict[str, float] = {}
        if isinstance(op, ShardedHessianOperator):
            ctx.status(f"{what}, finite-difference error")
            top = result.top
            fd["fd_error"] = (
                op.finite_difference_error(top.eigenvectors[:, 0], top.eigenvalues[0])
                if bool(torch.isfinite(top.eigenvalues[0]))
                else math.nan
            )
            fd["fd_step"] = op.step
        return result, fd | product_metrics(op)
    finally:
        op.release()
        record_choice(monitor, op)


def check_per_module(per_module: Any) -> bool | list[str]:
    """``per_module`` as a bool or a new list of distinct module names (each names logged
    keys).

    Raises:
        TypeError: if it is neither a bool nor a sequence of strings (a string refused).
        ValueError: if a name repeats.
    """
    if isinstance(per_module, bool):
        return per_module
    if (
        isinstance(per_module, str)
        or not isinstance(per_module, Sequence)
        or not all(isinstance(n, str) for n in per_module)
    ):
        raise TypeError(
            f"`per_module` must be a bool or a list of module names, got {per_module!r}."
        )
    return list(check_distinct("per_module", per_module))


def blocks(module: torch.nn.Module, per_module: bool | list[str]) -> list[tuple[str, list]]:
    """(name, trainable parameters) of each diagonal block: a named submodule's parameters
    (recursively), or with ``True`` the parameters each submodule owns directly (disjoint)."""
    if per_module is False:
        return []

    def clean(name: str) -> str:  # an FSDP (v1) unit's wrapped module answers to the unit's name
        return name.replace("._fsdp_wrapped_module", "").replace("_fsdp_wrapped_module.", "")

    named = {clean(n): m for n, m in module.named_modules()}  # the wrapped module last: kept
    if isinstance(per_module, list):
        chosen = [(n, list(named[n].parameters())) for n in per_module]
    else:
        chosen = [(n, list(m.parameters(recurse=False))) for n, m in named.items() if n]
    return [
        (n, ps) for n, ps in ((n, [p for p in ps if p.requires_grad]) for n, ps in chosen) if ps
    ]
