"""HessianMonitor's Gauss-Newton part: the GGN spectrum, the residual's negative end and the overlap
of the top eigenvectors (``HessianMonitor(ggn=True)``).

The model output and target come from ``ggn_fn(pl_module, batch) -> (output, target)``, or from
the module's own ``output_and_target(batch)`` method; the loss from ``ggn_loss`` (see
:class:`~lightning_landscape.curvature.GGNOperator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.distributed import is_distributed
from lightning_landscape.callbacks import _hessian_products as products
from lightning_landscape.callbacks import _logging
from lightning_landscape.callbacks._errors import SetupError
from lightning_landscape.callbacks.context import MeasureContext
from lightning_landscape.curvature import GGNOperator, ResidualOperator, analyze
from lightning_landscape.curvature.eigen import EigenResult
from lightning_landscape.curvature.hvp import guard

HOOK = "output_and_target"


def check_setup(pl_module: nn.Module, ggn_fn: Callable | None) -> None:
    """Raise at setup when ``ggn=True`` has no way to split the model output from the target.

    Raises:
        SetupError: (a ``ValueError``) without ``ggn_fn`` and without the module's
            ``output_and_target``.
    """
    if ggn_fn is None and not callable(getattr(pl_module, HOOK, None)):
        raise SetupError(
            "HessianMonitor(ggn=True) needs the model output and the target apart, which "
            "training_step does not give: pass `ggn_fn=lambda pl_module, batch: "
            "(pl_module(batch[0]), batch[1])` (and `ggn_loss`), or define "
            f"`{HOOK}(self, batch)` on {type(pl_module).__name__}."
        )


def metric_keys(monitor: Any) -> list[str]:
    """The keys of a GGN measurement."""
    names = [f"ggn/eigenvalue_{i + 1}" for i in range(monitor.top_k)]
    names += ["ggn/trace", "ggn/trace_stderr"] if monitor.trace else []
    names += ["ggn_overlap", "ggn/num_matvecs"]
    if monitor.min_eigenvalue:
        names += ["residual/min_eigenvalue", "residual/num_matvecs"]
    return [monitor.key(n) for n in names]


def measure_ggn(monitor: Any, ctx: MeasureContext, hessian_top: EigenResult) -> dict[str, float]:
    """The GGN's top eigenvalues, trace and density (one shared Lanczos run), the overlap of its
    top eigenvector with the Hessian's, and the residual's most negative eigenvalue. Where the
    Gauss-Newton products fail (a kernel whose backward cannot be differentiated again: J v
    differentiates Jᵀu), its metrics are NaN with one warning and the Hessian's are kept;
    where only the residual's run fails, its two metrics are NaN and the GGN's kept; under
    torch.distributed the failure ends the measurement, as every failure does there."""
    return _failed("Gauss-Newton part", None, monitor, ctx, _measure_ggn, monitor, ctx, hessian_top)


def _failed(
    what: str, names: list[str] | None, monitor: Any, ctx: MeasureContext, run: Any, *args: Any
) -> dict[str, float]:
    """``run(*args)``, or where it raises (alone: under torch.distributed the failure ends the
    measurement, as every failure does there) NaN for the metrics ``names`` (None: all of the
    GGN's) with one warning: the Hessian's values, and the GGN's where the residual failed,
    stand."""
    try:
        return run(*args)
    except Exception as err:  # noqa: BLE001 - the values measured before stand
        if is_distributed():
            raise
        keys = metric_keys(monitor) if names is None else [monitor.key(n) for n in names]
        ctx.explained.update(keys)
        ctx.warn(
            f"ggn-failed-{what}-{type(err).__name__}",
            f"HessianMonitor: the {what} failed ({type(err).__name__}: {str(err)[:300]}); its "
            "metrics are NaN, the Hessian's" + (" and the GGN's" if names else "") + " are logged.",
        )
        return dict.fromkeys(keys, math.nan)


def _residual(monitor: Any, ctx: MeasureContext, ggn: GGNOperator) -> dict[str, float]:
    """The most negative eigenvalue of the residual H − G."""
    low = products.derived_eigenvalues(
        monitor,
        ctx,
        lambda hessian: ResidualOperator(hessian, ggn),
        "residual H − G, products",
        "residual",
        which="smallest",
        loss_fn=ggn.loss_fn,
        cache=False,  # the GGN keeps its linearizations within the budget already
    )
    return {
        monitor.key("residual/min_eigenvalue"): float(low.eigenvalues[0]),
        monitor.key("residual/num_matvecs"): float(low.num_matvecs),
    }


def _measure_ggn(monitor: Any, ctx: MeasureContext, hessian_top: EigenResult) -> dict[str, float]:
    split = monitor.ggn_fn or (lambda module, batch: getattr(module, HOOK)(batch))
    ggn = GGNOperator(
        lambda batch: split(ctx.module, batch),
        ctx.module,
        ctx.batches,
        loss=monitor.ggn_loss,
        memory_budget=monitor.memory_budget,
        micro_batch_size=monitor.micro_batch_size,
        seed=ctx.seed_for("operator"),
        batch_size_fn=monitor.batch_size_fn,
    )
    ggn.warn = lambda key, message: ctx.warn(
        f"HessianMonitor-ggn-{key}", f"HessianMonitor: {message}"
    )
    _check_same_loss(ggn, ctx)
    ggn.on_matvec = lambda n: ctx.status("GGN, Gauss-Newton-vector products", n)
    key = monitor.key
    try:
        result = analyze(
            ggn,
            top_k=monitor.top_k,
            trace=monitor.trace,
            trace_probes=monitor.trace_probes,
            density=monitor.density,
            density_steps=monitor.density_steps,
            density_probes=monitor.density_probes,
            tol=monitor.tol,
            max_steps=max(monitor.max_matvecs, monitor.density_steps if monitor.density else 1),
            seed=ctx.seed_for("ggn"),
            basis_device=monitor.basis_device,
            probe_block=monitor.probe_block,
        )
        out: dict[str, float] = {}
        values = result.top.eigenvalues.tolist()
        for i in range(monitor.top_k):
            out[key(f"ggn/eigenvalue_{i + 1}")] = values[i] if i < len(values) else math.nan
        if result.trace is not None:
            out[key("ggn/trace")] = result.trace.estimate
            out[key("ggn/trace_stderr")] = result.trace.stderr
        out[key("ggn_overlap")] = _overlap(hessian_top.eigenvectors, result.top.eigenvectors)
        out[key("ggn/num_matvecs")] = float(result.num_matvecs)
        if monitor.min_eigenvalue:
            out.update(_failed("residual", ["residual/min_eigenvalue", "residual/num_matvecs"],
                               monitor, ctx, _residual, monitor, ctx, ggn))  # fmt: skip
    finally:
        ggn.release()
    if result.density is not None and ctx.draw_figures:
        _logging.log_density(ctx, lambda name: key(f"ggn/{name}"), result.density, what="GGN")
    return out


def _overlap(u: Tensor, v: Tensor) -> float:
    """|⟨u, v⟩| of the first columns, normalized (NaN if either is not finite)."""
    a, b = u[:, 0].to(torch.float64), v[:, 0].to(torch.float64)
    return float((a @ b).abs() / (a.norm() * b.norm()))


def _check_same_loss(ggn: GGNOperator, ctx: MeasureContext) -> None:
    """Warn once if ``ggn_loss(*ggn_fn(batch))`` is not the training loss on the first batch: H − G
    is then the residual of the GGN's loss, not of the training loss."""
    batch = ctx.batches[0]
    with guard(ggn.module, ggn.params, ctx.seed), torch.no_grad():
        mine = float(ggn.loss_fn(batch))
    with guard(ggn.module, ggn.params, ctx.seed), torch.no_grad():
        theirs = float(ctx.loss_fn(batch))
    if (
        math.isfinite(mine)
        and math.isfinite(theirs)
        and not math.isclose(mine, theirs, rel_tol=1e-4, abs_tol=1e-7)
    ):
        ctx.warn(
            "ggn-loss",
            f"HessianMonitor: the GGN's loss ({mine:.6g} on the first fixed batch) differs from "
            f"the training loss ({theirs:.6g}); check `ggn_fn` and `ggn_loss`. The GGN and the "
            "residual H − G are those of the GGN's loss.",
        )
