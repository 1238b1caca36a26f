"""Lightning under either of its names: ``pytorch_lightning`` (the package this project depends
on) and ``lightning.pytorch`` (inside the unified ``lightning`` package). Their classes are
distinct: a ``lightning.pytorch`` Trainer carries ``lightning.pytorch`` loggers, progress bars and
callbacks, which fail an ``isinstance`` check against the ``pytorch_lightning`` classes.

Every class the package checks against is therefore a tuple of the classes of each installed
package, and the package's callbacks derive from :class:`Callback`, a Callback of every installed
package, so that either Trainer (and either LightningCLI) accepts them. Importing
``lightning.pytorch`` next to ``pytorch_lightning`` costs a fraction of a second (they share
their dependencies); a package that is not installed is skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


PACKAGES: tuple[ModuleType, ...] = tuple(
    importlib.import_module(name)
    for name in ("pytorch_lightning", "lightning.pytorch")
    if _installed(name)
)


def classes(module: str, name: str) -> tuple[type, ...]:
    """``name`` from ``<package>.<module>`` of every installed Lightning package."""
    found = []
    for package in PACKAGES:
        try:
            found.append(getattr(importlib.import_module(f"{package.__name__}.{module}"), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


CALLBACKS = classes("callbacks", "Callback")
TENSORBOARD_LOGGERS = classes("loggers", "TensorBoardLogger")
TQDM_PROGRESS_BARS = classes("callbacks", "TQDMProgressBar")
MODEL_CHECKPOINTS = classes("callbacks", "ModelCheckpoint")
ACCUMULATION_SCHEDULERS = classes("callbacks", "GradientAccumulationScheduler")
COMBINED_LOADERS = classes("utilities", "CombinedLoader")
MIXED_PRECISION = classes("plugins.precision", "MixedPrecision") + classes(
    "plugins.precision",
    "MixedPrecisionPlugin",  # its name in Lightning 2.1
)
FSDP_STRATEGIES = classes("strategies", "FSDPStrategy")
DEEPSPEED_STRATEGIES = classes("strategies", "DeepSpeedStrategy")


class Callback(*CALLBACKS):  # type: ignore[misc]
    """The base of the package's callbacks: a ``Callback`` of every installed Lightning package
    (their hooks are the same; the first package's implementations are used)."""
