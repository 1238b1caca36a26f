"""TrajectoryMonitor's snapshots across fits: restored ones checked against the module (and
dropped under sharding, where a checkpoint holds one rank's shards), extended when parameters
become trainable mid-fit, and thinned to ``max_snapshots`` with one warning."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_landscape._core.sharding import ShardLayout, flat_parameters, is_sharded
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.callbacks._refusals import complex_refusal, lazy_refusal
from lightning_landscape.landscape.trajectory import Snapshots


def checked_parameters(snapshots: Snapshots, module: nn.Module) -> Any:
    """The module's flat parameters (a :class:`ShardLayout` under FSDP: pass the FSDP (v1)
    wrapper, if any), after checking that restored snapshots match them.

    Raises:
        ValueError: if the restored snapshots do not have the module's number of parameters.
    """
    pv = flat_parameters(module)
    local = pv.local_dim if isinstance(pv, ShardLayout) else pv.dim
    if isinstance(pv, ShardLayout) and len(snapshots):
        rank_zero_warn(
            "TrajectoryMonitor: snapshots restored from a checkpoint are dropped under a "
            "sharded strategy (the checkpoint holds one rank's shards); the trajectory "
            "starts afresh."
        )
        snapshots.load_state_dict({})
    size = snapshots.tensors[0].numel() if len(snapshots) else local
    if size != local:
        raise ValueError(
            f"TrajectoryMonitor: the restored snapshots have {size} entries but the module "
            f"has {local} trainable parameters."
        )
    return pv


def tracked_parameters(monitor: Any, module: nn.Module, step: int, start: bool = False) -> Any:
    """The parameters the trajectory follows, as one flat vector: those trainable at its first
    snapshot and every one that became trainable since (fine-tuning that unfreezes layers),
    frozen again or not. Earlier snapshots take a newly trainable parameter's current value:
    the value it kept while frozen (one warning). Names are kept in ``monitor.tracked`` (and
    in checkpoints). Under sharding, the trainable parameters (:func:`checked_parameters` at the
    fit's ``start``, where snapshots restored from a checkpoint are dropped).

    Raises:
        ValueError: if restored snapshots do not have the size of the parameters followed.
    """
    if is_sharded(module):  # the trainable parameters; sizes compared on the global dim
        pv = checked_parameters(monitor.snapshots, module) if start else flat_parameters(module)
        before = None if start else getattr(monitor, "tracked_dim", None)
        if before is not None and before != pv.dim:  # alike on every rank
            rank_zero_warn(
                f"TrajectoryMonitor: the trainable parameters changed under a sharded strategy "
                f"({before} to {pv.dim} numbers) before step {step}; the trajectory starts "
                "afresh from here."
            )
            monitor.snapshots.load_state_dict({})
        monitor.tracked, monitor.tracked_dim = None, pv.dim  # names: not followed here
        return pv
    named = dict(module.named_parameters())
    snapshots = monitor.snapshots
    if monitor.tracked is None or not len(snapshots):  # the first snapshot's set
        monitor.tracked = [n for n, p in named.items() if p.requires_grad]
    missing = [n for n in monitor.tracked if n not in named]
    if missing:  # renamed since the checkpoint (torch.compile's `_orig_mod.`): sizes decide
        monitor.tracked = [n for n, p in named.items() if p.requires_grad]
        rank_zero_warn(
            f"TrajectoryMonitor: the snapshots' parameters {missing[:2]} are not in the module; "
            "it follows its trainable parameters instead, if their sizes agree."
        )
    size = sum(named[n].numel() for n in monitor.tracked)
    if len(snapshots) and snapshots.tensors[0].numel() != size:
        raise ValueError(
            f"TrajectoryMonitor: the restored snapshots have {snapshots.tensors[0].numel()} "
            f"entries but the module has {size} parameters to follow."
        )
    old = set(monitor.tracked)
    new = {n for n, p in named.items() if p.requires_grad and n not in old}
    if new:
        spans, offset = {}, 0
        for n in monitor.tracked:
            spans[n], offset = slice(offset, offset + named[n].numel()), offset + named[n].numel()
        union = [n for n in named if n in old or n in new]
        for i, t in enumerate(snapshots.tensors):
            parts = [t[spans[n]] if n in old else named[n].detach().reshape(-1) for n in union]
            snapshots.tensors[i] = torch.cat([x.to("cpu", snapshots.dtype) for x in parts])
        first = next(n for n in union if n in new)
        rank_zero_warn(
            f"TrajectoryMonitor: {len(new)} parameter tensors "
            f"({sum(named[n].numel() for n in new)} numbers, {first!r} first) became trainable "
            f"before step {step}; the trajectory follows them from now on, and its earlier "
            "snapshots take their current values (those they kept while frozen, unless they moved "
            "since)."
        )
        monitor.tracked = union
    return ParamVector([named[n] for n in monitor.tracked])


def start_snapshot(monitor: Any, trainer: Any, module: nn.Module, held: bool = False) -> None:
    """The fit's first snapshot, whatever the schedule (restored ones checked): at the fit's
    start, or with lazy modules once they created their parameters, before the optimizer
    step (the first step's: the initial weights; a later one is named in a warning). None
    with complex parameters: each measurement says why (NaN)."""
    lazy = lazy_refusal(module)
    monitor.awaiting_lazy = lazy is not None  # retried before each optimizer step only then
    if lazy is not None or complex_refusal(module) is not None:
        return
    pv = tracked_parameters(monitor, module, trainer.global_step, start=True)
    if not len(monitor.snapshots):
        monitor.snapshots.add(pv.get(), trainer.current_epoch, trainer.global_step)
        if held and trainer.global_step > 0:
            rank_zero_warn(
                "TrajectoryMonitor: the lazy modules' parameters were created only before step "
                f"{trainer.global_step}; the trajectory starts there."
            )


def join_unfrozen(monitor: Any, trainer: Any, module: nn.Module) -> None:
    """Before an optimizer step: the first snapshot if lazy modules held it back
    (:func:`start_snapshot`); parameters that became trainable join the trajectory while
    they still hold the values they kept frozen (:func:`tracked_parameters`; a cheap check of
    the ``requires_grad`` flags otherwise; nothing under sharding, where no names are
    followed)."""
    if not len(monitor.snapshots):
        if getattr(monitor, "awaiting_lazy", False):
            start_snapshot(monitor, trainer, module, held=True)
        return
    if monitor.tracked is None:
        return
    known = set(monitor.tracked)
    new = [p for n, p in module.named_parameters() if p.requires_grad and n not in known]
    if new and not any(p.is_complex() for p in new):  # complex: the measurements say why (NaN)
        tracked_parameters(monitor, module, trainer.global_step)


def thin_snapshots(monitor: Any) -> None:
    """Keep at most ``monitor.max_snapshots`` snapshots (:meth:`Snapshots.thin`), with one
    warning the first time one is dropped."""
    steps = list(monitor.snapshots.steps)
    dropped = monitor.snapshots.thin(monitor.max_snapshots)
    if dropped and not monitor._warned_thin:
        monitor._warned_thin = True
        rank_zero_warn(
            f"TrajectoryMonitor: more than max_snapshots={monitor.max_snapshots} snapshots; "
            f"dropped the one at step {steps[dropped[0]]} and will thin older ones from now "
            "on (the initial and latest are kept). Raise `max_snapshots` to keep them all."
        )
