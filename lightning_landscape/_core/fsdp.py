"""Passes through a sharded module (FSDP2's ``fully_shard`` or FSDP (v1)'s wrapper) over fixed
batches: batch-weighted mean losses (forwards) and gradients (forwards and backwards), reduced
across ranks, with the training's state untouched.

Every forward of a sharded module is a chain of collectives (all-gathers), every backward
another (all-gathers and reduce-scatters), so every rank must make the same number of passes: a
rank with fewer batches pads with its first batch at weight 0. Both FSDPs keep the root's
parameters unsharded after a forward (they expect the backward to follow), and a later forward
reuses them, so each evaluation starts and ends with every FSDP module resharded
(:func:`reshard_all`): perturbed shards are then always all-gathered afresh, and the training's
next forward gathers the restored ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_landscape._core.batches import batch_sizes
from lightning_landscape._core.distributed import all_reduce_sum_, is_distributed
from lightning_landscape._core.fsdp1 import flat_parameters_v1, reshard_fsdp1
from lightning_landscape._core.vectors import flatten

_FOUND: dict[tuple[str, ...], Any] = {}


def _first(attr: str, *modules: str) -> Any:
    """``attr`` of the first of ``modules`` that has it, else None; remembered either way (a
    failed import costs about 20 µs, and FSDP2 is looked for once per submodule). Called only
    at run time, never while torch itself imports."""
    key = (attr, *modules)
    if key not in _FOUND:
        _FOUND[key] = None
        for name in modules:
            try:
                _FOUND[key] = getattr(importlib.import_module(name), attr)
                break
            except (ImportError, AttributeError):
                continue
    return _FOUND[key]


def fsdp2_api() -> tuple[Any, Any, Any]:
    """FSDP2's ``FSDPModule``, ``DTensor`` and ``Shard`` classes, each None where this torch has
    none. Public from torch 2.6 (``torch.distributed.fsdp``) and 2.5 (``torch.distributed.tensor``)
    on; before, private (``torch.distributed._composable.fsdp``, ``torch.distributed._tensor``),
    where users of Lightning's ``ModelParallelStrategy`` (torch >= 2.4) import them from."""
    return (
        _first("FSDPModule", "torch.distributed.fsdp", "torch.distributed._composable.fsdp"),
        _first("DTensor", "torch.distributed.tensor", "torch.distributed._tensor"),
        _first("Shard", "torch.distributed.tensor", "torch.distributed._tensor"),
    )


