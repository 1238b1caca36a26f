"""TrajectoryMonitor under real Trainers: logged tags and values, snapshots, resume, DDP,
bit-identity, errors."""

import math
import os
import re

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import TrajectoryMonitor
from lightning_landscape._core.random import derive_seed
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.landscape.directions import (
    filter_normalized_directions,
    normalization_parameters,
)
from lightning_landscape.landscape.trajectory import pca_plane

from ._helpers import Classifier, events, learnable_classes, make_trainer

SCALARS = {
    "trajectory/loss",
    "trajectory/accuracy",
    "trajectory/distance_from_init",
    "trajectory/step_distance",
    "trajectory/barrier",
    "trajectory/step_barrier",
    "trajectory/monotonic",
    "trajectory/num_snapshots",
    "trajectory/num_forward",
    "trajectory/seconds",
    "trajectory/pca_explained_variance",
    "trajectory/off_plane_distance",
}
IMAGES = {
    "trajectory/loss_init_to_current",
    "trajectory/loss_prev_to_current",
    "trajectory/pca_landscape",
    "trajectory/slice_1d",
    "trajectory/slice_2d",
}


def Net(bn: bool = False, dropout: float = 0.0):
    return Classifier(bn=bn, dropout=dropout, lr=0.3)


def accuracy(module, batch):
    x, y = batch
    return (module(x).argmax(-1) == y).double().mean()


