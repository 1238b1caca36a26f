"""Spawned ranks (ddp_spawn, mp.spawn) import this package first. Lightning destroys only NCCL
process groups at exit; a gloo group left to interpreter finalization can abort the rank
(SIGABRT, "terminate called without an active exception"), so every process destroys its own."""

import atexit

import torch.distributed as dist

atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
