"""The monitors under sharded strategies: which ones run, on what, and which are refused at setup.

- ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``, 1-D
  data-parallel mesh): every parameter is a DTensor shard. The finite-difference monitors
  refuse at their first measurement (``configure_model`` runs after the callbacks' setup),
  naming the parameter or the policy: tensor parallelism (2-D meshes), HSDP, a parameter left
  out of ``fully_shard``, half-precision parameters, a ``MixedPrecisionPolicy`` with a
  float16/bfloat16 ``param_dtype`` or ``reduce_dtype``. The verdict is the same on every rank:
  the measurement logs NaN with one warning and training goes on.
- ``FSDPStrategy`` (FSDP v1): Lightning wraps the LightningModule in ``FullyShardedDataParallel``
  (or the module holds units it wrapped in ``configure_model``); with ``use_orig_params=True``
  (Lightning's default) the original parameters are flat views of each rank's slice of the
  units' ``FlatParameter``. The measurements run the module inside the wrapper's forward, as
  Lightning runs ``training_step`` (:func:`fsdp_wrapper`). Refused at setup, with the option
  to change: ``use_orig_params=False``, CPU offload, hybrid sharding, ``NO_SHARD`` on several
  ranks, and half-precision parameters or gradient reduction (``precision`` other than
  ``"32-true"``, or a ``mixed_precision`` with float16/bfloat16): finite differences of
  half-precision gradients are dominated by round-off.

The monitors that support both (``supports_sharded``) measure on shards: HessianMonitor by
finite differences of gradients through FSDP's backward
(:mod:`lightning_landscape.curvature.sharded`). DeepSpeed is refused: ZeRO partitions
parameters and gradients in its own engine, outside torch's FSDP, and steps the optimizer itself.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_landscape._core.fsdp import fsdp2_policies, reshard_all
from lightning_landscape._core.sharding import check_dtensors, is_fsdp2, is_sharded
from lightning_landscape.callbacks._errors import SetupError


def strategy_kind(trainer: pl.Trainer) -> str:
    """``"fsdp2"``, ``"fsdp"``, ``"deepspeed"`` or ``""`` (unsharded) for the trainer's strategy,
    from the class name (subclasses and fakes in tests included)."""
    names = [cls.__name__ for cls in type(trainer.strategy).__mro__]
    if "ModelParallelStrategy" in names:
        return "fsdp2"
    if any("DeepSpeed" in n for n in names):
        return "deepspeed"
    if any("FSDP" in n for n in names):
        return "fsdp"
    return ""


def sharded_fit(trainer: pl.Trainer, pl_module: nn.Module) -> bool:
    """Whether the module is, or will be, sharded (at setup, before ``configure_model`` and the
    strategy's wrapping, the strategy tells)."""
    return strategy_kind(trainer) in ("fsdp", "fsdp2") or is_sharded(pl_module)


_HALF = (torch.float16, torch.bfloat16)


def _half_dtypes(policies: list[object]) -> list[str]:
    """``"param_dtype=torch.bfloat16"`` and the like: the float16/bfloat16 forward and reduction
    dtypes of mixed-precision policies (FSDP (v1)'s ``MixedPrecision``, FSDP2's
    ``MixedPrecisionPolicy``), each once."""
    found = [
        f"{key}={dtype}"
        for policy in policies
        for key in ("param_dtype", "reduce_dtype")
        if (dtype := getattr(policy, key, None)) in _HALF
    ]
    return list(dict.fromkeys(found))


def _half_problem(half_dtypes: list[str], fix: str) -> str:
    """Why finite differences cannot run with these half-precision dtypes, and ``fix``."""
    return (
        f"a half-precision forward or gradient reduction ({', '.join(half_dtypes)}) drowns "
        f"finite differences in round-off ({fix})"
    )


def _fsdp1_problems(trainer: pl.Trainer, half: bool) -> list[str]:
    """What in the ``FSDPStrategy``'s configuration the sharded measurements cannot work with
    (``half``: half precision included)."""
    strategy = trainer.strategy
    kwargs = getattr(strategy, "kwargs", None) or {}
    sharding = getattr(getattr(strategy, "sharding_strategy", None), "name", "FULL_SHARD")
    precision = getattr(strategy, "mixed_precision_config", None)
    half_dtypes = _half_dtypes([precision]) if half else []
    world = int(getattr(trainer, "world_size", 1) or 1)
    problems = [
        (kwargs.get("use_orig_params", True) is False, "use_orig_params=False registers no "
         "original parameters (set use_orig_params=True, Lightning's default)"),
        (getattr(getattr(strategy, "cpu_offload", None), "offload_params", False),
         "cpu_offload keeps the shards on the CPU (drop cpu_offload)"),
        ("HYBRID" in sharding, f"sharding_strategy={sharding} replicates the shards across "
         "nodes (use FULL_SHARD or SHARD_GRAD_OP)"),
        (sharding == "NO_SHARD" and world > 1, "sharding_strategy=NO_SHARD replicates every "
         "parameter, as DDP does (use FULL_SHARD, or strategy='ddp')"),
        (bool(half_dtypes), _half_problem(half_dtypes, "use precision='32-true' and no "
         "half-precision `mixed_precision`")),
    ]  # fmt: skip
    return [why for bad, why in problems if bad]


def refuse_sharded(
    trainer: pl.Trainer, owner: str, why: str, *, sharded: bool = False, half: bool = True
) -> None:
    """Raise :class:`SetupError` (a ``ValueError``) at setup for a strategy ``owner`` cannot
    measure under, saying why: DeepSpeed always; ModelParallelStrategy and FSDPStrategy unless
    ``sharded`` (then ``why``); FSDPStrategy configurations the sharded measurements cannot work
    with (see the module's docstring; half precision only with ``half``: finite differences)."""
    kind = strategy_kind(trainer)
    name = type(trainer.strategy).__name__
    if kind == "deepspeed" or (kind in ("fsdp", "fsdp2") and not sharded):
        reason = (
            "DeepSpeed partitions parameters and gradients in its own engine, outside torch's FSDP"
            if kind == "deepspeed"
            else why
        )
        raise SetupError(
            f"{owner} does not support the {name} strategy: {reason}. "
            "Use DDP (strategy='ddp' or 'ddp_spawn'), a single device"
            + (", ModelParallelStrategy (FSDP2) or FSDPStrategy." if sharded else ".")
        )
    problems = _fsdp1_problems(trainer, half) if kind == "fsdp" else []
    if problems:
        raise SetupError(f"{owner} cannot measure under this {name}: {'; '.join(problems)}.")


def fsdp_wrapper(trainer: pl.Trainer, pl_module: nn.Module) -> nn.Module | None:
    """The ``FullyShardedDataParallel`` wrapper ``pl_module`` runs inside under ``FSDPStrategy``
    (``trainer.strategy.model``); None otherwise, and when the module holds its FSDP units
    itself (wrapped in ``configure_model``)."""
    model = getattr(trainer.strategy, "model", None)
    if strategy_kind(trainer) != "fsdp" or model is None or model is pl_module:
        return None
    return model


def check_sharded(module: nn.Module, owner: str, upcast: bool) -> None:
    """Reshard every FSDP module of a sharded ``module`` (a forward may have left the root's
    parameters gathered), and refuse half-precision parameters there, and a half-precision
    ``param_dtype`` or ``reduce_dtype`` in an FSDP2 module's ``MixedPrecisionPolicy`` (set in
    ``configure_model``, after the callbacks' setup: seen first here).

    Raises:
        SetupError: (a ``ValueError``) if ``module`` is sharded and ``upcast`` (half-precision
            parameters), an FSDP2 module holds a trainable parameter that is not a ``Shard(0)``
            DTensor on one 1-D mesh spanning every rank (tensor parallelism, HSDP, a parameter
            left out of ``fully_shard``), or an FSDP2 policy computes or reduces in half
            precision.
    """
    if not is_sharded(module):
        return
    reshard_all(module)
    if upcast:
        raise SetupError(
            f"{owner}: half-precision parameters under FSDP cannot be upcast for the "
            "measurement (FSDP owns their storage), and finite differences in half precision "
            "are meaningless; keep float32 parameters (and no half-precision FSDP2 "
            "MixedPrecisionPolicy)."
        )
    if is_fsdp2(module):  # every rank holds the same placements: the same verdict everywhere
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        try:
            check_dtensors([p for _, p in named], [n for n, _ in named])
        except ValueError as err:
            raise SetupError(f"{owner} cannot measure this FSDP2 model: {err}") from err
    half_dtypes = _half_dtypes(fsdp2_policies(module))
    if half_dtypes:
        fix = "give fully_shard an mp_policy without a float16/bfloat16 param_dtype or reduce_dtype"
        raise SetupError(
            f"{owner} cannot measure under FSDP2's MixedPrecisionPolicy: "
            f"{_half_problem(half_dtypes, fix)}."
        )


def sharded_refusal(
    wrapper: nn.Module | None, pl_module: nn.Module, owner: str, upcast: bool
) -> SetupError | None:
    """:func:`check_sharded` on the FSDP (v1) ``wrapper`` if any, else on ``pl_module``; its
    refusal returned instead of raised: the monitor logs NaN and warns once (the same on every
    rank, so no rank waits in a collective), and training goes on."""
    try:
        check_sharded(pl_module if wrapper is None else wrapper, owner, upcast)
    except SetupError as err:
        return err
    return None
