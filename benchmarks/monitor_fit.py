"""A few training steps in a real Lightning ``Trainer``, then (optionally) one HessianMonitor
measurement at the end of that epoch, as a user's run would take it; with the peak memory of a
step and of the measurement (``benchmarks/gpu.py`` and ``benchmarks/memory.py``).

The memory is read by a *meter*: ``baseline()`` just before each step but the first (which
makes the optimizer state and pays the one-time allocations of a first step), ``peak()`` after
it, ``reset_peak()`` just before the monitor measures and ``peak()`` just after. The callbacks around
the monitor run in list order, so the measurement's peak is its own. The measurement happens
after the step, as at any epoch end: the gradients and the optimizer state (SGD with momentum)
are resident, as in training.

``quiet_trainer`` is the Trainer of every benchmark that fits (nothing logged, saved or printed),
and ``timed_fit`` the timed digits run of the overhead benchmarks (``hessian_monitor.py``,
``monitor_overhead_noise_sharpness.py``).
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A ``Trainer`` with no logger, checkpoints, progress bar or model summary, on the CPU unless
    ``accelerator`` is given: a benchmark's fit times the training and the monitors alone."""
    return pl.Trainer(
        **{"accelerator": "cpu", **kwargs},
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


class DigitsMLP(pl.LightningModule):
    """A 64-``width``-10 MLP with BatchNorm and Dropout, cross-entropy, SGD with momentum."""

    def __init__(self, width: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(width, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def digits_loader(batch_size: int) -> DataLoader:
    """scikit-learn's 1,797 digits (pixels / 16), shuffled."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return DataLoader(TensorDataset(X, torch.tensor(d.target)), batch_size=batch_size, shuffle=True)


def timed_fit(
    callbacks: list, epochs: int, width: int = 128, batch_size: int = 64, **trainer_kwargs: Any
) -> tuple[float, int]:
    """Fit ``DigitsMLP(width)`` on the digits with ``callbacks`` from seed 0: the wall time of the
    fit (model and data included) and the optimizer steps taken."""
    pl.seed_everything(0)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **trainer_kwargs)
    start = time.perf_counter()
    trainer.fit(DigitsMLP(width), digits_loader(batch_size))
    return time.perf_counter() - start, trainer.global_step


class Wrapped(pl.LightningModule):
    """A LightningModule around ``net`` whose training step is ``loss_fn(batch)``."""

    def __init__(self, net: nn.Module, loss_fn: Callable, lr: float) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.loss_fn(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class _Before(Callback):
    def __init__(self, meter: Any, out: dict) -> None:
        self.meter, self.out = meter, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx >= 1:
            self.meter.baseline()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= 1:
            self.out.setdefault("train_steps", []).append(self.meter.peak())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.meter.reset_peak()


class _After(Callback):
    def __init__(self, meter: Any, out: dict) -> None:
        self.meter, self.out = meter, out

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.out["measurement"] = self.meter.peak()


def fit_one_step(
    net: nn.Module,
    loss_fn: Callable,
    tensors: tuple[torch.Tensor, ...],
    batch_size: int,
    meter: Any,
    monitor_kwargs: dict | None = None,
    accelerator: str = "cpu",
    lr: float = 0.01,
    steps: int = 6,
) -> dict:
    """Fit ``steps`` steps of batch ``batch_size`` on ``TensorDataset(*tensors)``; with
    ``monitor_kwargs`` a ``HessianMonitor(epochs=[1], **monitor_kwargs)`` measures after them.

    Returns ``{"train_step": peak, "train_steps": [...], "measurement": peak, "metrics": {...},
    "warnings": [...]}``: the peaks as the meter reports them (``train_step`` the largest over the
    steps after the first, each from its own baseline; the measurement's from the baseline of
    the last step), and the metrics of the monitor's measurement.
    """
    out: dict = {}
    callbacks: list[Callback] = [_Before(meter, out)]
    monitor = None
    if monitor_kwargs is not None:
        from lightning_landscape.callbacks.hessian import HessianMonitor

        monitor = HessianMonitor(epochs=[1], **monitor_kwargs)
        callbacks.append(monitor)
    callbacks.append(_After(meter, out))
    loader = DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=False)
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = quiet_trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=1,
            limit_train_batches=steps,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=callbacks,
        )
        trainer.fit(Wrapped(net, loss_fn, lr), train_dataloaders=loader)
    peaks = [p for p in out.get("train_steps", []) if p is not None]
    out["train_step"] = max(peaks) if peaks else None
    out["metrics"] = dict(monitor.history[0]) if monitor is not None and monitor.history else {}
    out["warnings"] = [str(w.message) for w in caught if "Monitor" in str(w.message)]
    return out
