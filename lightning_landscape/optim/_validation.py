"""Argument checks shared by the optimizer and its callback (raise, never assert)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    strict: bool = False,
) -> None:
    """Raise unless ``value`` is a finite real number in ``[low, high]`` (``(low, high]`` if strict).

    Raises:
        TypeError: if ``value`` is not a real number (bools are refused).
        ValueError: if it is not finite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    if low is not None and (value <= low if strict else value < low):
        bound = "positive" if strict and low == 0 else f"{'>' if strict else '>='} {low}"
        raise ValueError(f"`{name}` must be {bound}, got {value!r}.")
    if high is not None and value > high:
        raise ValueError(f"`{name}` must be <= {high}, got {value!r}.")


def check_int(name: str, value: Any, *, low: int | None = None) -> None:
    """Raise unless ``value`` is an int (not a bool) and at least ``low``.

    Raises:
        TypeError: if ``value`` is not an int.
        ValueError: if it is below ``low``.
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"`{name}` must be an int, got {value!r}.")
    if low is not None and value < low:
        kind = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``choices``.

    Raises:
        ValueError: if it is not.
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


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
    if not isinstance(nesterov, bool):
        raise TypeError(f"`nesterov` must be a bool, got {nesterov!r}.")
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
    check_choice("noise_scale", noise_scale, ("sqrt_lr", "sqrt_2lr"))
    check_choice("alpha_weights", alpha_weights, ("new", "old"))
    if (alpha_weights == "new" and alpha == 0) or (alpha_weights == "old" and alpha == 1):
        raise ValueError(
            f"`alpha={alpha!r}` with `alpha_weights={alpha_weights!r}` gives the new sample "
            "weight 0: the average would never move."
        )
    if not isinstance(outer_gamma, bool):
        raise TypeError(f"`outer_gamma` must be a bool, got {outer_gamma!r}.")
    check_choice("mode", mode, ("batches", "closure"))
    check_int("seed", seed)
