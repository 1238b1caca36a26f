"""The argument checks: what each accepts and returns, and the exact words of each refusal."""

import re

import numpy as np
import pytest
import torch

from lightning_landscape._core.checks import (
    check_batches,
    check_bool,
    check_callable,
    check_choice,
    check_distinct,
    check_floating_dtype,
    check_int,
    check_positive,
    check_positive_int,
    check_positive_values,
    check_real,
)

BATCHES = [torch.zeros(2, 1)]
DTYPES = "one of ['bfloat16', 'float16', 'float32', 'float64']"
WIDE = {"choices": (torch.float32, torch.float64)}

# (check, value, keyword arguments, what ``check("x", value, **kwargs)`` returns: equal and of
# the same type)
ACCEPTED = [
    (check_int, 3, {}, 3),
    (check_int, np.int64(-2), {}, -2),  # any Integral, returned as an int
    (check_int, 0, {"low": 0}, 0),
    (check_int, None, {"allow_none": True}, None),
    (check_positive_int, 1, {}, 1),
    (check_positive_int, None, {"allow_none": True}, None),
    (check_real, 2, {}, 2.0),  # any Real, returned as a float
    (check_real, np.float32(0.5), {"low": 0.5, "high": 0.5}, 0.5),  # bounds included
    (check_real, -1e300, {}, -1e300),
    (check_positive, 1e-9, {}, 1e-9),
    (check_positive_values, 2, {}, (2.0,)),
    (check_positive_values, [0.5, 3], {}, (0.5, 3.0)),
    (check_positive_values, (1e-3,), {}, (1e-3,)),
    (check_bool, False, {}, False),
    (check_choice, "b", {"choices": ("a", "b")}, "b"),
    (check_callable, None, {"allow_none": True}, None),
    (check_floating_dtype, "bfloat16", {}, torch.bfloat16),
    (check_floating_dtype, torch.float16, {}, torch.float16),
    (check_floating_dtype, "float64", WIDE, torch.float64),
    (check_floating_dtype, torch.float32, WIDE, torch.float32),
    (check_distinct, [0.5, 0.25], {"key": "{:g}".format}, (0.5, 0.25)),
    (check_distinct, ("a", "b"), {}, ("a", "b")),
    (check_distinct, (), {}, ()),
]

