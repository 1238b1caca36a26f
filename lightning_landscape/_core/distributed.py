"""Collectives across torch.distributed ranks: sums and counts only (an average is a sum divided
by a summed count, which is right for unequal shards and on every backend).

A tensor travels on the device its backend needs: CPU for gloo, the current GPU for NCCL
(Lightning's multi-GPU DDP starts an NCCL-only group, which refuses CPU tensors), and comes back
to the device it came from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed(enabled: bool = True) -> bool:
    """True when ``enabled`` and a process group with more than one rank is initialized."""
    return bool(
        enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


def collective_device(tensor: Tensor) -> torch.device:
    """The device the backend of the default group needs ``tensor`` on."""
    if dist.get_backend() == "nccl":
        return (
            tensor.device if tensor.is_cuda else torch.device("cuda", torch.cuda.current_device())
        )
    return torch.device("cpu")


def all_reduce_sum_(tensor: Tensor, enabled: bool = True) -> Tensor:
    """Sum ``tensor`` in place over all ranks (no-op without a process group) and return it."""
    if not is_distributed(enabled):
        return tensor
    device = collective_device(tensor)
    if device == tensor.device:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    else:
        moved = tensor.detach().to(device)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        tensor.copy_(moved)
    return tensor


def all_reduce_max_(tensor: Tensor, enabled: bool = True) -> Tensor:
    """The elementwise largest ``tensor`` over all ranks, in place (no-op without a process
    group), and return it: for decisions every rank must take alike, not for statistics."""
    if not is_distributed(enabled):
        return tensor
    moved = tensor.detach().to(collective_device(tensor))
    dist.all_reduce(moved, op=dist.ReduceOp.MAX)
    return tensor.copy_(moved)


def broadcast(tensor: Tensor, src: int = 0, enabled: bool = True) -> Tensor:
    """Rank ``src``'s copy of ``tensor`` on every rank (a new tensor on ``tensor``'s device)."""
    if not is_distributed(enabled):
        return tensor
    buf = tensor.detach().clone().to(collective_device(tensor))
    dist.broadcast(buf, src=src)
    return buf.to(tensor.device)


def broadcast_int(value: int, src: int = 0, enabled: bool = True) -> int:
    """Rank ``src``'s integer, on every rank."""
    if not is_distributed(enabled):
        return value
    return int(broadcast(torch.tensor([value], dtype=torch.int64), src).item())