def is_fsdp2_module(m: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``m`` itself."""
    cls = fsdp2_api()[0]
    return cls is not None and isinstance(m, cls)


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 parameter shard)."""
    cls = fsdp2_api()[1]
    return cls is not None and isinstance(t, cls)


def local_part(t: Tensor) -> Tensor:
    """This rank's part of a sharded parameter or gradient, flat and sharing its storage: the
    local shard of an FSDP2 DTensor; FSDP (v1)'s flat views (and whole tensors) as they are."""
    t = t.detach()
    return (t.to_local() if is_dtensor(t) else t).view(-1)


def reshard_all(module: nn.Module) -> None:
    """Reshard every FSDP2 module and free every FSDP (v1) unit's gathered parameters in
    ``module`` (no collective)."""
    for m in module.modules():
        if is_fsdp2_module(m):
            m.reshard()
    reshard_fsdp1(module)


def fsdp2_policies(module: nn.Module) -> list[Any]:
    """The ``MixedPrecisionPolicy`` of every FSDP2 module in ``module``, as ``fully_shard`` got
    it (``param_dtype``, ``reduce_dtype``; there from ``fully_shard`` on, before any forward).

    torch keeps it privately: as the module state's ``_mp_policy`` and as the ``mp_policy`` of
    its ``FSDPParamGroup`` (``_fsdp_param_groups``, one ``_fsdp_param_group`` in older torch);
    whichever of them this torch has is read, and a module without ``_get_fsdp_state`` gives none.
    """
    policies = []
    for m in module.modules():
        get_state = getattr(m, "_get_fsdp_state", None) if is_fsdp2_module(m) else None
        state = get_state() if get_state is not None else None
        groups = getattr(state, "_fsdp_param_groups", None) or [
            getattr(state, "_fsdp_param_group", None)
        ]
        policies.append(getattr(state, "_mp_policy", None))
        policies += [getattr(g, "mp_policy", None) for g in groups]
    return [p for p in policies if p is not None]


class FSDPBatches:
    """This rank's fixed batches, for passes through a sharded module.

    Built with one all-reduce (every rank builds it together): the total sample count N over
    all ranks and the number of passes (the largest batch count of any rank).

    Args:
        module: the module ``fully_shard`` was applied to, or the FSDP (v1) wrapper.
        batches: this rank's batches.
        world: the number of ranks the parameters are sharded over (FSDP's gradient reduction
            divides by it).
        batch_size_fn: ``batch_size_fn(batch) -> int``; default the leading size.

    Raises:
        ValueError: if a batch size is not positive.
    """

    def __init__(
        self,
        module: nn.Module,
        batches: Sequence[Any],
        world: int,
        batch_size_fn: Callable[[Any], int] | None = None,
    ) -> None:
        self.module, self.batches, self.world = module, list(batches), int(world)
        self.sizes = batch_sizes(self.batches, batch_size_fn)
        self.distributed = is_distributed()
        rank, size = (
            (torch.distributed.get_rank(), torch.distributed.get_world_size())
            if self.distributed
            else (0, 1)
        )
        counts = torch.zeros(1 + size, dtype=torch.float64)
        counts[0] = sum(self.sizes)
        counts[1 + rank] = len(self.batches)
        all_reduce_sum_(counts, self.distributed)
        self.total_size = float(counts[0])
        self.passes = int(counts[1:].max())

    def _each(self) -> list[tuple[Any, float]]:
        """(batch, n_b) for every pass: this rank's batches, then its first at weight 0."""
        padded = [(self.batches[0], 0.0)] * (self.passes - len(self.batches))
        return list(zip(self.batches, map(float, self.sizes), strict=True)) + padded

    @torch.no_grad()
    def mean(self, fn: Callable[[Any], Tensor | float]) -> float:
        """Σ n_b fn(b) / N over every rank's batches; ``fn`` runs (FSDP's forward) the same number
        of times on every rank."""
        acc = torch.zeros(1, dtype=torch.float64)
        reshard_all(self.module)
        try:
            for batch, n in self._each():
                value = float(fn(batch))
                if n > 0:
                    acc[0] += n * value
        finally:
            reshard_all(self.module)
        return float(all_reduce_sum_(acc, self.distributed)[0]) / self.total_size

    def gradient(
        self, loss_fn: Callable[[Any], Tensor], params: Sequence[Tensor]
    ) -> tuple[float, Tensor]:
        """The mean loss Σ n_b L_b / N and this rank's shard of its gradient, through FSDP's own
        backward: the batch weights n_b · world / N undo the reduce-scatter's division by the
        world size (the default of both FSDPs; a factor set by FSDP2's
        ``set_gradient_divide_factor`` is not read, and would scale the result).

        **Why ``.backward()``** (the only one in the package; everything else uses
        ``torch.autograd.grad``): FSDP2 all-gathers the shards into temporary unsharded
        parameters in its pre-forward hooks, so the autograd graph of a loss reaches those, not
        the sharded parameters (``torch.autograd.grad`` w.r.t. them raises "appears to not have
        been used in the graph"). The gradient reaches the shards only through FSDP's backward
        hooks, which reduce-scatter the unsharded gradients and accumulate them into the sharded
        ``.grad``; they run only inside ``backward()``. FSDP (v1) is alike: its wrapper's forward
        gathers the ``FlatParameter`` and its hooks reduce-scatter into ``FlatParameter.grad``,
        of which the original parameters' ``.grad`` are views. So: every parameter's (and
        ``FlatParameter``'s) ``.grad`` object of the module is saved and set to None, the passes
        run, the sharded ``.grad`` is copied out, and the saved objects are put back (the
        training's gradients are never read or written). Post-accumulate-grad hooks on the
        parameters (optimizer-in-backward) would fire: they are not supported.
        """
        every = flat_parameters_v1(self.module) + list(self.module.parameters())
        saved = [p.grad for p in every]
        loss_sum = torch.zeros(1, dtype=torch.float64)
        reshard_all(self.module)
        try:
            for p in every:
                p.grad = None
            with torch.enable_grad():
                for batch, n in self._each():
                    loss = loss_fn(batch)
                    (loss * (n * self.world / self.total_size)).backward()
                    loss_sum[0] += n * float(loss.detach())
            grad = flatten(
                [
                    torch.zeros_like(local_part(p)) if p.grad is None else local_part(p.grad)
                    for p in params
                ]  # fmt: skip
            )
        finally:
            reshard_all(self.module)  # FSDP (v1) takes a .grad of the sharded size only
            for p, g in zip(every, saved, strict=True):
                p.grad = g
        return float(all_reduce_sum_(loss_sum, self.distributed)[0]) / self.total_size, grad
