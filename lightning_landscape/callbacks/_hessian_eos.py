"""HessianMonitor's edge of stability: the optimizer's own threshold, the preconditioned sharpness
of adaptive optimizers, and the ratio of the relevant sharpness to the threshold.

The thresholds and preconditioners come from
:func:`lightning_landscape.curvature.stability_rule` (SGD, heavy-ball and Nesterov momentum, Adam,
AdamW; others through :func:`~lightning_landscape.curvature.register_stability_rule`).
"""

from __future__ import annotations

import math
from typing import Any

from lightning_landscape.callbacks import _hessian_products as products
from lightning_landscape.callbacks.context import MeasureContext
from lightning_landscape.curvature.stability import (
    PreconditionedOperator,
    inverse_sqrt_preconditioner,
    stability_rule,
)


def measure_eos(
    monitor: Any, ctx: MeasureContext, sharpness: float
) -> tuple[dict[str, float], int]:
    """``<prefix>/eos_threshold``, ``<prefix>/eos_ratio`` and, for an adaptive optimizer,
    ``<prefix>/preconditioned_eigenvalue_1``; and the Hessian-vector products spent.

    ``sharpness`` is λ_max(H), already measured. The fit's optimizer is read (with several, the
    one that steps every measured parameter: else NaN, as for a GAN's generator and
    discriminator, whose thresholds differ). Before an adaptive optimizer's first step there is
    no preconditioner yet: only the threshold is logged.
    """
    key = monitor.key
    try:
        optimizer = _stepping(ctx)
        rule = stability_rule(optimizer)
    except ValueError as err:
        ctx.warn(
            f"HessianMonitor-{key('eos-threshold')}",
            f"HessianMonitor: {err} `{key('eos_ratio')}` and `{key('eos_threshold')}` are logged "
            "as NaN.",
        )
        ctx.explained.update((key("eos_threshold"), key("eos_ratio")))
        return {key("eos_threshold"): math.nan, key("eos_ratio"): math.nan}, 0
    out = {key("eos_threshold"): rule.threshold}
    if rule.preconditioner is None:
        out[key("eos_ratio")] = sharpness / rule.threshold
        return out, 0
    if not monitor.preconditioned:
        ctx.warn(
            f"HessianMonitor-{key('eos-preconditioned')}",
            f"HessianMonitor: with {type(optimizer).__name__} the edge of stability bounds "
            "the preconditioned sharpness λ_max(P⁻¹H), which `preconditioned=False` skips; "
            f"`{key('eos_ratio')}` is logged as NaN.",
        )
        out[key("eos_ratio")] = math.nan
        ctx.explained.add(key("eos_ratio"))
        return out, 0
    if ctx.sharded_module is not None:  # the preconditioned operator needs whole vectors
        ctx.warn(
            f"HessianMonitor-{key('eos-sharded')}",
            f"HessianMonitor: the preconditioned sharpness of {type(optimizer).__name__} is "
            f"not measured on sharded (FSDP) models; `{key('eos_ratio')}` is logged as NaN.",
        )
        out[key("eos_ratio")] = math.nan
        ctx.explained.add(key("eos_ratio"))
        return out, 0
    scale = inverse_sqrt_preconditioner(rule, ctx.params)
    if scale is None:  # no optimizer state yet
        return out, 0
    top = products.derived_eigenvalues(
        monitor,
        ctx,
        lambda hessian: PreconditionedOperator(hessian, scale),
        "preconditioned Hessian, products",
        "eos",
    )
    value = float(top.eigenvalues[0])
    out[key("preconditioned_eigenvalue_1")] = value
    out[key("eos_ratio")] = value / rule.threshold
    return out, top.num_matvecs


def _stepping(ctx: MeasureContext) -> Any:
    """The optimizer whose threshold applies: the fit's only one, or of several the first that
    steps every measured parameter.

    Raises:
        ValueError: without an optimizer, or where none of several steps them all.
    """
    if ctx.optimizer is None:
        raise ValueError("the trainer holds no optimizer.")
    if len(ctx.optimizers) <= 1:
        return ctx.optimizer
    for optimizer in ctx.optimizers:
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if all(id(p) in stepped for p in ctx.params):
            return optimizer
    names = ", ".join(type(o).__name__ for o in ctx.optimizers)
    raise ValueError(
        f"the fit has {len(ctx.optimizers)} optimizers ({names}) and none steps all "
        f"{len(ctx.params)} measured parameters (a GAN's generator and discriminator, say): "
        "each has its own threshold, and the Hessian spans them all."
    )
