"""What the monitors read from a running Trainer: how much training is done (in epochs, exact
when a fit stops mid-epoch), the learning rate, and the other monitors logging under the same
prefix."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl

from lightning_landscape.callbacks import _logging
from lightning_landscape.callbacks._errors import SetupError


def epochs_done(trainer: pl.Trainer, where: str = "batch") -> float:
    """The training done so far, in epochs: ``e + k / n`` after ``k`` of the ``n`` batches of
    epoch ``e`` (``max_steps`` can end a fit mid-epoch: 1.4 is 40 % of the second epoch), a whole
    number between epochs. With a loader of unknown length the fraction is unknown: the count
    of finished epochs. ``where``: the hook asking, ``"start"`` (``on_train_start``),
    ``"batch"``, ``"epoch_end"`` (the running epoch counts as finished) or ``"fit_end"``
    (``on_train_end``: the fit loop's count already includes the last epoch).

    The running epoch is Lightning's count of completed epochs (``trainer.current_epoch``), not
    its count of started ones: after a resume from a checkpoint saved at an epoch's last batch,
    Lightning's ``started`` stays one short for the rest of the fit, and at the fit's start the
    finished epoch's batches are still counted (the weights are then ``completed`` epochs in)."""
    progress = trainer.fit_loop.epoch_progress.current
    seen = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    total = trainer.num_training_batches
    finite = isinstance(total, int | float) and math.isfinite(total) and total > 0
    if seen == 0 or (where == "start" and finite and seen >= total):
        return float(progress.completed)
    running = progress.completed - 1 if where == "fit_end" else progress.completed
    if finite:
        return running + min(seen / total, 1.0)
    return float(running + 1 if where in ("epoch_end", "fit_end") else running)


def first_lr(trainer: pl.Trainer) -> float:
    """The learning rate of the first parameter group of the first optimizer (NaN if none)."""
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (IndexError, KeyError, AttributeError, TypeError):
        return math.nan


def check_prefix(prefix: str | None, namespace: str) -> str:
    """``prefix``, or ``namespace`` when it is None.

    Raises:
        ValueError: if it is not a non-empty str without '/' and without leading or trailing
            whitespace.
    """
    if prefix is None:
        return namespace
    if not isinstance(prefix, str) or not prefix or "/" in prefix or prefix != prefix.strip():
        raise ValueError(
            "`prefix` must be a non-empty str without '/' and without leading or trailing "
            f"whitespace, got {prefix!r}."
        )
    return prefix


def check_shared_prefix(trainer: pl.Trainer, monitor: Any) -> None:
    """Refuse another callback with the monitor's ``state_key`` (their checkpoint states would
    overwrite each other); warn once when another monitor of the package logs under the same
    prefix.

    Lightning refuses equal ``state_key`` s itself when the Trainer is built, but not among the
    callbacks a module's ``configure_callbacks`` returns or ones appended to
    ``trainer.callbacks`` later: those reach this check.

    Raises:
        SetupError: if another callback has the monitor's ``state_key``.
    """
    callbacks = [cb for cb in getattr(trainer, "callbacks", []) if cb is not monitor]
    if any(getattr(cb, "state_key", None) == monitor.state_key for cb in callbacks):
        raise SetupError(
            f"Two {type(monitor).__name__}s with the prefix {monitor.prefix!r} have the same "
            f"state_key {monitor.state_key!r}, so their checkpoint states and logged keys "
            f"would overwrite each other; give each its own `prefix` (e.g. "
            f"prefix={monitor.prefix + '_2'!r})."
        )
    others = [
        cb
        for cb in callbacks
        if getattr(cb, "prefix", None) == monitor.prefix
        and type(cb).__module__.startswith("lightning_landscape.")
    ]
    if others:
        _logging.warn_once(
            trainer,
            f"shared-prefix-{monitor.prefix}",
            f"{type(monitor).__name__} and {type(others[0]).__name__} both log under the prefix "
            f"{monitor.prefix!r}, so their keys overwrite each other; give each its own "
            "`prefix` (e.g. prefix='hessian_train').",
        )
