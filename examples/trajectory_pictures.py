"""Pictures of the TrajectoryMonitor on sklearn's digits (a small MLP, a few epochs, CPU, ~1 min).

Trains with ``TrajectoryMonitor`` and copies one PNG of each kind into ``--out`` (default
``landscape_figures/`` in the current directory; the README's pictures: ``--out docs/``):
``trajectory_interpolation.png`` (loss and accuracy from the initial to the final weights),
``trajectory_pca.png`` (the trajectory on its PCA plane over the loss contour) and
``trajectory_slice_2d.png`` (a 2-D slice along filter-normalized random directions).

Run: ``python examples/trajectory_pictures.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import TrajectoryMonitor


class DigitsMLP(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def accuracy(module: pl.LightningModule, batch) -> torch.Tensor:
    x, y = batch
    return (module.net(x).argmax(-1) == y).float().mean()


def main(out: str, epochs: int = 8) -> None:
    pl.seed_everything(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    monitor = TrajectoryMonitor(
        epochs=[0, 1, 2, 4, 6, epochs],
        metric_fn=accuracy,
        metric_name="accuracy",
        alpha_margin=0.2,
        num_batches=4,
        grid_size=21,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            max_epochs=epochs,
            callbacks=[monitor],
            logger=TensorBoardLogger(tmp, name="digits"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(DigitsMLP(), loader)
        figures = os.path.join(trainer.logger.log_dir, "figures")
        os.makedirs(out, exist_ok=True)
        for tag, name in (
            ("trajectory_loss_init_to_current", "trajectory_interpolation.png"),
            ("trajectory_pca_landscape", "trajectory_pca.png"),
            ("trajectory_slice_2d", "trajectory_slice_2d.png"),
        ):
            last = max(glob.glob(os.path.join(figures, f"{tag}_step*.png")), key=_step)
            shutil.copy(last, os.path.join(out, name))
            print(f"{last} -> {os.path.join(out, name)}")
    for entry in monitor.history:
        print({k: round(v, 4) for k, v in entry.items()})


def _step(path: str) -> int:
    return int(path.rsplit("_step", 1)[1].removesuffix(".png"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="landscape_figures", help="folder for the PNGs")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    main(os.path.normpath(args.out), args.epochs)
