"""Gloo process groups in test processes. Spawned ranks (ddp_spawn, mp.spawn) import the test
packages first, and they import this module: Lightning destroys only NCCL process groups at
exit; a gloo group left to interpreter finalization can abort the rank (SIGABRT, "terminate
called without an active exception"), so every process destroys its own."""

import atexit
import time

import torch
import torch.distributed as dist
from packaging.version import Version

# Before torch 2.8 (pytorch/pytorch#154976) the group's destructor held the GIL while joining
# gloo's worker thread, which could still need it to free the last collective's tensors: one
# rank hung for good (seen on torch 2.1 and 2.4).
_DEADLOCKS = Version(torch.__version__).release < (2, 8)


def end_process_group() -> None:
    """Destroy this process's group, a moment after its last collective where torch needs it."""
    if _DEADLOCKS:
        time.sleep(0.05)
    dist.destroy_process_group()


atexit.register(lambda: end_process_group() if dist.is_initialized() else None)
