"""TrajectoryMonitor's snapshots when the trainable parameters change mid-fit."""

import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_landscape import TrajectoryMonitor

from ._helpers import Classifier, learnable_classes, make_trainer


class _Unfreezing(Classifier):
    """The first layer frozen for the first epoch, then trained (fine-tuning)."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)
        self.first = [p.detach().clone() for p in self.net[0].parameters()]

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.net[0].requires_grad_(True)


def test_parameters_that_become_trainable_join_the_trajectory(tmp_path):
    """The unfrozen layer joins every snapshot with the value it kept while frozen: one warning,
    no NaN, distances over all parameters followed."""
    mon = TrajectoryMonitor(every_n_epochs=1, num_points=3, grid_size=2, slices=False)
    model = _Unfreezing()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [mon], max_epochs=3, logger=False).fit(
            model, DataLoader(learnable_classes(), batch_size=8)
        )
    said = [str(w.message) for w in caught if "became trainable" in str(w.message)]
    assert len(said) == 1 and "'net.0.weight' first" in said[0], said
    assert not [w for w in caught if "failed" in str(w.message)]
    assert all(math.isfinite(h["trajectory/loss"]) for h in mon.history), mon.history
    names = [n for n, _ in model.named_parameters()]
    assert mon.tracked == names and mon.snapshots.steps == [0, 5, 10, 15]
    dim = sum(p.numel() for p in model.parameters())
    first = torch.cat([p.reshape(-1) for p in model.first]).float()
    for snap in mon.snapshots.tensors:
        assert snap.numel() == dim
    for snap in mon.snapshots.tensors[:2]:  # the layer was frozen until after step 5
        assert torch.equal(snap[: first.numel()], first)
    now = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float()
    init = mon.snapshots.tensors[0]
    distance = mon.history[-1]["trajectory/distance_from_init"]
    assert distance == pytest.approx(torch.dist(now, init).item(), rel=1e-6)


class _Refreezing(Classifier):
    """The first layer trained for one epoch, then frozen (its parameters are still followed)."""

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.net[0].requires_grad_(False)


def test_parameters_frozen_again_stay_in_the_trajectory_and_its_pictures(tmp_path):
    mon = TrajectoryMonitor(every_n_epochs=1, num_points=3, grid_size=2, slices=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [mon], max_epochs=2, logger=False).fit(
            _Refreezing(), DataLoader(learnable_classes(), batch_size=8)
        )
    assert not [w for w in caught if "failed" in str(w.message)], [str(w.message) for w in caught]
    rows = mon.history + mon.pictures
    assert rows and all(math.isfinite(v) for row in rows for v in row.values()), rows
    assert mon.tracked == [n for n, _ in _Refreezing().named_parameters()]
