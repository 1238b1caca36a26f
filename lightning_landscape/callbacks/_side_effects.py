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


def _signature(t: Tensor) -> tuple[int, int]:
    """Where ``t``'s data lives, and how often it was written in place."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:  # data without storage, set inside a torch.func transform
        return -1, t._version


def _transforming() -> bool:
    """Whether a torch.func transform runs (the engine's forward-mode products)."""
    return torch._C._functorch.peek_interpreter_stack() is not None  # torch 2.1 to 2.13


class _Held:
    """One held tensor: the slots that hold it, its data and values when held, and its
    signature then (``now``) and right after the last call (``post``). A buffer (``rebind``)
    is replaced by a fresh copy of the held values before every call, never written and
    never checked (a fused observer writes without moving its version counter); graphs of
    earlier calls keep theirs (a running scale updated in place before its use). A frozen
    parameter keeps its object; ``volatile``: the first call changed its values, so it gets
    a fresh copy of them as its ``.data`` before every call, whatever its signature says
    (in-place writes through ``.data``, as DINO updates its teacher, move no version counter)."""

    __slots__ = ("t", "data", "saved", "now", "post", "slots", "rebind", "volatile")

    def __init__(self, t: Tensor, saved: Tensor, rebind: bool) -> None:
        self.t, self.data, self.saved, self.rebind = t, t.data, saved, rebind
        self.now = self.post = _signature(t)
        self.slots: list[tuple[dict, str]] = []
        self.volatile = False

    def hold(self, adopt: bool) -> None:
        if self.rebind:
            self.t = self.saved.clone()
            for table, name in self.slots:
                table[name] = self.t
            return
        for table, name in self.slots:
            if table.get(name) is not self.t:
                table[name] = self.t
        sig = _signature(self.t)
        if sig == self.now and not self.volatile:
            return
        if adopt and sig != self.post:  # changed between calls: the measurement's own doing
            self.data, self.saved = self.t.data, self.t.detach().clone()
        elif self.volatile:  # a fresh copy as its data: graphs that saved the old keep it
            self.t.data = self.saved.clone()
            self.data = self.t.data
        elif sig[0] != self.now[0]:  # ``.data`` reassigned: the held storage back
            self.t.data = self.data
        elif not torch.equal(self.t, self.saved):  # written in place (same value: left)
            self.t.copy_(self.saved)
        self.now = self.post = _signature(self.t)

    def changed(self) -> bool:
        """Whether the values differ from the held ones (one comparison)."""
        return self.t.shape != self.saved.shape or not torch.equal(self.t, self.saved)


class HeldState:
    """The module's frozen parameters (``requires_grad=False``) and buffers, held as they were
    at construction across the calls of a measurement. Called before each call, it undoes what
    the previous call did to them: a slot rebound to another tensor, ``.data`` reassigned
    (``p.data = m * p.data + (1 - m) * q.data``), in-place changes (``lerp_``, ``copy_``,
    BatchNorm's running statistics, a fused observer's ranges). Never right after a call
    (:meth:`after` only notes what it did): the engine differentiates the loss from the
    tensors as the call left them. A change to a frozen parameter made between calls is the
    measurement's own (a trajectory moves parameters frozen since a snapshot) and is held from
    then on; buffers are only ever the calls' to change, and each call gets fresh copies of
    them. The checks of parameters read identities, data pointers and version counters, about
    a microsecond a tensor, and once, after the first call, their values. While ``guarded()``
    is not 0, the curvature engine's products run on clones of the buffers made at the entry
    it numbers, in the same slots: those are replaced the same way. ``saved``: ``id(t)`` to a
    copy of each tensor, as the measurement starts."""

    def __init__(
        self, module: nn.Module, saved: dict[int, Tensor], guarded: Callable[[], int]
    ) -> None:
        self.guarded, self.entry, self.clones, self.calls = guarded, 0, [], 0
        owners = list(module.modules())
        frozen = lambda p: not p.requires_grad  # noqa: E731
        self.params = self._held([m._parameters for m in owners], saved, False, frozen)
        self.buffers = self._held([m._buffers for m in owners], saved, True)

    @staticmethod
    def _held(tables: list, saved: dict, rebind: bool, keep: Callable | None = None) -> list:
        held: dict[int, _Held] = {}
        for table in tables:
            for name, t in table.items():
                if t is None or id(t) not in saved or type(t.data) is not Tensor:
                    continue
                if keep is None or keep(t):
                    if id(t) not in held:
                        held[id(t)] = _Held(t, saved[id(t)], rebind)
                    held[id(t)].slots.append((table, name))
        return list(held.values())

    def _current(self) -> list[_Held]:
        """The frozen parameters and the buffers in use (in the engine's products, its clones)."""
        entry = self.guarded()
        if not entry:
            return self.params + self.buffers
        if entry != self.entry:  # new clones (each replaced by a copy before each call)
            clones: dict[int, _Held] = {}
            for h in self.buffers:
                for table, name in h.slots:
                    c = table.get(name)
                    if c is None or type(c.data) is not Tensor:
                        continue
                    if id(c) not in clones:
                        clones[id(c)] = _Held(c, h.saved, True)
                    clones[id(c)].slots.append((table, name))
            self.entry, self.clones = entry, list(clones.values())
        return self.params + self.clones

    def __call__(self, adopt: bool = False) -> None:
        """Before a call (``adopt``): undo what the previous call did, hold what changed since.
        Without ``adopt``: undo every change (the end of a measurement). Nothing inside a
        torch.func transform (the engine's forward-mode products): a tensor made there would be
        the transform's, and it refuses writes into captured tensors; calls there see what the
        last call outside left (``"auto"`` drops that kind if its products then differ)."""
        if _transforming():
            return
        with torch.no_grad():
            for h in self._current():
                h.hold(adopt)

    def after(self) -> None:
        """Right after a call: note what it changed, for the next call to undo."""
        if _transforming():
            return
        current = self._current()
        for h in current:
            h.post = _signature(h.t)
        self.calls += 1
        if self.calls == 1:  # once: values the first call changed unseen by the signatures
            with torch.no_grad():
                changed = [h for h in current if not h.rebind and h.changed()]
            slots = {(id(t), n) for h in changed for t, n in h.slots}
            for h in self.params:
                h.volatile = any((id(t), n) in slots for t, n in h.slots)


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
    """:func:`plain_attributes`' result: key → value, ``("length", n)`` for a container,
    ``("tensor", shape, dtype)`` for a tensor; in ``objects`` the containers and tensors
    themselves (to put them back), in ``owners`` the module and attribute name of each key."""

    objects: dict[str, Any]
    owners: dict[str, tuple[nn.Module, str]]


def plain_attributes(module: nn.Module) -> Fingerprint:
    """A cheap fingerprint of the public plain attributes of the module and its submodules
    (keyed ``name`` and ``path.name``): numbers, strings, bools and None by value, lists,
    tuples, dicts and sets by length, tensors that are no parameter or buffer by shape and dtype
    (a stateful RNN's ``self.h = h.detach()`` on a submodule; a counter a forward hook
    advances). A tensor a forward recomputes in place of another alike (the old
    ``nn.utils.spectral_norm``'s and ``weight_norm``'s weights) is no change to name."""
    out = Fingerprint()
    out.objects, out.owners = {}, {}
    metrics: list[str] = []  # their states are put back by saved_metric_states, not here (a
    for path, m in module.named_modules():  # tensor updated in place would undo that restore)
        if _is_metric(m) or any(path.startswith(f"{p}.") for p in metrics):
            metrics.append(path)
            continue
        for name, value in vars(m).items():
            if name.startswith("_") or name in (MARKER, "training"):
                continue
            key = f"{path}.{name}" if path else name
            if value is None or isinstance(value, bool | int | float | str):
                out[key] = value
            elif isinstance(value, list | tuple | dict | set):
                out[key], out.objects[key] = ("length", len(value)), value
            elif isinstance(value, Tensor):  # put back by identity, named if its kind changed
                out[key] = ("tensor", tuple(value.shape), str(value.dtype))
                out.objects[key] = value
            else:
                continue
            out.owners[key] = (m, name)
    return out


_ABSENT = object()


def _same(a: Any, b: Any) -> bool:
    """Equal plain values (NaN equals NaN; a value of another type never does)."""
    return type(a) is type(b) and (a == b or (a != a and b != b))


def changed_attributes(before: Fingerprint, after: Fingerprint) -> list[str]:
    """``"name (before → after)"`` for every attribute whose fingerprint changed."""

    def show(k: str, fingerprint: Fingerprint) -> str:
        if k not in fingerprint:
            return "absent"
        v = fingerprint[k]
        if isinstance(v, tuple):
            return "a tensor" if v[0] == "tensor" else f"length {v[1]}"
        return repr(v)

    keys = {**before, **after}
    names = [k for k in keys if not _same(before.get(k, _ABSENT), after.get(k, _ABSENT))]
    return [f"{k} ({show(k, before)} → {show(k, after)})" for k in names]


def put_back(module: nn.Module, before: Fingerprint, after: Fingerprint) -> None:
    """Undo what a measurement's calls of ``training_step`` did to the plain attributes of the
    module and its submodules: lists cut back to their length (appends undone:
    ``self.training_step_outputs.append(loss)``), numbers, strings, tensors and rebound
    containers set back, attributes it created removed. Dicts and sets that grew in place stay
    as they are."""
    for key, value in before.items():
        owner, name = before.owners[key]
        current = vars(owner).get(name)
        try:  # a name that became a parameter or submodule refuses a plain value: left as is
            if key in before.objects:
                obj = before.objects[key]
                if current is not obj:
                    setattr(owner, name, obj)
                if isinstance(obj, list) and len(obj) > value[1]:
                    del obj[value[1] :]
            elif not _same(current, value):  # a tensor or an array: a different type
                setattr(owner, name, value)
        except (TypeError, ValueError, RuntimeError):
            continue
    for key in after.keys() - before.keys():
        owner, name = after.owners[key]
        vars(owner).pop(name, None)


def warn_side_effects(
    trainer: Any, owner: str, before: Fingerprint, module: nn.Module, calls: int
) -> None:
    """Put back the plain attributes a measurement's calls of the module's training_step
    changed (:func:`put_back`), with one warning naming them (an outputs list, a counter)."""
    from lightning_landscape.callbacks import _logging

    after = plain_attributes(module)
    changed = changed_attributes(before, after)
    put_back(module, before, after)  # also tensors replaced by others alike, without a word
    if changed:
        _logging.warn_once(
            trainer,
            "training-step-side-effects",
            f"{owner} called the module's training_step {calls} times as the loss of a "
            f"measurement, and it changed {', '.join(changed[:3])}. Put back what could be "
            "(appended lists cut to their length, numbers, strings and tensors restored, new "
            "attributes removed; on submodules too); other changes (items popped, dicts and sets updated, in-place edits) "
            "stay. Side effects in training_step run during measurements: "
            "skip them while `lightning_landscape.is_measuring(self)` (or "
            "`self.landscape_measuring`) is True, or pass the monitor "
            "`loss_fn=lambda pl_module, batch: ...`.",
        )
