"""What a ``training_step`` serving as a measurement's loss may change besides the loss.

The monitors call the module's ``training_step`` once per fixed batch at every weight point a
measurement evaluates. Its side effects are dealt with here:

- the states of the ``torchmetrics`` metrics the module holds (``self.train_acc(preds, y)``
  in ``training_step``, logged with ``self.log(..., self.train_acc, on_epoch=True)``: every
  call updates them): saved before a measurement and put back after it
  (:func:`saved_metric_states`), so the epoch's logged metric is the training's own (before,
  a HessianMonitor moved a logged training accuracy from 0.3125 to 0.338);
- the module's plain attributes (an outputs list, a counter): a cheap fingerprint before and
  after (:func:`plain_attributes`) and one warning naming what changed
  (:func:`warn_side_effects`), pointing at ``is_measuring``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

MARKER = "landscape_measuring"
#: what a torchmetrics ``Metric`` keeps besides its states: updates seen, the cached
#: ``compute()`` and the last ``forward`` value
_METRIC_EXTRA = ("_update_count", "_computed", "_forward_cache")


def _is_metric(module: nn.Module) -> bool:
    """A ``torchmetrics.Metric`` (duck-typed: its states' defaults and its update counter)."""
    return isinstance(getattr(module, "_defaults", None), dict) and hasattr(module, "_update_count")


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    return list(value) if isinstance(value, list) else value  # list states are appended to


def saved_metric_states(module: nn.Module) -> Callable[[], None]:
    """Copy the states of every ``torchmetrics`` metric among ``module``'s submodules
    (``MetricCollection`` members included); return the function that puts them back."""
    saved = []
    for m in module.modules():
        if _is_metric(m):
            names = [*m._defaults, *(k for k in _METRIC_EXTRA if k in vars(m))]
            saved.append((m, {k: _copied(getattr(m, k)) for k in names}))

    def restore() -> None:
        for m, state in saved:
            for name, value in state.items():
                setattr(m, name, value)

    return restore


def plain_attributes(module: nn.Module) -> dict[str, Any]:
    """A cheap fingerprint of the module's public plain attributes: numbers, strings and bools
    by value, lists, tuples, dicts and sets by length (tensors and submodules are left out)."""
    out: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == MARKER:
            continue
        if isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, list | tuple | dict | set):
            out[name] = ("length", len(value))
    return out


def changed_attributes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``"name (before → after)"`` for every attribute whose fingerprint changed."""

    def show(v: Any) -> str:
        return "absent" if v is None else (f"length {v[1]}" if isinstance(v, tuple) else repr(v))

    names = [k for k in {**before, **after} if before.get(k) != after.get(k)]
    return [f"{k} ({show(before.get(k))} → {show(after.get(k))})" for k in names]


def warn_side_effects(
    trainer: Any, owner: str, before: dict[str, Any], after: dict[str, Any], calls: int
) -> None:
    """One warning when the module's training_step, serving as a measurement's loss, changed a
    plain attribute of the module (an outputs list, a counter)."""
    from lightning_landscape.callbacks import _logging

    changed = changed_attributes(before, after)
    if changed:
        _logging.warn_once(
            trainer,
            "training-step-side-effects",
            f"{owner} called the module's training_step {calls} times as the loss of a "
            f"measurement, and it changed {', '.join(changed[:3])}. Side effects in "
            "training_step also run during measurements: skip them while "
            "`lightning_landscape.is_measuring(self)` (or `self.landscape_measuring`) is True, "
            "or pass the monitor `loss_fn=lambda pl_module, batch: ...`.",
        )
