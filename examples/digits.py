"""The whole package on a small CNN (BatchNorm, Dropout) on scikit-learn's bundled digits.

Every monitor is attached: Hessian spectrum, gradient-noise temperature and noise scale,
sharpness, and the loss along the trajectory with pictures of the landscape. Logs go to
``lightning_logs/`` for TensorBoard.

    python examples/digits.py                            # SGD, 1 device, 12 epochs
    python examples/digits.py --optimizer entropy-sgd    # Entropy-SGD (L inner steps per outer step)
    python examples/digits.py --devices 2                # 2 CPU processes (DDP, gloo) or 2 GPUs
    python examples/digits.py --no-monitors              # the same run without the monitors
"""

from __future__ import annotations

import argparse
import time
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_landscape import (
    EntropySGD,
    EntropySGDCallback,
    HessianMonitor,
    NoiseTemperatureMonitor,
    SharpnessMonitor,
    TrajectoryMonitor,
)


class DigitsData(pl.LightningDataModule):
    """sklearn's 8x8 digits (1797 images, shipped with scikit-learn: no download), 80/20 split."""

    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        X = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        data = TensorDataset(X, torch.tensor(d.target))
        gen = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set = random_split(data, [1437, 360], generator=gen)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=360)


class DigitsCNN(pl.LightningModule):
    """Two 3x3 conv layers with BatchNorm, max-pooling, Dropout and a linear classifier (5,114
    parameters).

    Args:
        optimizer: ``"sgd"`` (momentum 0.9) or ``"entropy-sgd"``.
        lr: learning rate of SGD, or of the outer step of Entropy-SGD.
        L: Entropy-SGD inner (Langevin) steps per outer step.
    """

    def __init__(
        self, optimizer: Literal["sgd", "entropy-sgd"] = "sgd", lr: float = 0.05, L: int = 5
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/accuracy", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        if self.hparams.optimizer == "entropy-sgd":
            return EntropySGD(
                self.parameters(),
                lr=self.hparams.lr * 10,
                momentum=0.9,
                nesterov=True,
                L=self.hparams.L,
                gamma=0.03,
                scoping=1e-3,
                sgld_lr=self.hparams.lr,
                noise=1e-4,
            )
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def accuracy(pl_module: pl.LightningModule, batch) -> torch.Tensor:
    x, y = batch
    return (pl_module(x).argmax(1) == y).float().mean()


def monitors(max_epochs: int) -> list[pl.Callback]:
    """Every monitor of the package, at a cost that suits a 2-core CPU (still most of the
    example's time: 98 s in all against 13 s with ``--no-monitors``, one measured run each)."""
    return [
        HessianMonitor(every_n_epochs=1, top_k=3, density=True, num_batches=4),
        NoiseTemperatureMonitor(every_n_steps=1),
        SharpnessMonitor(every_n_epochs=1, num_batches=4, local_entropy_gamma=1e4),
        TrajectoryMonitor(
            every_n_epochs=1,
            metric_fn=accuracy,
            metric_name="accuracy",
            num_batches=2,
            grid_size=11,
        ),
    ]


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--optimizer", choices=["sgd", "entropy-sgd"], default="sgd")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32, help="per-device batch")
    parser.add_argument(
        "--accumulate-grad-batches",
        type=int,
        default=2,
        help="micro-batches per optimizer step (they also give the gradient noise scale on one device)",
    )
    parser.add_argument("--no-monitors", action="store_true", help="train without the monitors")
    parser.add_argument("--logdir", default="lightning_logs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pl.seed_everything(args.seed)  # (verbose=False needs Lightning 2.2)
    gpu = torch.cuda.is_available()
    callbacks: list[pl.Callback] = [] if args.no_monitors else monitors(args.max_epochs)
    if args.optimizer == "entropy-sgd":
        callbacks.append(EntropySGDCallback())
    strategy = "auto" if args.devices == 1 else ("ddp" if gpu else "ddp_spawn")
    logger = TensorBoardLogger(
        save_dir=".", name=args.logdir, sub_dir=None, default_hp_metric=False
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="gpu" if gpu else "cpu",
        devices=args.devices,
        strategy=strategy,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=5,
        enable_checkpointing=False,
        accumulate_grad_batches=args.accumulate_grad_batches,
    )
    log_dir = logger.log_dir  # resolve the version now: ddp_spawn children log to this one
    start = time.perf_counter()
    trainer.fit(DigitsCNN(optimizer=args.optimizer), DigitsData(batch_size=args.batch_size))
    if trainer.is_global_zero:
        print(f"\nfinished in {time.perf_counter() - start:.1f} s; logs in {log_dir}")
        print(f"view them with:  tensorboard --logdir {args.logdir}")
    return trainer


if __name__ == "__main__":
    main()
