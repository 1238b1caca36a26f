"""TrajectoryMonitor's snapshots across fits: restored ones checked against the module (and
dropped under sharding, where a checkpoint holds one rank's shards), and thinned to
``max_snapshots`` with one warning."""

from __future__ import annotations

from typing import Any

from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_landscape._core.sharding import ShardLayout, flat_parameters
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
