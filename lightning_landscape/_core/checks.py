"""Argument checks: one family for the whole package (raise, never assert).

Each check raises ``TypeError`` for a value of the wrong type and ``ValueError`` for one out of
range, with a message that names the argument and repeats the value, and returns the value
normalized (an ``int`` or a ``float``). ``what`` (and ``type_what`` for the type error) overrides
the phrase of the message ("a positive number", "a number in [0, 1)") where a caller's documented
wording differs from the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from typing import Any

import torch


def check_int(
    name: str, value: Any, *, low: int | None = None, allow_none: bool = False, what: str = ""
) -> int | None:
    """``value`` as an int (bools refused) of at least ``low``.

    Raises:
        TypeError: if ``value`` is not an int.
        ValueError: if it is below ``low``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"`{name}` must be {what or 'an int'}, got {value!r}.")
    if low is not None and value < low:
        kind = what or ("a positive int" if low == 1 else f"an int >= {low}")
        raise ValueError(f"`{name}` must be {kind}, got {value!r}.")
    return int(value)


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> int | None:
    """``value`` as a positive int (``None`` passes with ``allow_none``)."""
    return check_int(name, value, low=1, allow_none=allow_none, what="a positive int")


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    strict: bool = False,
    high_strict: bool = False,
    what: str = "",
    type_what: str = "",
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, …`` if ``strict``, ``…, high)`` if
    ``high_strict``); bools refused.

    Raises:
        TypeError: if ``value`` is not a real number.
        ValueError: if it is not finite or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"`{name}` must be {type_what or what or 'a real number'}, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be {what or 'finite'}, got {value!r}.")
    if low is not None and (value <= low if strict else value < low):
        bound = "positive" if strict and low == 0 else f"{'>' if strict else '>='} {low}"
        raise ValueError(f"`{name}` must be {what or bound}, got {value!r}.")
    if high is not None and (value >= high if high_strict else value > high):
        bound = f"{'<' if high_strict else '<='} {high}"
        raise ValueError(f"`{name}` must be {what or bound}, got {value!r}.")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a positive finite float."""
    return check_real(name, value, low=0.0, strict=True, what="a positive number")


def check_positive_values(name: str, value: Any) -> tuple[float, ...]:
    """A positive number or a non-empty sequence of them, as a tuple of floats.

    Raises:
        TypeError: if an item is not a number.
        ValueError: if the sequence is empty or an item is not positive and finite.
    """
    try:  # a list, a tuple, a numpy array
        items = [value] if isinstance(value, str) else list(value)
    except TypeError:  # a single number
        items = [value]
    if not items:
        raise ValueError(f"`{name}` is empty.")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"`{name}` must be a positive number or a list of them, got {value!r}.")
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"`{name}` must hold positive numbers, got {value!r}.")
    return tuple(float(v) for v in items)


def check_distinct(
    name: str, values: Sequence[Any], key: Callable[[Any], str] = str
) -> tuple[Any, ...]:
    """``values`` as a tuple, if no two of them give the same ``key`` (the text a value becomes
    in a logged key: ``"{:g}".format`` writes 0.05 and 0.05000001 alike).

    Raises:
        ValueError: naming the first two values that collide.
    """
    seen: dict[str, Any] = {}
    for v in values:
        k = key(v)
        if k in seen:
            raise ValueError(
                f"`{name}` must hold distinct values, got {seen[k]!r} and {v!r} (both logged as "
                f"{k!r}) in {values!r}."
            )
        seen[k] = v
    return tuple(values)


def check_bool(name: str, value: Any) -> bool:
    """``value`` itself, if it is a bool.

    Raises:
        TypeError: if it is not.
    """
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` itself, if it is one of ``choices``.

    Raises:
        ValueError: if it is not.
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def check_callable(name: str, value: Any, *, allow_none: bool = False) -> Any:
    """``value`` itself, if it is callable (or None with ``allow_none``).

    Raises:
        TypeError: if it is not.
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        extra = " or None" if allow_none else ""
        raise TypeError(f"`{name}` must be callable{extra}, got {type(value).__name__}.")
    return value


_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def check_floating_dtype(
    name: str, value: Any, *, choices: Sequence[torch.dtype] | None = None
) -> torch.dtype:
    """A floating ``torch.dtype``, given as itself or by name (``"float32"``); one of ``choices``
    when they are given.

    Raises:
        ValueError: if it is neither, or not among ``choices``.
    """
    dtype = _DTYPES.get(value) if isinstance(value, str) else value
    allowed = isinstance(dtype, torch.dtype) and dtype.is_floating_point
    if not allowed or (choices is not None and dtype not in choices):
        names = sorted(n for n, d in _DTYPES.items() if choices is None or d in choices)
        what = "a floating torch.dtype" if choices is None else " or ".join(map(str, choices)) + ","
        raise ValueError(f"`{name}` must be {what} or one of {names}, got {value!r}.")
    return dtype


def check_batches(batches: Any) -> Sequence[Any]:
    """``batches`` itself, if it is a non-empty sequence of batches (a tensor is not).

    Raises:
        TypeError: if it is not a sequence, or is a tensor.
        ValueError: if it is empty.
    """
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Sequence):
        raise TypeError(f"`batches` must be a sequence of batches, got {type(batches).__name__}.")
    if len(batches) == 0:
        raise ValueError("`batches` is empty.")
    return batches


class LossTypeError(TypeError):
    """A ``loss_fn`` returned no tensor (:func:`check_loss`)."""


class LossValueError(ValueError):
    """A ``loss_fn`` returned a tensor that is no differentiable scalar (:func:`check_loss`)."""


#: What :func:`check_loss` raises: a broken loss, which no product kind can fix.
LOSS_ERRORS = (LossTypeError, LossValueError)


def check_loss(loss: Any) -> torch.Tensor:
    """What a ``loss_fn`` returned, checked before it is differentiated: a one-element tensor
    (a float or a vector gave an autograd error many frames deep, or an AttributeError). A
    loss without a graph is a constant (a rank whose batch has nothing to score), not refused.

    Raises:
        TypeError: if it is not a tensor.
        ValueError: if it has other than one element.
    """
    if not isinstance(loss, torch.Tensor):
        raise LossTypeError(f"`loss_fn` must return a scalar tensor, got {type(loss).__name__}.")
    if loss.numel() != 1:
        raise LossValueError(
            f"`loss_fn` must return a scalar tensor, got shape {tuple(loss.shape)}."
        )
    return loss
