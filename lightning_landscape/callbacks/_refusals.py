"""Models no measurement can take, refused rather than crashing the fit: the monitor logs NaN
and warns once with the reason and a remedy (the same on every rank), and training goes on."""

from __future__ import annotations

from torch import nn
from torch.nn.parameter import is_lazy

from lightning_landscape._core.vectors import check_real
from lightning_landscape.callbacks._errors import SetupError


def complex_refusal(module: nn.Module) -> SetupError | None:
    """The refusal of a module with complex trainable parameters (as :func:`check_real` words
    it), returned for the monitor to log NaN and warn once (the same on every rank), or None."""
    try:
        check_real([p for p in module.parameters() if p.requires_grad])
    except TypeError as err:
        names = [n for n, p in module.named_parameters() if p.requires_grad and p.is_complex()]
        return SetupError(f"complex parameters {names[:3]} cannot be measured: {err}")
    return None


def lazy_refusal(module: nn.Module) -> SetupError | None:
    """The refusal of a module whose lazy modules (``nn.LazyLinear``, ...) have not run their
    first forward yet, or None: a measurement's forward would create their parameters, from
    other random draws than the training's own first forward."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    names = [n for n, t in tensors if is_lazy(t)]
    if not names:
        return None
    return SetupError(
        f"{names[:3]} are not materialized yet: lazy modules create their parameters at their "
        "first forward, in the first training step. Measurements start once they exist (never, "
        "for a lazy module training does not run); to measure from the start, run a forward on "
        "an example batch in `__init__` or `setup`"
    )


def module_refusal(module: nn.Module) -> SetupError | None:
    """:func:`lazy_refusal` or :func:`complex_refusal`: parameters no measurement can take."""
    return lazy_refusal(module) or complex_refusal(module)
