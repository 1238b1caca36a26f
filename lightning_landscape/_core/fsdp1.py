"""FSDP (v1, ``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``): where this rank's part
of each original parameter lies, how to reshard, and how to run a function inside the wrapper's
forward.

FSDP (v1) flattens the parameters of each wrapped unit into one ``FlatParameter``, pads it and
gives each rank one contiguous slice. With ``use_orig_params=True`` (Lightning's default) the
original parameters stay registered, as flat *views* into this rank's slice: the piece of each
parameter that falls in the slice (possibly cut mid-row, possibly empty), without the padding;
after a backward their ``.grad`` are views into the slice of the reduce-scattered gradient
(``FlatParameter.grad``). Those pieces, in the module's parameter order, are this rank's part of
the whole vector (:func:`shard_pieces`), exactly as FSDP2's row shards are
(:class:`~.sharding.ShardLayout` takes both). With ``NO_SHARD`` (what FSDP picks on one rank)
every piece is the whole parameter.

The unsharded parameters of a unit are all-gathered in its pre-forward and, for the root unit,
kept after a forward without backward; a later forward reuses them without gathering again
(:meth:`FlatParamHandle.needs_unshard`). :func:`reshard_fsdp1` frees them (torch's own
``_reshard``, private to torch: FSDP (v1) has no public reshard), so that shards written in place
are gathered afresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_landscape._core.distributed import is_distributed

#: (first index in the flattened parameter, number of entries) of this rank's piece, and the
#: size of the group the parameter is sharded over
Piece = tuple[int, int, int]


def fsdp1_units(module: nn.Module) -> list[Any]:
    """The ``FullyShardedDataParallel`` modules in ``module`` that hold parameters."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return []
    return [
        m
        for m in module.modules()
        if isinstance(m, FullyShardedDataParallel) and getattr(m, "_handle", None) is not None
    ]


def is_fsdp1(module: nn.Module) -> bool:
    """Whether ``module`` is, or holds, an FSDP (v1) wrapper with parameters."""
    return bool(fsdp1_units(module))


def _check_handle(handle: Any, world: int) -> None:
    """Raise ValueError for a unit whose shards are not this rank's part of the whole vector."""
    from torch.distributed.fsdp._flat_param import HandleShardingStrategy as S

    strategy = handle._sharding_strategy
    problems = [
        (not handle._use_orig_params, "use_orig_params=False: the original parameters are not "
         "registered (set use_orig_params=True, Lightning's default)"),
        (handle._offload_params, "CPU offload: the shards live on the CPU, not the device the "
         "forward runs on (drop cpu_offload)"),
        (strategy in (S.HYBRID_SHARD, S._HYBRID_SHARD_ZERO2), f"{strategy.name}: parameters are "
         "replicated across shard groups (use FULL_SHARD or SHARD_GRAD_OP)"),
        (strategy == S.NO_SHARD and world > 1, "NO_SHARD on several ranks: every rank holds "
         "every parameter, as under DDP (use FULL_SHARD, or the DDP strategy)"),
        (strategy != S.NO_SHARD and handle.world_size != world, f"parameters sharded over "
         f"{handle.world_size} of the {world} ranks (shard over every rank)"),
        (handle._keep_low_precision_grads, "keep_low_precision_grads=True: the gradients stay in "
         "half precision (drop it)"),
    ]  # fmt: skip
    for bad, why in problems:
        if bad:
            raise ValueError(f"FSDP (v1) with {why}; the sharded measurements need each "
                             "rank's slice of every parameter, sharded over all ranks.")  # fmt: skip


def shard_pieces(module: nn.Module) -> dict[int, tuple[Piece, tuple[int, ...]]]:
    """``id(parameter) -> ((start, count, world), whole shape)`` for every original parameter of
    the FSDP (v1) units of ``module``: this rank holds entries ``[start, start + count)`` of the
    flattened parameter (``count`` may be 0). No collective.

    Raises:
        ValueError: for a unit built with ``use_orig_params=False``, CPU offload, hybrid
            sharding, ``keep_low_precision_grads``, ``NO_SHARD`` on several ranks or a process
            group that is not every rank.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if is_distributed() else 1
    pieces: dict[int, tuple[Piece, tuple[int, ...]]] = {}
    for unit in fsdp1_units(module):
        handle = unit._handle
        _check_handle(handle, world)
        flat = handle.flat_param
        for p, info, shape in zip(flat._params, flat._shard_param_infos, flat._shapes, strict=True):
            if not handle.uses_sharded_strategy:  # NO_SHARD (on one rank): the whole parameter
                piece = (0, math.prod(shape), 1)
            elif info.in_shard:
                piece = (info.intra_param_start_idx, info.numel_in_shard, world)
            else:
                piece = (0, 0, world)
            pieces[id(p)] = (piece, tuple(shape))
    return pieces


def flat_parameters_v1(module: nn.Module) -> list[Any]:
    """The ``FlatParameter`` of every FSDP (v1) unit (their ``.grad`` hold the training's sharded
    gradients; the original parameters' ``.grad`` are views into them)."""
    return [unit._handle.flat_param for unit in fsdp1_units(module)]


def reshard_fsdp1(module: nn.Module) -> None:
    """Free the unsharded ``FlatParameter`` of every FSDP (v1) unit that still holds one (the
    root's after a forward without backward); no collective. (Before the first forward, FSDP's
    lazy initialization has not made one yet.)"""
    from torch.distributed.fsdp._runtime_utils import _reshard

    for unit in fsdp1_units(module):
        handle = unit._handle
        made = hasattr(handle.flat_param, "_full_param_padded")
        if handle.uses_sharded_strategy and made and not handle.needs_unshard():
            _reshard(unit, handle, True)


def through(
    wrapper: nn.Module, module: nn.Module, fn: Callable[[Any], Any]
) -> Callable[[Any], Any]:
    """``fn(batch)`` run as the forward of ``module`` inside ``wrapper`` (the FSDP (v1) root that
    wraps it), as Lightning runs ``training_step``: the wrapper's pre-forward gathers the
    parameters and its post-forward registers the hooks of FSDP's backward. ``module.forward``
    is put back before ``fn`` runs (so ``self(x)`` inside it is the module's own forward).
    """

    def run(batch: Any) -> Any:
        had = "forward" in module.__dict__
        saved = module.__dict__.get("forward")

        def restore() -> None:
            if had:
                module.__dict__["forward"] = saved
            else:
                module.__dict__.pop("forward", None)

        def inner(*args: Any, **kwargs: Any) -> Any:
            restore()
            return fn(batch)

        module.__dict__["forward"] = inner
        try:  # one (ignored) input: FSDP's pre-forward before torch 2.6 indexes the first
            return wrapper(None)
        finally:
            restore()

    return run