# (check, value, keyword arguments, error, the message of ``check("x", value, **kwargs)`` after
# "`x` ")
REFUSED = [
    (check_int, True, {}, TypeError, "must be an int, got True."),
    (check_int, 2.0, {}, TypeError, "must be an int, got 2.0."),
    (check_int, None, {}, TypeError, "must be an int, got None."),
    (check_int, -1, {"low": 0}, ValueError, "must be an int >= 0, got -1."),
    (check_int, 0, {"low": 1}, ValueError, "must be a positive int, got 0."),
    (check_int, 1, {"low": 2, "what": "at least 2"}, ValueError, "must be at least 2, got 1."),
    (check_positive_int, 0, {}, ValueError, "must be a positive int, got 0."),
    (check_positive_int, "3", {}, TypeError, "must be a positive int, got '3'."),
    (check_positive_int, False, {"allow_none": True}, TypeError,
     "must be a positive int, got False."),
    (check_real, True, {}, TypeError, "must be a real number, got True."),
    (check_real, "1", {"type_what": "a number"}, TypeError, "must be a number, got '1'."),
    (check_real, float("nan"), {}, ValueError, "must be finite, got nan."),
    (check_real, float("-inf"), {"low": 0}, ValueError, "must be finite, got -inf."),
    (check_real, 0, {"low": 0, "strict": True}, ValueError, "must be positive, got 0."),
    (check_real, 1, {"low": 1, "strict": True}, ValueError, "must be > 1, got 1."),
    (check_real, -0.5, {"low": 0}, ValueError, "must be >= 0, got -0.5."),
    (check_real, 1.5, {"high": 1}, ValueError, "must be <= 1, got 1.5."),
    (check_real, 1.0, {"high": 1, "high_strict": True}, ValueError, "must be < 1, got 1.0."),
    (check_real, 1, {"high": 1, "high_strict": True, "what": "a number in [0, 1)"}, ValueError,
     "must be a number in [0, 1), got 1."),
    (check_positive, 0.0, {}, ValueError, "must be a positive number, got 0.0."),
    (check_positive, float("inf"), {}, ValueError, "must be a positive number, got inf."),
    (check_positive, True, {}, TypeError, "must be a positive number, got True."),
    (check_positive_values, [], {}, ValueError, "is empty."),
    (check_positive_values, [1, -1], {}, ValueError, "must hold positive numbers, got [1, -1]."),
    (check_positive_values, 0, {}, ValueError, "must hold positive numbers, got 0."),
    (check_positive_values, [1, True], {}, TypeError,
     "must be a positive number or a list of them, got [1, True]."),
    (check_positive_values, "12", {}, TypeError,
     "must be a positive number or a list of them, got '12'."),
    (check_bool, 1, {}, TypeError, "must be a bool, got 1."),
    (check_choice, "c", {"choices": ("a", "b")}, ValueError, "must be one of ['a', 'b'], got 'c'."),
    (check_callable, 3, {}, TypeError, "must be callable, got int."),
    (check_callable, "f", {"allow_none": True}, TypeError, "must be callable or None, got str."),
    (check_floating_dtype, torch.int64, {}, ValueError,
     f"must be a floating torch.dtype or {DTYPES}, got torch.int64."),
    (check_floating_dtype, "double", {}, ValueError,
     f"must be a floating torch.dtype or {DTYPES}, got 'double'."),
    (check_floating_dtype, "float16", WIDE, ValueError,
     "must be torch.float32 or torch.float64, or one of ['float32', 'float64'], got 'float16'."),
    (check_floating_dtype, torch.bfloat16, WIDE, ValueError,
     "must be torch.float32 or torch.float64, or one of ['float32', 'float64'], "
     "got torch.bfloat16."),
    (check_floating_dtype, torch.int32, WIDE, ValueError,
     "must be torch.float32 or torch.float64, or one of ['float32', 'float64'], got torch.int32."),
    (check_distinct, ["a", "b", "a"], {}, ValueError,
     "must hold distinct values, got 'a' and 'a' (both logged as 'a') in ['a', 'b', 'a']."),
    (check_distinct, (0.05, 0.05000001), {"key": "{:g}".format}, ValueError,
     "must hold distinct values, got 0.05 and 0.05000001 (both logged as '0.05') in "
     "(0.05, 0.05000001)."),
]  # fmt: skip


@pytest.mark.parametrize(("check", "value", "kwargs", "expected"), ACCEPTED)
def test_accepted_values_come_back_normalized(check, value, kwargs, expected):
    got = check("x", value, **kwargs)
    assert got == expected and type(got) is type(expected)


def test_identity_checks_return_the_object_itself():
    assert check_callable("x", len) is len
    choices = [object(), object()]
    assert check_choice("x", choices[1], choices) is choices[1]
    assert check_batches(BATCHES) is check_batches(BATCHES) is BATCHES


@pytest.mark.parametrize(("check", "value", "kwargs", "error", "message"), REFUSED)
def test_refusals_say_exactly_what_is_wrong(check, value, kwargs, error, message):
    with pytest.raises(error, match=f"^{re.escape(f'`x` {message}')}$"):
        check("x", value, **kwargs)


def test_check_batches_refusals():
    cases = [
        (BATCHES[0], TypeError, "`batches` must be a sequence of batches, got Tensor."),
        (iter(BATCHES), TypeError, "`batches` must be a sequence of batches, got list_iterator."),
        ((), ValueError, "`batches` is empty."),
    ]
    for batches, error, message in cases:
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            check_batches(batches)
