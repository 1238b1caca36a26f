"""EntropySGDCallback: evaluate and save the anchor x of EntropySGD, log its state."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from lightning_landscape.callbacks._compat import (
    ACCUMULATION_SCHEDULERS,
    DEEPSPEED_STRATEGIES,
    FSDP_STRATEGIES,
    MIXED_PRECISION,
    MODEL_CHECKPOINTS,
    Callback,
)
from lightning_landscape.callbacks._errors import SetupError
from lightning_landscape.optim.entropy_sgd import EntropySGD


class EntropySGDCallback(Callback):
    """Make validation, testing, prediction and checkpoints see the anchor x of EntropySGD.

    With :class:`~lightning_landscape.optim.EntropySGD` in its default ``mode="batches"``, the
    parameters hold the Langevin sample x' between outer updates (Chaudhari et al., ICLR 2017,
    Algorithm 1: the iterate is x; x' only estimates ``⟨x'⟩`` for the local-entropy gradient
    ``γ (x − ⟨x'⟩)``). Like the EMA/SWA callbacks, this callback swaps x into the parameters for
    each validation, test and prediction run and swaps x' back afterwards; it writes x into the
    weights of every checkpoint (the optimizer state keeps x', so resuming continues exactly); and
    a fit that stops mid-cycle ends with x in the parameters. In ``mode="closure"`` the parameters
    always hold x after a step, and the callback only checks the trainer and logs.

    At ``on_fit_start`` it refuses (:class:`~lightning_landscape.callbacks.SetupError`, a
    ``MisconfigurationException`` and a ``ValueError``) a fit with no EntropySGD optimizer, and
    ``mode="closure"`` together with gradient accumulation, fp16 GradScaler or DeepSpeed (the
    closure would not be re-evaluated, or grads would pile up). It warns once for sharded
    strategies (FSDP/DeepSpeed: untested, and shards would draw correlated noise) and for
    weights-only checkpoints (Lightning skips ``on_save_checkpoint`` for them, so mid-cycle they
    hold x').

    Logged metrics (every training batch, through ``pl_module.log``; with several EntropySGD
    optimizers the keys of the i-th, i ≥ 1, end in ``_{i}``):

    * ``entropy_sgd/gamma``: the scope γ_k = min(γ₀ (1 + γ₁)^k, γ_max) of the outer step in
      progress.
    * ``entropy_sgd/outer_step``: k, the number of outer updates done.
    * ``entropy_sgd/anchor_distance``: ‖x − μ‖ over all parameters at the last outer update
      (the local-entropy gradient over γ); absent before the first.

    Cost: nothing per training step beyond logging three scalars (the norm is computed by the
    optimizer once per outer step); two in-place parameter copies for each evaluation run that
    starts mid-cycle; one parameter copy for each checkpoint saved mid-cycle.

    Raises:
        SetupError: at ``on_fit_start``, if no optimizer is an EntropySGD, or one in
            ``mode="closure"`` meets gradient accumulation, fp16 GradScaler or DeepSpeed.

    Example::

        model = MyModule()  # configure_optimizers returns EntropySGD(self.parameters(), ...)
        trainer = pl.Trainer(max_epochs=10, callbacks=[EntropySGDCallback()])
        trainer.fit(model)  # validation and checkpoints see x; the fit ends on x
    """

    def __init__(self) -> None:
        self._swapped: list[EntropySGD] = []

    @staticmethod
    def _optimizers(trainer: pl.Trainer) -> list[EntropySGD]:
        return [opt for opt in trainer.optimizers if isinstance(opt, EntropySGD)]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = self._optimizers(trainer)
        if not optimizers:
            raise SetupError(
                "EntropySGDCallback found no EntropySGD among the optimizers "
                f"{[type(o).__name__ for o in trainer.optimizers]}."
            )
        strategy = trainer.strategy
        for opt in optimizers:
            opt.swap_out_anchor()  # a reused optimizer left on x by a previous fit
            if opt.mode != "closure":
                continue
            scheduled = [
                factor
                for cb in trainer.callbacks
                if isinstance(cb, ACCUMULATION_SCHEDULERS)
                for factor in cb.scheduling.values()
            ]  # a GradientAccumulationScheduler turns accumulation on at a later epoch
            accumulate = max([trainer.accumulate_grad_batches, *scheduled])
            if accumulate > 1:
                raise SetupError(
                    "EntropySGD(mode='closure') cannot be used with gradient accumulation (up "
                    f"to {accumulate} batches a step, by `accumulate_grad_batches` or a "
                    "GradientAccumulationScheduler): its inner gradients would pile up. Use "
                    "mode='batches'."
                )
            precision = trainer.precision_plugin
            if isinstance(precision, MIXED_PRECISION) and precision.scaler is not None:
                raise SetupError(
                    "EntropySGD(mode='closure') cannot be used with fp16 gradient scaling: the "
                    "GradScaler calls `step()` without a closure. Use mode='batches' or bf16."
                )
            if isinstance(strategy, DEEPSPEED_STRATEGIES):
                raise SetupError(
                    "EntropySGD(mode='closure') cannot be used with DeepSpeed, which steps the "
                    "optimizer itself without re-evaluating the closure. Use mode='batches'."
                )
        if isinstance(strategy, FSDP_STRATEGIES + DEEPSPEED_STRATEGIES):
            rank_zero_warn(
                f"EntropySGD under {type(strategy).__name__} is untested: every rank draws the "
                "same noise sequence for its own shard, so shards get correlated noise."
            )
        if any(
            isinstance(cb, MODEL_CHECKPOINTS) and cb.save_weights_only for cb in trainer.callbacks
        ) and any(opt.mode == "batches" and opt.L > 1 for opt in optimizers):
            rank_zero_warn(
                "EntropySGDCallback: Lightning skips `on_save_checkpoint` for weights-only "
                "checkpoints, so one saved mid-cycle holds the Langevin sample x', not the anchor "
                "x. Save full checkpoints, or save every multiple of L steps."
            )

    # ------------------------------------------------------------------ x in, x' back
    def _swap_in(self, trainer: pl.Trainer) -> None:
        for opt in self._optimizers(trainer):
            if opt.swap_in_anchor():
                self._swapped.append(opt)

    def _swap_back(self) -> None:
        while self._swapped:
            self._swapped.pop().swap_out_anchor()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_back()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The fit ends on x; the optimizer keeps x' aside so that a checkpoint saved now resumes
        # mid-cycle exactly.
        for opt in self._optimizers(trainer):
            opt.swap_in_anchor()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._swap_back()
        self.on_train_end(trainer, pl_module)

    # ------------------------------------------------------------------ checkpoints and logs
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        weights = checkpoint.get("state_dict")
        if weights is None:
            return
        names: dict[int, list[str]] = {}
        for name, p in pl_module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        for opt in self._optimizers(trainer):
            if opt.holds_anchor:
                continue
            params = [p for group in opt.param_groups for p in group["params"]]
            for p, anchor in zip(params, opt.anchors(), strict=True):
                for name in names.get(id(p), []):
                    if name in weights:
                        weights[name] = anchor.detach().clone()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for i, opt in enumerate(self._optimizers(trainer)):
            suffix = f"_{i}" if i else ""
            log = dict(on_step=True, on_epoch=False, batch_size=1)
            pl_module.log(f"entropy_sgd/gamma{suffix}", opt.current_gamma, **log)
            pl_module.log(f"entropy_sgd/outer_step{suffix}", float(opt.outer_step), **log)
            if opt.anchor_distance is not None:
                pl_module.log(f"entropy_sgd/anchor_distance{suffix}", opt.anchor_distance, **log)
