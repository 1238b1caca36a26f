"""Reductions across torch.distributed ranks (sums and counts only: never ``ReduceOp.AVG``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed(enabled: bool = True) -> bool:
    """True when ``enabled`` and a process group with more than one rank is initialized."""
    return bool(
        enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


def all_reduce_sum_(tensor: Tensor, enabled: bool = True) -> Tensor:
    """Sum ``tensor`` in place over all ranks (no-op without a process group) and return it.

    On the gloo backend the tensor travels through CPU; NCCL keeps it on its GPU.
    """
    if not is_distributed(enabled):
        return tensor
    if dist.get_backend() == "gloo" and tensor.device.type != "cpu":
        host = tensor.detach().cpu()
        dist.all_reduce(host, op=dist.ReduceOp.SUM)
        tensor.copy_(host)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_int(value: int, src: int = 0, enabled: bool = True) -> int:
    """Rank ``src``'s integer, on every rank."""
    if not is_distributed(enabled):
        return value
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buf = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(buf, src=src)
    return int(buf.item())