def mean_loss(model, batches, fn=None):
    fn = fn or (lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with torch.no_grad():
        total = sum(len(b[1]) * float(fn(model, b)) for b in batches)
    return total / sum(len(b[1]) for b in batches)


def loss_at(model, theta, batches, fn=None):
    pv = ParamVector([p for p in model.parameters() if p.requires_grad])
    with pv.moved_to(theta):
        return mean_loss(model, batches, fn)


def test_logged_tags_and_values(tmp_path):
    pl.seed_everything(0)
    data = learnable_classes()
    fixed = [(data.tensors[0][:7], data.tensors[1][:7]), (data.tensors[0][7:20], data.tensors[1][7:20])]  # fmt: skip
    mon = TrajectoryMonitor(
        epochs=[0, 1, 3],
        num_points=6,
        alpha_margin=0.2,
        metric_fn=accuracy,
        metric_name="accuracy",
        grid_size=4,
        dataloader=fixed,
        snapshot_dtype="float64",
    )
    model = Net(bn=True, dropout=0.3)
    init = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    t = make_trainer(tmp_path, [mon], max_epochs=3)
    t.fit(model, DataLoader(data, batch_size=8, shuffle=True))

    ea = events(t.logger.log_dir)
    assert SCALARS <= set(ea.Tags()["scalars"])
    assert IMAGES <= set(ea.Tags()["images"])
    assert [e.step for e in ea.Scalars("trajectory/loss")] == [0, 5, t.global_step]
    assert [e.step for e in ea.Scalars("trajectory/pca_explained_variance")] == [t.global_step]
    figures = os.listdir(os.path.join(t.logger.log_dir, "figures"))
    assert {f.rsplit("_step", 1)[0] for f in figures} == {i.replace("/", "_") for i in IMAGES}

    # snapshots: fit start (exact), epoch 1, epoch 3
    assert mon.snapshots.epochs == [0, 1, 3] and mon.snapshots.steps == [0, 5, 15]
    assert torch.equal(mon.snapshots.tensors[0], init)
    model.eval()
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(mon.snapshots.tensors[-1], final)

    # the curves' endpoints are the losses (and accuracies) at the snapshots
    curve = mon.last_curves["init_to_current"]
    at0, at1 = curve.values[curve.alphas == 0][0], curve.values[curve.alphas == 1][0]
    assert float(at0[0]) == pytest.approx(loss_at(model, init, fixed), rel=1e-12)
    assert float(at1[0]) == pytest.approx(mean_loss(model, fixed), rel=1e-12)
    assert float(at0[1]) == pytest.approx(loss_at(model, init, fixed, accuracy), rel=1e-12)
    prev = mon.last_curves["prev_to_current"]
    start = prev.values[prev.alphas == 0][0, 0]
    assert float(start) == pytest.approx(loss_at(model, mon.snapshots.tensors[1], fixed), rel=1e-12)
    # a point inside: θ(α) = (1 − α) θ_0 + α θ_3
    a = float(curve.alphas[3])
    inner = loss_at(model, torch.lerp(init, final, a), fixed)
    assert float(curve.losses[3]) == pytest.approx(inner, rel=1e-12)

    logged = {k: ea.Scalars(k)[-1].value for k in SCALARS}
    assert logged["trajectory/loss"] == pytest.approx(mean_loss(model, fixed), rel=1e-6)
    assert logged["trajectory/distance_from_init"] == pytest.approx(float((final - init).norm()), rel=1e-6)  # fmt: skip
    step = float((final - mon.snapshots.tensors[1]).norm())
    assert logged["trajectory/step_distance"] == pytest.approx(step, rel=1e-6)
    assert logged["trajectory/barrier"] == pytest.approx(curve.barrier, rel=1e-6, abs=1e-7)
    assert logged["trajectory/monotonic"] == float(curve.monotonic)
    # 2 curves × 8 α × 2 batches × (loss + accuracy); the picture: (4 × 4 + 7 + 4 × 4) × 2
    assert mon.history[-1]["trajectory/num_forward"] == 2 * len(curve.alphas) * 2 * 2
    assert logged["trajectory/num_forward"] == mon.history[-1]["trajectory/num_forward"]
    picture = ea.Scalars("trajectory/picture_num_forward")
    assert [p.value for p in picture] == [(4 * 4 + 7 + 4 * 4) * 2]
    assert [p.step for p in picture] == [ea.Scalars("trajectory/num_forward")[-1].step]
    assert len(ea.Scalars("trajectory/picture_seconds")) == 1
    assert t.callback_metrics["trajectory/barrier"].item() == pytest.approx(curve.barrier, abs=1e-7)

    # the picture: PCA of the earlier snapshots around the final weights, loss on its plane
    pic = mon.last_picture
    ref = pca_plane(mon.snapshots.tensors[:-1], final)
    assert logged["trajectory/pca_explained_variance"] == pytest.approx(ref.explained_variance, rel=1e-6)  # fmt: skip
    assert logged["trajectory/off_plane_distance"] == pytest.approx(float(ref.off_plane.max()), rel=1e-6, abs=1e-9)  # fmt: skip
    assert ref.explained_variance == pytest.approx(1.0)  # two snapshots span the plane exactly
    d = pic["pca"].directions
    x, y = float(pic["xs"][1]), float(pic["ys"][2])
    assert float(pic["loss"][2, 1]) == pytest.approx(loss_at(model, final + x * d[0] + y * d[1], fixed), rel=1e-12)  # fmt: skip
    # the random slices: filter-normalized directions from the seed, zero on BatchNorm and biases
    params = list(model.parameters())
    norm = normalization_parameters(model)
    seed = derive_seed(0, t.global_step, "slices")  # the monitor's stream: (seed, step, purpose)
    rand = filter_normalized_directions(params, seed=seed, zero=[id(p) in norm for p in params])
    g = pic["slice_grid"]
    want = loss_at(model, final + float(g[0]) * rand[0] + float(g[3]) * rand[1], fixed)
    assert float(pic["slice_2d"][3, 0]) == pytest.approx(want, rel=1e-12)
    assert model.training is False  # the fit left it in eval (we set it); params untouched:
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), final)


def test_fit_start_snapshot_is_taken_even_if_epoch_0_is_not_measured(tmp_path):
    mon = TrajectoryMonitor(epochs=[2], num_points=3, picture_at_end=False)
    t = make_trainer(tmp_path, [mon], max_epochs=2, logger=False)
    t.fit(Net(), DataLoader(learnable_classes(), batch_size=8))
    assert mon.snapshots.epochs == [0, 2]
    assert [int(h["epoch"]) for h in mon.history] == [2]
    h = mon.history[0]
    assert h["trajectory/step_distance"] == h["trajectory/distance_from_init"] > 0
    assert h["trajectory/num_forward"] == 3 * 2  # init and prev: the same segment; 2 batches


