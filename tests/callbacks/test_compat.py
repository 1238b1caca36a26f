"""The monitors under the unified ``lightning`` package (``import lightning as L``): the Trainer
accepts them, figures and histograms reach its TensorBoardLogger without a false warning, and
the measurement status reaches its progress bar."""

import warnings

import lightning as L
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_landscape import (
    EntropySGD,
    EntropySGDCallback,
    HessianMonitor,
    NoiseTemperatureMonitor,
    TrajectoryMonitor,
)

from ._helpers import events, random_classes


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordingBar(L.pytorch.callbacks.TQDMProgressBar):
    """A lightning progress bar that remembers the postfix texts of its train bar."""

    def __init__(self):
        super().__init__()
        self.texts = []

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        show = bar.set_postfix_str

        def record(text="", refresh=True):
            self.texts.append(text)
            show(text, refresh)

        bar.set_postfix_str = record
        return bar


def test_monitors_are_callbacks_of_both_packages():
    for monitor in (HessianMonitor(), NoiseTemperatureMonitor(), TrajectoryMonitor()):
        assert isinstance(monitor, L.pytorch.Callback)
        assert isinstance(monitor, pl.Callback)


def test_figures_histograms_and_status_reach_lightning(tmp_path):
    bar = RecordingBar()
    hessian = HessianMonitor(epochs=[1], density=True, density_steps=20, trace=False)
    trajectory = TrajectoryMonitor(epochs=[1], num_points=3, grid_size=3, slices=False)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="tb"),
        callbacks=[hessian, trajectory, bar],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(), DataLoader(random_classes(), batch_size=8))
    assert not [w for w in caught if "TensorBoard only" in str(w.message)]
    ea = events(trainer.logger.log_dir)
    assert {"hessian/spectral_density", "trajectory/pca_landscape"} <= set(ea.Tags()["images"])
    assert "hessian/eigenvalue_histogram" in ea.Tags()["histograms"]
    assert "hessian/eigenvalue_1" in ea.Tags()["scalars"]
    assert any(t.startswith("HessianMonitor: ") for t in bar.texts)
    assert any(t.startswith("TrajectoryMonitor: ") for t in bar.texts)


class EntropyClassifier(Classifier):
    def configure_optimizers(self):
        return EntropySGD(self.parameters(), lr=0.1, L=2)


def test_entropy_sgd_callback_sees_lightning_checkpoints(tmp_path):
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path), save_weights_only=True)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        callbacks=[EntropySGDCallback(), checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="weights-only"):
        trainer.fit(EntropyClassifier(), DataLoader(random_classes(), batch_size=8))
