"""Shared pieces of the callback tests: a tiny float64 classifier, its data, a quiet CPU Trainer
and readers of what reached TensorBoard (like ``tests/curvature/_problems.py`` for the engine)."""

from __future__ import annotations

import glob
import math
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from packaging.version import Version
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import TensorDataset


class Classifier(pl.LightningModule):
    """Linear(6, 8) [BatchNorm] Tanh Dropout Linear(8, 3), cross-entropy, SGD with momentum;
    ``nan = True`` makes ``training_step`` return NaN."""

    def __init__(self, bn: bool = False, dropout: float = 0.0, dtype=torch.float64, lr=0.2):
        super().__init__()
        layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else [])
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3)]
        self.net = nn.Sequential(*layers).to(dtype)
        self.lr = lr
        self.nan = False

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss * math.nan if self.nan else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


LIGHTNING_2_1 = Version(pl.__version__) < Version("2.2")  # the oldest that pyproject.toml allows


def random_classes(n: int = 40, dtype=torch.float64, seed: int = 0) -> TensorDataset:
    """n points in R⁶ with random labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)
    )


def learnable_classes(n: int = 40, seed: int = 0) -> TensorDataset:
    """n points in R⁶ labelled by two thresholds on the first coordinates (learnable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def make_trainer(tmp_path, callbacks=(), max_epochs=2, logger=True, **kw) -> pl.Trainer:
    """A CPU Trainer without checkpoints (unless ``enable_checkpointing``), progress bar or model
    summary; ``logger=True`` is a TensorBoardLogger under ``tmp_path/tb``."""
    if logger is True:
        logger = TensorBoardLogger(str(tmp_path), name="tb")
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=logger,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        enable_progress_bar=kw.pop("enable_progress_bar", False),
        enable_model_summary=False,
        accelerator="cpu",
        devices=kw.pop("devices", 1),
        default_root_dir=str(tmp_path),
        **kw,
    )


def events(log_dir) -> EventAccumulator:
    """The TensorBoard events of one run folder (scalars, images and histograms, all kept)."""
    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    return ea


def scalars(path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every TensorBoard event file under ``path``."""
    out: dict[str, dict[int, float]] = {}
    for folder in sorted(
        {os.path.dirname(f) for f in glob.glob(f"{path}/**/events.*", recursive=True)}
    ):
        acc = EventAccumulator(folder, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out