def test_half_precision_parameters(tmp_path):
    mon = TrajectoryMonitor(epochs=[0, 1], num_points=3, grid_size=2, snapshot_dtype=torch.float32)
    model = Net().float()
    data = TensorDataset(
        *(t.float() if t.is_floating_point() else t for t in learnable_classes().tensors)
    )
    t = make_trainer(tmp_path, [mon], max_epochs=1, precision="bf16-true", logger=False)
    t.fit(model, DataLoader(data, batch_size=8))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert [s.dtype for s in mon.snapshots.tensors] == [torch.float32] * 2
    final = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    assert torch.equal(mon.snapshots.tensors[-1], final)
    assert all(math.isfinite(v) for v in mon.history[-1].values())


def test_max_snapshots_thins_older_ones_with_one_warning(tmp_path):
    mon = TrajectoryMonitor(every_n_steps=1, num_points=2, max_snapshots=3, picture_at_end=False)
    t = make_trainer(tmp_path, [mon], max_epochs=1, logger=False)
    with pytest.warns(UserWarning, match="max_snapshots=3") as caught:
        t.fit(Net(), DataLoader(learnable_classes(), batch_size=8))  # 5 steps: 6 snapshots
    assert sum("max_snapshots" in str(w.message) for w in caught) == 1
    assert len(mon.snapshots) == 3
    assert mon.snapshots.steps[0] == 0 and mon.snapshots.steps[-1] == 5
    assert mon.done == [0, 1, 2, 3, 4, 5]


