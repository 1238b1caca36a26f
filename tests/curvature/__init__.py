"""Spawned ranks (ddp_spawn, mp.spawn) import this package first. Lightning destroys only NCCL
process groups at exit; a gloo group left to interpreter finalization can abort the rank
(SIGABRT, "terminate called without an active exception"), so every process destroys its own."""

import atexit
import time

import torch.distributed as dist


def end_process_group() -> None:
    """Destroy the group after a moment: before torch 2.8 (pytorch#154976) the destructor held
    the GIL while gloo's worker thread could still need it to free the last collective's
    tensors (one rank hung for good, seen on torch 2.1 and 2.4)."""
    time.sleep(0.05)
    dist.destroy_process_group()


atexit.register(lambda: end_process_group() if dist.is_initialized() else None)
