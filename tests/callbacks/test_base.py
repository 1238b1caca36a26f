"""LandscapeMonitor's bookkeeping under a real Trainer: exact labels when a fit stops mid-epoch,
the marker a training_step can test, the warning when it has side effects; the arguments every
monitor takes, as LightningCLI sees them."""

import inspect
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianMonitor, SharpnessMonitor, TrajectoryMonitor, is_measuring
from lightning_landscape.callbacks.base import LandscapeMonitor
from lightning_landscape.callbacks.schedule import describe

from ._helpers import Classifier, learnable_classes, make_trainer


def test_a_fit_stopped_mid_epoch_is_labelled_by_step_and_fraction(tmp_path):
    """5 batches an epoch, max_steps=7: the last measurement is 40 % into the second epoch."""
    hessian = HessianMonitor(every_n_epochs=1, trace=False)
    by_step = HessianMonitor(every_n_steps=3, trace=False, prefix="hessian_steps")
    trajectory = TrajectoryMonitor(every_n_epochs=1, num_points=2, grid_size=2, slices=False)
    t = make_trainer(
        tmp_path, [hessian, by_step, trajectory], max_epochs=3, max_steps=7, logger=False
    )
    t.fit(Classifier(), DataLoader(learnable_classes(), batch_size=8))
    assert [(h["epoch"], h["step"]) for h in hessian.history] == [(0, 0), (1, 5), (1.4, 7)]
    assert hessian.done == [0, 1, 2]  # the schedule's epochs: a resume does not repeat them
    assert [(h["epoch"], h["step"]) for h in by_step.history] == [(0, 0), (0.6, 3), (1.2, 6)]
    assert trajectory.snapshots.epochs == [0, 1, 1.4] and trajectory.snapshots.steps == [0, 5, 7]
    assert trajectory._label(2) == "epoch 1.40 (step 7)"
    assert trajectory.pictures[-1]["epoch"] == pytest.approx(1.4)


def test_a_monitor_reused_in_a_new_fit_starts_afresh(tmp_path):
    """A sweep that reuses its callbacks: the second fit (new model, new Trainer) measures every
    epoch again and its trajectory starts from the new model, as fresh monitors do; the noise
    monitor's running averages start afresh too."""
    import pytorch_lightning as pl

    from lightning_landscape import NoiseTemperatureMonitor

    def monitors():
        return [
            HessianMonitor(every_n_epochs=1, trace=False),
            TrajectoryMonitor(every_n_epochs=1, num_points=2, grid_size=2, slices=False),
            NoiseTemperatureMonitor(every_n_steps=1),
        ]

    def fit(callbacks, seed):
        pl.seed_everything(seed)
        make_trainer(
            tmp_path, callbacks, max_epochs=2, logger=False, accumulate_grad_batches=2
        ).fit(Classifier(), DataLoader(learnable_classes(), batch_size=8, shuffle=True))

    reused = monitors()
    fit(reused, 0)
    fit(reused, 1)
    fresh = monitors()
    fit(fresh, 1)

    def timeless(history):
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in history]

    for a, b in zip(reused[:2], fresh[:2], strict=True):
        assert a.done == b.done == [0, 1, 2] and timeless(a.history) == timeless(b.history)
    assert reused[1].snapshots.steps == fresh[1].snapshots.steps == [0, 3, 6]
    assert reused[2].ema.count == fresh[2].ema.count > 0  # accumulation: noise scales measured
    assert reused[2].ema.state_dict() == fresh[2].ema.state_dict()


def test_describe():
    assert describe(3.0, 15) == "epoch 3"
    assert describe(1.4, 7) == "epoch 1.40 (step 7)"
    assert describe(1.4, 7, by_step=True) == "step 7"


class Collecting(Classifier):
    """The Lightning-2 idiom: training_step keeps its outputs (guarded or not)."""

    def __init__(self, guard: bool):
        super().__init__()
        self.guard = guard
        self.training_step_outputs = []
        self._seen_marker = set()

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self._seen_marker.add(is_measuring(self))
        if not (self.guard and self.landscape_measuring):
            self.training_step_outputs.append(loss.detach())
        return loss


def test_training_step_marker_and_one_warning(tmp_path):
    def fit(guard):
        model = Collecting(guard)
        monitors = [SharpnessMonitor(every_n_epochs=1, kinds=["sam", "average"], average_samples=4)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path, monitors, max_epochs=2, logger=False).fit(
                model, DataLoader(learnable_classes(), batch_size=8)
            )
        texts = [str(w.message) for w in caught if "is_measuring" in str(w.message)]
        return model, texts

    model, texts = fit(guard=False)
    assert model._seen_marker == {True, False}
    assert len(texts) == 1 and "training_step_outputs (length 0 → length" in texts[0]
    assert "Put back what could be" in texts[0]
    # the 10 training steps' outputs only: the measurements' appends are cut back (before: > 10)
    assert len(model.training_step_outputs) == 10
    assert not hasattr(model, "landscape_measuring") or model.landscape_measuring is False

    model, texts = fit(guard=True)
    assert texts == [] and len(model.training_step_outputs) == 10
    assert not is_measuring(model)


@pytest.mark.parametrize("cls", [HessianMonitor, SharpnessMonitor, TrajectoryMonitor])
def test_lightning_cli_sees_every_base_argument(cls):
    """The monitors take the base arguments as ``**kwargs``: jsonargparse (LightningCLI's parser)
    follows ``super().__init__(**kwargs)`` and lists each, typed, with its default."""
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "monitor")
    defaults = vars(parser.get_defaults().monitor)
    base = list(inspect.signature(LandscapeMonitor.__init__).parameters.values())[1:]
    assert len(base) == 10
    for param in base:
        own = cls is TrajectoryMonitor and param.name == "num_batches"
        assert defaults[param.name] == (2 if own else param.default), param.name
    cfg = parser.parse_args(["--monitor.epochs=[0, 2]", "--monitor.mode=train", "--monitor.seed=3"])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # < 4.49
    monitor = instantiate(cfg).monitor
    assert type(monitor) is cls
    assert (monitor.schedule.epochs, monitor.mode, monitor.seed) == ((0, 2), "train", 3)
    with pytest.raises(jsonargparse.ArgumentError, match="mode"):
        parser.parse_args(["--monitor.mode=sideways"])  # the Literal type is seen too


class MetricModel(pl.LightningModule):
    """Logs a torchmetrics accuracy updated in training_step, as Lightning's docs do."""

    def __init__(self):
        super().__init__()
        import torchmetrics

        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        )
        self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.acc(out, y)
        self.log("train_acc", self.acc, on_step=False, on_epoch=True)
        return torch.nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_logged_torchmetrics_are_the_trainings_own(tmp_path):
    """Before: the epoch's logged accuracy counted the measurements' calls (0.3125 became 0.338
    with a HessianMonitor, 0.353 with a SharpnessMonitor), with no warning."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    logged = []
    for callbacks in ([], [HessianMonitor(trace=False)], [SharpnessMonitor(kinds=["sam"])]):
        pl.seed_everything(0)
        trainer = make_trainer(tmp_path, callbacks, max_epochs=2, logger=False)
        trainer.fit(MetricModel(), DataLoader(data, batch_size=8))
        logged.append(float(trainer.callback_metrics["train_acc"]))
    assert logged[1] == logged[0] and logged[2] == logged[0], logged
