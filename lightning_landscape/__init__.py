"""lightning-landscape: loss-landscape monitors and Entropy-SGD for PyTorch Lightning.

The curvature engine (:mod:`lightning_landscape.curvature`) is pure torch. The callbacks and the
optimizer are imported lazily so that ``import lightning_landscape.curvature`` does not import
Lightning.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "HessianMonitor": "lightning_landscape.callbacks.hessian",
    "NoiseTemperatureMonitor": "lightning_landscape.callbacks.noise",
    "SharpnessMonitor": "lightning_landscape.callbacks.sharpness",
    "TrajectoryMonitor": "lightning_landscape.callbacks.trajectory",
    "Schedule": "lightning_landscape.callbacks.schedule",
    "is_measuring": "lightning_landscape.callbacks._isolation",
    "EntropySGD": "lightning_landscape.optim",
    "EntropySGDCallback": "lightning_landscape.callbacks.entropy_sgd",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_landscape' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
