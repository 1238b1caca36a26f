"""Argument checks of the optimizer (raise, never assert)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lightning_landscape._core.checks import check_bool, check_choice, check_int, check_real


def check_arguments(
    *,
    lr: Any,
    momentum: Any,
    dampening: Any,
    weight_decay: Any,
    nesterov: Any,
    L: Any,
    gamma: Any,
    scoping: Any,
    sgld_lr: Any,
    noise: Any,
    alpha: Any,
    gamma_max: Any,
    langevin_momentum: Any,
    langevin_nesterov: Any,
    noise_scale: Any,
    alpha_weights: Any,
    outer_gamma: Any,
    mode: Any,
    seed: Any,
) -> None:
    """The checks of :class:`~lightning_landscape.optim.EntropySGD`'s constructor.

    Raises:
        TypeError: for a value of the wrong type.
        ValueError: for a value out of range or inconsistent with another.
    """
    check_real("lr", lr, low=0.0)
    check_real("momentum", momentum, low=0.0, high=1.0)
    check_real("dampening", dampening, low=0.0, high=1.0)
    check_real("weight_decay", weight_decay, low=0.0)
    check_bool("nesterov", nesterov)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            "`nesterov=True` needs `momentum` > 0 and `dampening` = 0, got "
            f"momentum={momentum!r}, dampening={dampening!r}."
        )
    check_int("L", L, low=1)
    check_real("gamma", gamma, low=0.0, strict=True)
    check_real("scoping", scoping, low=0.0)
    check_real("sgld_lr", sgld_lr, low=0.0, strict=True)
    check_real("noise", noise, low=0.0)
    check_real("alpha", alpha, low=0.0, high=1.0)
    if gamma_max is not None:
        check_real("gamma_max", gamma_max, low=0.0, strict=True)
    cap = 1.0 / sgld_lr if gamma_max is None else gamma_max
    if gamma > cap:
        source = "" if gamma_max is not None else " (default 1/sgld_lr: η'γ ≤ 1)"
        raise ValueError(
            f"`gamma`={gamma!r} exceeds `gamma_max`={cap!r}{source}: the scope would start "
            "above its cap."
        )
    check_real(
        "langevin_momentum", langevin_momentum, low=0.0, high=1.0, high_strict=True,
        what="in [0, 1)", type_what="a real number",
    )  # fmt: skip
    check_bool("langevin_nesterov", langevin_nesterov)
    if langevin_nesterov and langevin_momentum <= 0:
        raise ValueError(
            "`langevin_nesterov=True` needs `langevin_momentum` > 0, got "
            f"langevin_momentum={langevin_momentum!r}."
        )
    check_choice("noise_scale", noise_scale, ("sqrt_lr", "sqrt_2lr"))
    check_choice("alpha_weights", alpha_weights, ("new", "old"))
    if (alpha_weights == "new" and alpha == 0) or (alpha_weights == "old" and alpha == 1):
        raise ValueError(
            f"`alpha={alpha!r}` with `alpha_weights={alpha_weights!r}` gives the new sample "
            "weight 0: the average would never move."
        )
    check_bool("outer_gamma", outer_gamma)
    check_choice("mode", mode, ("batches", "closure"))
    check_int("seed", seed)


def does_nothing(closure: Callable[[], Any]) -> bool:
    """Whether ``closure`` is Lightning's ``do_nothing_closure`` (wrapped in partials by its
    precision plugins), which manual optimization passes for ``opt.step()``."""
    if isinstance(closure, functools.partial):  # nested: XLA's plugin wraps a partial in one
        inner = (closure.func, *closure.args, *closure.keywords.values())
        return any(does_nothing(a) for a in inner if callable(a))
    return getattr(closure, "__name__", "") == "do_nothing_closure"


GLOBAL_ONLY = (
    "L", "gamma", "scoping", "sgld_lr", "noise", "alpha", "gamma_max", "langevin_momentum",
    "langevin_nesterov", "noise_scale", "alpha_weights", "outer_gamma", "mode", "seed",
)  # fmt: skip


def check_group(group: Any) -> None:
    """A parameter group may set SGD's settings (``lr``, ``momentum``, ...), not Entropy-SGD's:
    those are one for all parameters (one Langevin chain, one scope γ, one cycle of L)."""
    named = sorted(k for k in group if k in GLOBAL_ONLY) if isinstance(group, dict) else []
    if named:
        raise ValueError(
            f"EntropySGD takes {', '.join(named)} for all parameters, not per parameter group "
            f"(a group sets {', '.join(f'{k}={group[k]!r}' for k in named)}): pass them to "
            "EntropySGD(...)."
        )
