"""Entropy-SGD (Chaudhari et al., ICLR 2017) for any LightningModule.

:class:`EntropySGD` is a pure-torch optimizer; :class:`EntropySGDCallback` makes validation,
testing, prediction and checkpoints see its anchor x and logs its state;
:func:`anchor_in_parameters` does the same for any block of code (e.g. a monitor's measurement). The callback is imported
lazily so that ``from lightning_landscape.optim import EntropySGD`` does not import Lightning.
"""

from typing import Any

from lightning_landscape.optim._anchor import anchor_in_parameters
from lightning_landscape.optim.entropy_sgd import EntropySGD

__all__ = ["EntropySGD", "EntropySGDCallback", "anchor_in_parameters"]


def __getattr__(name: str) -> Any:
    if name == "EntropySGDCallback":
        from lightning_landscape.optim.callback import EntropySGDCallback

        return EntropySGDCallback
    raise AttributeError(f"module 'lightning_landscape.optim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