def test_resume_keeps_the_snapshots(tmp_path):
    data = learnable_classes()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True, every_n_epochs=1)
    pl.seed_everything(3)
    kw = {"every_n_epochs": 1, "num_points": 3, "picture_at_end": False}
    mon = TrajectoryMonitor(**kw)
    t = make_trainer(tmp_path, [mon, ckpt], max_epochs=2, enable_checkpointing=True, logger=False)
    t.fit(Net(), DataLoader(data, batch_size=8))
    assert mon.snapshots.epochs == [0, 1, 2]
    saved = torch.load(str(tmp_path / "ck" / "last.ckpt"), weights_only=True)
    (state,) = [v for k, v in saved["callbacks"].items() if "TrajectoryMonitor" in k]
    assert state["snapshot_epochs"] == [0, 1, 2] and len(state["snapshots"]) == 3

    mon2 = TrajectoryMonitor(**kw, grid_size=3)
    mon2.picture_at_end = True
    t2 = make_trainer(tmp_path, [mon2], max_epochs=4, enable_checkpointing=True, logger=False)
    model = Net()
    t2.fit(model, DataLoader(data, batch_size=8), ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert mon2.snapshots.epochs == [0, 1, 2, 3, 4]
    for a, b in zip(mon.snapshots.tensors, mon2.snapshots.tensors, strict=False):
        assert torch.equal(a, b)
    assert [int(h["epoch"]) for h in mon2.history] == [0, 1, 2, 3, 4]
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    far = mon2.history[-1]["trajectory/distance_from_init"]
    assert far == pytest.approx(float((final - mon.snapshots.tensors[0].double()).norm()), rel=1e-6)
    assert mon2.last_picture["pca"].coords.shape == (4, 2)  # the picture uses the old snapshots


def fit_params(tmp_path, callbacks, epochs=3, logger=False):
    pl.seed_everything(7)
    model = Net(bn=True, dropout=0.5)
    t = make_trainer(tmp_path, callbacks, max_epochs=epochs, logger=logger)
    t.fit(model, DataLoader(learnable_classes(), batch_size=8, shuffle=True))
    return model.state_dict()


def test_training_is_bit_identical_with_the_monitor(tmp_path):
    plain = fit_params(tmp_path / "a", [])
    kw = {"num_points": 4, "grid_size": 3, "metric_fn": accuracy, "alpha_margin": 0.5}
    watched = fit_params(
        tmp_path / "b",
        [TrajectoryMonitor(every_n_epochs=1, pictures_every_measurement=True, **kw)],
        logger=True,  # figures drawn and written too
    )
    train_mode = TrajectoryMonitor(every_n_steps=4, mode="train", **kw)
    watched_train = fit_params(tmp_path / "c", [train_mode])
    for k in plain:
        assert torch.equal(plain[k], watched[k]), k
        assert torch.equal(plain[k], watched_train[k]), k
    # mode="train" with dropout: one fixed function a measurement, so both curves end alike
    init, prev = (train_mode.last_curves[k] for k in ("init_to_current", "prev_to_current"))
    at_one = init.alphas == 1  # the same α grid on both curves
    assert prev is not init and torch.equal(init.values[at_one], prev.values[at_one])


SNAPSHOT_DTYPE = re.escape(
    "`snapshot_dtype` must be torch.float32 or torch.float64, or one of ['float32', 'float64'], "
)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_points": 1}, ValueError, "`num_points` must be at least 2"),
        ({"num_points": 2.0}, TypeError, "`num_points` must be a positive int"),
        ({"alpha_margin": -0.5}, ValueError, "^`alpha_margin` must be a non-negative finite"),
        ({"alpha_margin": math.inf}, ValueError, "^`alpha_margin` must be a non-negative finite"),
        ({"alpha_margin": "x"}, TypeError, "^`alpha_margin` must be a non-negative finite"),
        ({"alpha_margin": True}, TypeError, "^`alpha_margin` must be a non-negative finite"),
        ({"grid_size": 1}, ValueError, "`grid_size` must be at least 2"),
        ({"max_snapshots": 1}, ValueError, "`max_snapshots` must be at least 2"),
        ({"max_snapshots": 0}, ValueError, "`max_snapshots` must be a positive int"),
        ({"slices": 1}, TypeError, "`slices` must be a bool"),
        ({"pictures_every_measurement": None}, TypeError, "`pictures_every_measurement`"),
        ({"metric_fn": "acc"}, TypeError, "`metric_fn` must be callable"),
        ({"metric_name": "a/b"}, ValueError, "`metric_name` must be a non-empty str"),
        ({"snapshot_dtype": "float8"}, ValueError, SNAPSHOT_DTYPE),
        ({"snapshot_dtype": torch.int32}, ValueError, SNAPSHOT_DTYPE),
        ({"snapshot_dtype": "float16"}, ValueError, SNAPSHOT_DTYPE),
        ({"snapshot_dtype": torch.bfloat16}, ValueError, SNAPSHOT_DTYPE),
        ({"mode": "test"}, ValueError, "`mode` must be 'eval' or 'train'"),
        ({"epochs": [1], "every_n_steps": 3}, ValueError, "exactly one"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrajectoryMonitor(**kwargs)


def test_snapshot_dtype_is_float32_or_float64_given_as_dtype_or_name():
    """Half precisions are refused: their rounding swamps the distance between snapshots."""
    for given, dtype in [("float32", torch.float32), (torch.float64, torch.float64)]:
        mon = TrajectoryMonitor(snapshot_dtype=given)
        assert mon.snapshot_dtype == mon.snapshots.dtype == dtype


def test_restored_snapshots_of_another_model_are_refused(tmp_path):
    """Restored after setup, as Lightning restores a checkpoint's callback states."""
    mon = TrajectoryMonitor(epochs=[0])

    class Restore(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            mon.load_state_dict({"done": [], "history": [], "snapshots": [torch.zeros(5)]})

    with pytest.raises(ValueError, match="restored snapshots have 5 entries"):
        make_trainer(tmp_path, [mon, Restore()], logger=False).fit(
            Net(), DataLoader(learnable_classes(), batch_size=8)
        )


# ----------------------------------------------------------------------------- DDP
class RecordingTrajectoryMonitor(TrajectoryMonitor):
    """Each rank writes what it measured (ddp_spawn children do not send attributes back)."""

    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out = out

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)  # in each spawned rank
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        torch.save(
            {
                "history": self.history,
                "snapshots": self.snapshots.tensors,
                "curve": self.last_curves["init_to_current"].values,
                "alphas": self.last_curves["init_to_current"].alphas,
                "picture": {k: v for k, v in self.last_picture.items() if k != "pca"},
                "directions": self.last_picture["pca"].directions,
                "sizes": [len(b[1]) for b in self._batches],
                "batches": self._batches,
            },
            f"{self.out}.{trainer.global_rank}",
        )


@pytest.mark.distributed
def test_two_ranks_equal_one_process_on_the_union(tmp_path):
    out = str(tmp_path / "rank")
    data = learnable_classes(n=42)
    kw = {"epochs": [1], "num_points": 4, "grid_size": 3, "num_batches": 2, "snapshot_dtype": "float64"}  # fmt: skip
    t = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        callbacks=[RecordingTrajectoryMonitor(out, **kw)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    pl.seed_everything(5)
    t.fit(Net(), DataLoader(data, batch_size=8, shuffle=False))
    got, other = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert got["sizes"] == [8, 8] and other["sizes"] == [8, 8]
    # every rank has the same snapshots, plane, directions and reduced values
    for key in ("snapshots", "curve", "directions"):
        for a, b in zip(got[key], other[key], strict=True) if key == "snapshots" else [(got[key], other[key])]:  # fmt: skip
            assert torch.equal(a, b), key
    for key, value in got["picture"].items():
        assert torch.equal(value, other["picture"][key]), key

    # one process on the union of the two ranks' batches (Lightning's shuffled
    # DistributedSampler shards: disjoint), at the same weights
    union = got["batches"] + other["batches"]
    seen = torch.cat([b[0] for b in union])
    assert len(torch.unique(seen, dim=0)) == 32
    model = Net().eval()
    init, final = got["snapshots"][0], got["snapshots"][-1]
    for a, v in zip(got["alphas"].tolist(), got["curve"][:, 0].tolist(), strict=True):
        assert v == pytest.approx(loss_at(model, torch.lerp(init, final, a), union), rel=1e-10)
    pic, d = got["picture"], got["directions"]
    for i, y in enumerate(pic["ys"].tolist()):
        for j, x in enumerate(pic["xs"].tolist()):
            want = loss_at(model, final + x * d[0] + y * d[1], union)
            assert float(pic["loss"][i, j]) == pytest.approx(want, rel=1e-10)
    assert got["history"][-1]["trajectory/loss"] == pytest.approx(loss_at(model, final, union), rel=1e-10)  # fmt: skip


class NaNAfterFirstStep(Classifier):
    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == 1:  # a NaN in training: every weight after it is NaN
            with torch.no_grad():
                self.net[0].weight.fill_(math.nan)


def test_non_finite_weights_give_no_picture_and_no_failure(tmp_path):
    """The picture's eigendecomposition raised on NaN snapshots: under DDP, where every
    failure ends the run, the fit died at its end. Now the picture's values are NaN with one
    warning naming the cause, on every rank alike."""
    mon = TrajectoryMonitor(num_batches=1, every_n_steps=2, slices=True)
    with pytest.warns(UserWarning, match="not finite .* no landscape picture"):
        make_trainer(tmp_path, [mon], max_epochs=1, logger=False).fit(
            NaNAfterFirstStep(), DataLoader(learnable_classes(), batch_size=8)
        )
    (picture,) = mon.pictures
    assert math.isnan(picture["trajectory/pca_explained_variance"])
    assert math.isnan(picture["trajectory/off_plane_distance"])


class BrokenPicture(TrajectoryMonitor):
    def _picture(self, ctx, pv, theta):
        raise RuntimeError("picture broke")


def test_a_failed_fit_end_picture_logs_nan_for_its_own_keys_only(tmp_path):
    """Its NaN row took every key an earlier measurement had logged: `trajectory/loss` got a NaN
    at the last step after its value there."""
    mon = BrokenPicture(num_batches=1, every_n_epochs=1)
    with pytest.warns(UserWarning, match="picture broke"):
        make_trainer(tmp_path, [mon], max_epochs=2).fit(
            Classifier(), DataLoader(learnable_classes(), batch_size=8)
        )
    (run,) = (tmp_path / "tb").glob("*")
    acc = events(run)
    loss = [(e.step, e.value) for e in acc.Scalars("trajectory/loss")]
    assert [s for s, _ in loss] == [0, 5, 10] and all(math.isfinite(v) for _, v in loss)
    (picture,) = mon.pictures
    assert math.isnan(picture["trajectory/pca_explained_variance"])
    assert "trajectory/loss" not in picture
