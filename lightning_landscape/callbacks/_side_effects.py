"""What a ``training_step`` serving as a measurement's loss may change besides the loss.

The monitors call the module's ``training_step`` once per fixed batch at every weight point a
measurement evaluates. Its side effects are dealt with here:

- the states of the ``torchmetrics`` metrics the module holds (``self.train_acc(preds, y)``
  in ``training_step``, logged with ``self.log(..., self.train_acc, on_epoch=True)``: every
  call updates them): saved before a measurement and put back after it
  (:func:`saved_metric_states`), so the epoch's logged metric is the training's own (before,
  a HessianMonitor moved a logged training accuracy from 0.3125 to 0.338);
- the module's plain attributes (an outputs list, a counter): a cheap fingerprint before and
  after (:func:`plain_attributes`); what changed is put back where that is exact (appended
  lists cut back, numbers and strings restored: ``self.training_step_outputs.append(loss)``,
  Lightning's documented pattern, would otherwise feed every measurement's calls to the user's
  ``on_train_epoch_end``, which runs after the callbacks') and named in one warning
  (:func:`warn_side_effects`), pointing at ``is_measuring``;
- frozen parameters and buffers it updates (the momentum encoder of BYOL, MoCo or DINO,
  updated at the start of ``training_step`` as lightly's examples do; DINO's center; a
  quantization observer's ranges): held as they were when the measurement began, put back
  before every call (:class:`HeldState`), so that one measurement sees one function (before,
  the top eigenvalue of a BYOL model came out 5.5 % off and its loss 21 % off, a DINO-style
  center moved a trajectory's loss by 35 %; ``hvp="func"`` crashed the process: the update
  stored a transformed tensor in the real parameter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

MARKER = "landscape_measuring"
_PLAIN = (Tensor, list, bool, int, float, str)


class HeldState:
    """The module's frozen parameters (``requires_grad=False``) and buffers, put back as they
    were at construction by each call: a slot rebound to another tensor, ``.data`` reassigned
    (``p.data = m * p.data + (1 - m) * q.data``) and in-place changes (``lerp_``, ``copy_``,
    BatchNorm's running statistics) are undone. The checks read object identities, data
    pointers and version counters, about a microsecond a tensor; values are copied from
    ``saved`` (``id(t)`` to a copy; plain tensors only) only when they changed. While
    ``guarded()`` is not 0, the curvature engine's products run on clones of the buffers made
    at the entry it numbers: those clones are held the same way (one entry's calls of the loss,
    batch after batch, see the same buffers)."""

    def __init__(
        self, module: nn.Module, saved: dict[int, Tensor], guarded: Callable[[], int]
    ) -> None:
        self.guarded, self.entry, self.clones = guarded, 0, ([], [])
        owners = list(module.modules())
        frozen = [(m._parameters, m._parameters.items()) for m in owners]
        self.params = self._held(frozen, saved, lambda p: not p.requires_grad)
        self.buffers = self._held([(m._buffers, m._buffers.items()) for m in owners], saved)
        self.saved = saved

    @staticmethod
    def _held(tables: list, saved: dict[int, Tensor], keep: Callable = lambda t: True) -> tuple:
        slots = [
            (table, name, t)
            for table, items in tables
            for name, t in items
            if t is not None and id(t) in saved and type(t.data) is Tensor and keep(t)
        ]
        unique = {id(t): t for _, _, t in slots}
        return slots, [[t, t.data, t.data_ptr(), t._version, saved[i]] for i, t in unique.items()]

    def __call__(self, adopt: bool = False) -> None:
        """Undo changes, or with ``adopt`` (before a call) take in-place changes as the values
        to hold: the measurement's own (a trajectory moves parameters frozen since a snapshot)."""
        self._restore(*self.params, adopt)
        entry = self.guarded()
        if not entry:
            self._restore(*self.buffers, adopt)
            return
        if entry != self.entry:  # first seen at this entry: the clones are as made
            now = [(table, [(name, table[name])]) for table, name, _ in self.buffers[0]]
            originals = {(id(table), name): id(t) for table, name, t in self.buffers[0]}
            saved = {id(t): self.saved[originals[id(table), name]] for table, [(name, t)] in now}
            self.entry, self.clones = entry, self._held(now, saved)
        self._restore(*self.clones, adopt)

    @staticmethod
    def _restore(slots: list, state: list, adopt: bool = False) -> None:
        for table, name, t in slots:
            if table.get(name) is not t:
                table[name] = t
        with torch.no_grad():
            for entry in state:
                t, data, ptr, version, saved = entry
                try:
                    moved = t.data_ptr() != ptr
                except RuntimeError:  # data without storage, set inside a torch.func transform
                    moved = True
                if moved:
                    t.data = data
                if t._version != version and adopt:
                    entry[3:] = [t._version, t.detach().clone()]
                elif t._version != version:
                    if t.shape != saved.shape:
                        t.resize_(saved.shape)
                    t.copy_(saved)
                    entry[3] = t._version


def _is_metric(module: nn.Module) -> bool:
    """A ``torchmetrics.Metric`` (duck-typed: its states' defaults and its update counter)."""
    return isinstance(getattr(module, "_defaults", None), dict) and hasattr(module, "_update_count")


def _copied(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    return list(value) if isinstance(value, list) else value  # list states are appended to


def saved_metric_states(module: nn.Module) -> Callable[[], None]:
    """Copy the state of every ``torchmetrics`` metric among ``module``'s submodules
    (``MetricCollection`` members and wrappers included); return the function that puts it
    back. The state is every tensor, list, number and string a metric holds (its registered
    states, update count, cached ``compute()`` and ``forward`` values, and what some keep beside
    them: ``Running``'s window position, ``MinMaxMetric``'s extremes)."""
    saved = []
    for m in module.modules():
        if _is_metric(m):
            state = {k: _copied(v) for k, v in vars(m).items() if isinstance(v, _PLAIN)}
            saved.append((m, state))

    def restore() -> None:
        for m, state in saved:
            for name, value in state.items():
                setattr(m, name, value)

    return restore


class Fingerprint(dict):
    """:func:`plain_attributes`' result: name → value or ``("length", n)``, and in ``objects``
    the containers themselves (to put them back)."""

    objects: dict[str, Any]


def plain_attributes(module: nn.Module) -> Fingerprint:
    """A cheap fingerprint of the module's public plain attributes: numbers, strings and bools
    by value, lists, tuples, dicts and sets by length (tensors and submodules are left out)."""
    out = Fingerprint()
    out.objects = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == MARKER:
            continue
        if isinstance(value, bool | int | float | str):
            out[name] = value
        elif isinstance(value, list | tuple | dict | set):
            out[name] = ("length", len(value))
            out.objects[name] = value
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal plain values (NaN equals NaN; a value of another type never does)."""
    return type(a) is type(b) and (a == b or (a != a and b != b))


def changed_attributes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``"name (before → after)"`` for every attribute whose fingerprint changed."""

    def show(v: Any) -> str:
        return "absent" if v is None else (f"length {v[1]}" if isinstance(v, tuple) else repr(v))

    names = [k for k in {**before, **after} if not _same(before.get(k), after.get(k))]
    return [f"{k} ({show(before.get(k))} → {show(after.get(k))})" for k in names]


def put_back(module: nn.Module, before: Fingerprint, after: Fingerprint) -> None:
    """Undo what a measurement's calls of ``training_step`` did to the plain attributes: lists
    cut back to their length (appends undone: ``self.training_step_outputs.append(loss)``),
    numbers, strings and rebound containers set back, attributes it created removed. Dicts and
    sets that grew in place stay as they are."""
    for name, value in before.items():
        current = vars(module).get(name)
        try:  # a name that became a parameter or submodule refuses a plain value: left as is
            if name in before.objects:
                obj = before.objects[name]
                if current is not obj:
                    setattr(module, name, obj)
                if isinstance(obj, list) and len(obj) > value[1]:
                    del obj[value[1] :]
            elif not _same(current, value):  # a tensor or an array: a different type
                setattr(module, name, value)
        except (TypeError, ValueError, RuntimeError):
            continue
    for name in after.keys() - before.keys():
        vars(module).pop(name, None)


def warn_side_effects(
    trainer: Any, owner: str, before: Fingerprint, module: nn.Module, calls: int
) -> None:
    """Put back the plain attributes a measurement's calls of the module's training_step
    changed (:func:`put_back`), with one warning naming them (an outputs list, a counter)."""
    from lightning_landscape.callbacks import _logging

    after = plain_attributes(module)
    changed = changed_attributes(before, after)
    if changed:
        put_back(module, before, after)
        _logging.warn_once(
            trainer,
            "training-step-side-effects",
            f"{owner} called the module's training_step {calls} times as the loss of a "
            f"measurement, and it changed {', '.join(changed[:3])}. Put back what could be "
            "(appended lists cut to their length, numbers and strings restored, new attributes "
            "removed); other changes (items popped, dicts and sets updated, in-place edits) "
            "stay. Side effects in training_step run during measurements: "
            "skip them while `lightning_landscape.is_measuring(self)` (or "
            "`self.landscape_measuring`) is True, or pass the monitor "
            "`loss_fn=lambda pl_module, batch: ...`.",
        )
