"""The monitors under sharded strategies: which ones run, and which are refused at setup.

- ``ModelParallelStrategy`` with FSDP2 (``fully_shard`` in ``configure_model``, 1-D
  data-parallel mesh): every parameter is a DTensor shard. The monitors that support it
  (``supports_sharded``) measure on shards: HessianMonitor by finite differences of gradients
  through FSDP's backward (:mod:`lightning_landscape.curvature.sharded`). Tensor parallelism
  (2-D meshes) is refused at the first measurement, naming the parameter.
- ``FSDPStrategy`` (FSDP1) is refused: it flattens each wrapped module's parameters into one
  padded ``FlatParameter`` per rank and runs the forward through its wrapper, so neither the
  shard layout nor the forward path of FSDP2 applies (and Lightning runs it on GPUs only, where
  it could not be tested here). Use ``ModelParallelStrategy`` with ``fully_shard``.
- DeepSpeed is refused: ZeRO partitions parameters and gradients in its own engine, outside
  torch's DTensor, and steps the optimizer itself.
"""

from __future__ import annotations

import pytorch_lightning as pl

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


_WHY = {
    "fsdp": "FSDP (v1) keeps each rank's parameters in padded FlatParameters behind its wrapper; "
    "the monitors measure sharded models under ModelParallelStrategy (FSDP2: `fully_shard` in "
    "`configure_model`)",
    "deepspeed": "DeepSpeed partitions parameters and gradients in its own engine, outside "
    "torch's DTensor",
}


def refuse_sharded(trainer: pl.Trainer, owner: str, why: str, *, fsdp2: bool = False) -> None:
    """Raise :class:`SetupError` (a ``ValueError``) at setup for a strategy ``owner`` cannot measure under, saying why:
    FSDPStrategy and DeepSpeed always, ModelParallelStrategy unless ``fsdp2`` (then ``why``)."""
    kind = strategy_kind(trainer)
    if kind in _WHY or (kind == "fsdp2" and not fsdp2):
        name = type(trainer.strategy).__name__
        reason = _WHY.get(kind, why)
        raise SetupError(
            f"{owner} does not support the {name} strategy: {reason}. "
            "Use DDP (strategy='ddp' or 'ddp_spawn'), a single device"
            + (" or ModelParallelStrategy with FSDP2." if fsdp2 else ".")
        )
