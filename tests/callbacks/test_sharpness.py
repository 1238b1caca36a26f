"""SharpnessMonitor in real Trainers (and both monitors together: training is unchanged)."""

import math
import types
import warnings

import pytest
import pytorch_lightning as pl
import torch
from curvature._problems import MeanOfLosses, OnceDifferentiableTanh
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import NoiseTemperatureMonitor, SharpnessMonitor
from lightning_landscape._core.random import make_generator
from lightning_landscape.landscape.local_entropy import local_entropy
from lightning_landscape.landscape.sharpness import (
    FunctionObjective,
    adaptive_sharpness,
    keskar_sharpness,
    sam_sharpness,
)

from ._helpers import Classifier, make_trainer, random_classes, scalars

D = torch.float64


class Net(pl.LightningModule):
    """A tiny float64 MLP, with BatchNorm and Dropout when ``bn``."""

    def __init__(self, bn=False, lr=0.1):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(3, 6)]
        layers += [nn.BatchNorm1d(6), nn.Dropout(0.3)] if bn else []
        layers += [nn.Tanh(), nn.Linear(6, 1)]
        self.net = nn.Sequential(*layers).double()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x).squeeze(-1), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Manual(Net):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def _data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D)
    return x, torch.sin(x.sum(1)) + 0.1 * torch.randn(n, generator=g, dtype=D)


def test_logged_tags_and_values_match_the_pure_measures(tmp_path, flat_loss):
    x, y = _data()
    fixed = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    monitor = SharpnessMonitor(
        epochs=[0, 1],
        rho=[0.01, 0.05],
        sigma=0.02,
        ascent="gradient",
        ascent_steps=4,
        average_samples=50,
        num_batches=2,
        dataloader=fixed,
    )
    trainer = make_trainer(tmp_path, [monitor], max_epochs=1)
    model = Net()
    # the initial weights
    f, w0 = flat_loss(Net().net, x[:16], lambda out: F.mse_loss(out.squeeze(-1), y[:16]))
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    logged = scalars(tmp_path)
    keys = {
        "sharpness/sam_rho0.01",
        "sharpness/sam_rho0.05",
        "sharpness/adaptive",
        "sharpness/average",
        "sharpness/average_stderr",
        "sharpness/keskar",
        "sharpness/num_forward",
        "sharpness/num_backward",
        "sharpness/seconds",
        "sharpness/sam_curvature_rho0.01",
        "sharpness/sam_curvature_rho0.05",
        "sharpness/adaptive_curvature",
        "sharpness/keskar_curvature",
        "sharpness/grad_norm",
        "sharpness/num_hvp",
    }
    assert keys <= set(logged)
    assert not any(k.startswith("sharpness/sam") and k not in keys for k in logged)
    assert all(sorted(logged[k]) == [0, 4] for k in keys)  # epoch 0 (step 0), epoch 1 (step 4)
    for rho in (0.01, 0.05):
        ref = sam_sharpness(FunctionObjective(f), w0, rho, steps=4, method="gradient")
        assert logged[f"sharpness/sam_rho{rho}"][0] == pytest.approx(ref.sharpness, rel=1e-5)
    ref = adaptive_sharpness(FunctionObjective(f), w0, 0.5, eta=0.01, steps=4, method="gradient")
    assert logged["sharpness/adaptive"][0] == pytest.approx(ref.sharpness, rel=1e-5)
    ref = keskar_sharpness(FunctionObjective(f), w0, 1e-3, steps=4, method="gradient")
    assert logged["sharpness/keskar"][0] == pytest.approx(ref.sharpness, rel=1e-5)
    # average case: σ² tr(H) / 2 to second order (the third-order term cancels by antithesis)
    h = torch.autograd.functional.hessian(f, w0)
    truth = 0.02**2 * float(torch.trace(h)) / 2
    avg, stderr = logged["sharpness/average"][0], logged["sharpness/average_stderr"][0]
    assert abs(avg - truth) < 3 * stderr + 0.05 * abs(truth)
    # cost on 2 batches: one base gradient, 3 ascent gradients and 1 loss for each of the two
    # sam radii and adaptive, at most that for keskar, 2 · 50 losses for average
    assert logged["sharpness/num_backward"][0] <= 2 * (1 + 4 * 3)
    assert logged["sharpness/num_forward"][0] >= 2 * (1 + 3 * 4 + 100)
    assert "sharpness/sam_rho0.05" in trainer.callback_metrics
    assert monitor.done == [0, 1]


def test_krylov_default_curvature_parts_grad_norm_and_local_entropy(tmp_path, flat_loss):
    x, y = _data()
    fixed = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    monitor = SharpnessMonitor(
        epochs=[0],
        rho=[0.01, 0.05],
        sigma=0.02,
        ascent_steps=8,
        polish_steps=3,
        local_entropy_gamma=[1e3, 1e4],
        local_entropy_samples=64,
        num_batches=2,
        dataloader=fixed,
    )
    trainer = make_trainer(tmp_path, [monitor], max_epochs=1)
    f, w0 = flat_loss(Net().net, x[:16], lambda out: F.mse_loss(out.squeeze(-1), y[:16]))
    trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))
    logged = {k: v[0] for k, v in scalars(tmp_path).items() if k.startswith("sharpness/")}
    suffixed = [f"sam{c}_rho{r}" for c in ("", "_curvature") for r in (0.01, 0.05)]
    suffixed += [f"local_entropy{e}_gamma{g}" for e in ("", "_stderr") for g in (1000, 10000)]
    plain = ["adaptive", "adaptive_curvature", "keskar", "keskar_curvature", "average"]
    plain += ["average_stderr", "grad_norm", "num_forward", "num_backward", "num_hvp", "seconds"]
    assert set(logged) == {f"sharpness/{k}" for k in suffixed + plain}
    obj = FunctionObjective(f)
    loss0, g = obj.value_and_grad(w0)
    assert logged["sharpness/grad_norm"] == pytest.approx(float(g.norm()), rel=1e-5)
    for rho in (0.01, 0.05):
        ref = sam_sharpness(FunctionObjective(f), w0, rho, steps=8, polish=3)
        assert logged[f"sharpness/sam_rho{rho}"] == pytest.approx(ref.sharpness, rel=1e-5)
        curvature = logged[f"sharpness/sam_curvature_rho{rho}"]
        assert curvature == pytest.approx(ref.sharpness - rho * float(g.norm()), rel=1e-4)
    ref = adaptive_sharpness(FunctionObjective(f), w0, 0.5, steps=8, polish=3)
    assert logged["sharpness/adaptive_curvature"] == pytest.approx(ref.curvature, rel=1e-4)
    ref = keskar_sharpness(FunctionObjective(f), w0, 1e-3, steps=8, polish=3)
    assert logged["sharpness/keskar"] == pytest.approx(ref.sharpness, rel=1e-5)
    assert logged["sharpness/keskar_curvature"] == pytest.approx(ref.curvature, rel=1e-4)
    # local entropy: the package's seed rule, and the Gaussian integral of the quadratic model
    h = torch.autograd.functional.hessian(f, w0)
    lam = torch.linalg.eigvalsh(h)
    for index, gamma in ((5, 1e3), (6, 1e4)):
        gen = make_generator(0, 0, "local_entropy", index)
        ref = local_entropy(obj, w0, gamma, samples=64, generator=gen)
        value = logged[f"sharpness/local_entropy_gamma{gamma:g}"]
        stderr = logged[f"sharpness/local_entropy_stderr_gamma{gamma:g}"]
        assert value == pytest.approx(ref.estimate, rel=1e-5, abs=1e-9)
        assert stderr == pytest.approx(ref.stderr, rel=1e-4)
        eye = torch.eye(len(w0), dtype=D)
        closed = -0.5 * torch.log1p(lam / gamma).sum() + 0.5 * g @ torch.linalg.solve(
            gamma * eye + h, g
        )
        assert abs(value - float(closed)) < 3 * stderr + 0.05 * abs(float(closed))
    # one Lanczos run of 8 products per worst-case kind, on 2 batches
    assert logged["sharpness/num_hvp"] == 3 * 8 * 2


def test_bit_identical_training_with_both_monitors(tmp_path):
    x, y = _data(40)

    def run(callbacks, folder):
        pl.seed_everything(0)
        model = Net(bn=True)
        trainer = make_trainer(folder, callbacks, max_epochs=3, accumulate_grad_batches=2)
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
        return model

    plain = run([], tmp_path / "plain")
    monitors = [
        NoiseTemperatureMonitor(),
        SharpnessMonitor(
            every_n_epochs=1,
            num_batches=2,
            ascent_steps=2,
            average_samples=2,
            local_entropy_gamma=100.0,
            local_entropy_samples=2,
        ),
        SharpnessMonitor(every_n_epochs=1, num_batches=2, mode="train", seed=1, kinds=["sam"]),
    ]
    watched = run(monitors, tmp_path / "watched")
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    logged = scalars(tmp_path / "watched")
    assert sorted(logged["sharpness/keskar"]) == [0, 3, 6, 9]
    assert sorted(logged["sharpness/local_entropy"]) == [0, 3, 6, 9]
    assert len(logged["noise/temperature"]) == 9
    # 5 batches an epoch, accumulate 2: the epoch's last step has one backward pass on one
    # device, hence no second batch size, and logs the temperature only
    assert sorted(logged["noise/gradient_noise_scale"]) == [0, 1, 3, 4, 6, 7]


def test_resume_continues_the_schedule(tmp_path):
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    first = SharpnessMonitor(every_n_epochs=1, kinds=["sam"], ascent_steps=2, num_batches=1)
    trainer = make_trainer(tmp_path / "a", [first], max_epochs=2)
    trainer.fit(Net(), loader)
    ckpt = str(tmp_path / "a.ckpt")
    trainer.save_checkpoint(ckpt)
    second = SharpnessMonitor(every_n_epochs=1, kinds=["sam"], ascent_steps=2, num_batches=1)
    trainer = make_trainer(tmp_path / "b", [second], max_epochs=4)
    trainer.fit(Net(), loader, ckpt_path=ckpt)
    assert first.done == [0, 1, 2]
    assert second.done == [0, 1, 2, 3, 4]
    assert sorted(scalars(tmp_path / "b")["sharpness/sam"]) == [12, 16]  # epochs 3, 4 only


def test_nan_loss_logs_nan_and_warns(tmp_path):
    x, y = _data(16)

    def nan_loss(module, batch):
        return module.training_step(batch, 0) * math.nan

    monitor = SharpnessMonitor(epochs=[0], loss_fn=nan_loss, kinds=["sam", "average"])
    trainer = make_trainer(tmp_path, [monitor], max_epochs=1)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=8))
    assert math.isnan(monitor.history[0]["sharpness/sam"])
    assert math.isnan(monitor.history[0]["sharpness/average"])


class OnceNet(Net):
    """Net with its tanh as a custom autograd.Function whose backward is
    ``@once_differentiable`` (a fused kernel's): no exact Hessian-vector product works."""

    def training_step(self, batch, batch_idx):
        first, _, last = self.net
        x, y = batch
        return F.mse_loss(last(OnceDifferentiableTanh.apply(first(x))).squeeze(-1), y)


def test_no_double_backward_takes_finite_differences_and_keeps_every_measure(tmp_path):
    """Without a double backward the whole measurement was NaN (the Krylov models' products
    raised), the forward-only measures included: now the products fall back to finite
    differences with one warning, once per fit, and every value equals the differentiable
    twin's (whose kind "auto" decides, and says, once)."""
    x, y = _data()
    fixed = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    rows = {}
    for model in (OnceNet(), Net()):
        monitor = SharpnessMonitor(epochs=[0, 1], num_batches=2, dataloader=fixed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path, [monitor], max_epochs=1, logger=False).fit(
                model, DataLoader(TensorDataset(x, y), batch_size=8)
            )
        said = [str(w.message) for w in caught if "SharpnessMonitor" in str(w.message)]
        rows[type(model).__name__] = monitor.history, monitor.hvp_choice, said
    (once, choice, said), (twin, exact, quiet) = rows["OnceNet"], rows["Net"]
    assert choice == "finite_difference" and exact in ("cached", "double_backward")
    assert len(said) == 1 and "once_differentiable" in said[0] and "lower bounds" in said[0]
    assert quiet == []
    assert len(once) == len(twin) == 2
    for mine, theirs in zip(once, twin, strict=True):
        for key in ("sam", "adaptive", "keskar", "sam_curvature", "average", "grad_norm"):
            value = mine[f"sharpness/{key}"]
            assert math.isfinite(value)
            assert value == pytest.approx(theirs[f"sharpness/{key}"], rel=1e-6, abs=1e-12), key


class MeanNet(Net):
    """Net with a custom reduction at the end of its loss (linear; its backward hands back a
    gradient without a graph, like a kernel outside autograd)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return MeanOfLosses.apply(F.mse_loss(self.net(x).squeeze(-1), y, reduction="none"))


def test_a_linear_custom_reduction_keeps_exact_products_in_every_measurement(tmp_path):
    """Its exact products, compared once with finite differences by "auto", stay exact in the
    later measurements (the Function trusted for the fit): every value equals the plain
    twin's, without a warning."""
    x, y = _data()
    fixed = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8)
    rows = {}
    for model in (MeanNet(), Net()):
        monitor = SharpnessMonitor(epochs=[0, 1, 2], num_batches=2, dataloader=fixed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path, [monitor], max_epochs=2, logger=False).fit(
                model, DataLoader(TensorDataset(x, y), batch_size=8)
            )
        assert not [w for w in caught if "SharpnessMonitor" in str(w.message)]
        assert monitor.hvp_choice in ("cached", "double_backward")
        rows[type(model).__name__] = monitor.history
    assert len(rows["MeanNet"]) == len(rows["Net"]) == 3
    for mine, theirs in zip(rows["MeanNet"], rows["Net"], strict=True):
        for key in ("sam", "adaptive", "keskar", "sam_curvature", "average", "grad_norm"):
            value = mine[f"sharpness/{key}"]
            assert math.isfinite(value)
            assert value == pytest.approx(theirs[f"sharpness/{key}"], rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": [0.05, 0.05]}, r"`rho` must hold distinct values, got 0.05 and 0.05 \(both"),
        ({"rho": [0.05, 0.05000001]}, r"`rho` .* 0.05 and 0.05000001 \(both logged as '0.05'\)"),
        ({"adaptive_rho": [1, 0.5, 1.0]}, r"`adaptive_rho` .* 1.0 and 1.0 \(both logged as '1'\)"),
        ({"sigma": (0.01, 0.0100000001)}, "`sigma` must hold distinct values"),
        ({"epsilon": [1e-3, 2e-3, 0.001]}, "`epsilon` must hold distinct values"),
        ({"local_entropy_gamma": [100, 100.00001]}, "`local_entropy_gamma` must hold distinct"),
        ({"kinds": ("sam", "sam")}, r"`kinds` must hold distinct values, got 'sam' and 'sam'"),
    ],
)  # fmt: skip
def test_values_that_would_log_under_one_key_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessMonitor(**kwargs)


def test_nearby_values_written_apart_keep_their_keys():
    monitor = SharpnessMonitor(kinds=["sam"], rho=[0.05, 0.050001])  # 6 significant digits
    keys = monitor.metric_keys()
    assert "sharpness/sam_rho0.05" in keys and "sharpness/sam_rho0.050001" in keys
    assert len(keys) == len(set(keys))


def test_errors():
    with pytest.raises(TypeError, match="`kinds` must be a list"):
        SharpnessMonitor(kinds="sam")
    with pytest.raises(ValueError, match="`kinds` must be a non-empty subset"):
        SharpnessMonitor(kinds=["sam", "hessian"])
    with pytest.raises(ValueError, match="`kinds` must be a non-empty subset"):
        SharpnessMonitor(kinds=[])
    with pytest.raises(ValueError, match="`rho` must hold positive numbers"):
        SharpnessMonitor(rho=[0.05, 0.0])
    with pytest.raises(ValueError, match="`rho` is empty"):
        SharpnessMonitor(rho=[])
    with pytest.raises(TypeError, match="`adaptive_rho` must be a positive number"):
        SharpnessMonitor(adaptive_rho="0.5")
    with pytest.raises(ValueError, match="`sigma` must hold positive numbers"):
        SharpnessMonitor(sigma=-1.0)
    with pytest.raises(ValueError, match="`epsilon` must hold positive numbers"):
        SharpnessMonitor(epsilon=math.inf)
    with pytest.raises(ValueError, match="`ascent_steps` must be a positive int"):
        SharpnessMonitor(ascent_steps=0)
    with pytest.raises(ValueError, match="`ascent` must be one of"):
        SharpnessMonitor(ascent="lanczos")
    with pytest.raises(ValueError, match="`hvp` must be one of"):
        SharpnessMonitor(hvp="func")  # no module behind the objective's flat weights
    with pytest.raises(ValueError, match="`polish_steps` must be an int >= 0"):
        SharpnessMonitor(polish_steps=-1)
    with pytest.raises(ValueError, match="`local_entropy_gamma` must hold positive numbers"):
        SharpnessMonitor(local_entropy_gamma=[1.0, 0.0])
    with pytest.raises(ValueError, match="`local_entropy_beta` must be a positive number"):
        SharpnessMonitor(local_entropy_gamma=1.0, local_entropy_beta=0.0)
    with pytest.raises(ValueError, match="`local_entropy_samples` must be an int >= 2"):
        SharpnessMonitor(local_entropy_samples=1)
    with pytest.raises(ValueError, match="`average_samples` must be >= 2"):
        SharpnessMonitor(average_samples=1)
    with pytest.raises(ValueError, match="`eta` must be a non-negative number"):
        SharpnessMonitor(eta=-0.01)
    with pytest.raises(TypeError, match="`eta` must be a non-negative number"):
        SharpnessMonitor(eta=None)
    with pytest.raises(ValueError, match="`mode` must be 'eval' or 'train'"):
        SharpnessMonitor(mode="test")
    with pytest.raises(ValueError, match="give exactly one of"):
        SharpnessMonitor(every_n_epochs=1, every_n_steps=10)

    class DeepSpeedStrategy:
        pass

    fake = types.SimpleNamespace(strategy=DeepSpeedStrategy())
    with pytest.raises(ValueError, match="does not support the DeepSpeedStrategy strategy"):
        SharpnessMonitor().setup(fake, Net(), "fit")
    fake = types.SimpleNamespace(strategy=object())
    with pytest.raises(ValueError, match="manual optimization"):
        SharpnessMonitor().setup(fake, Manual(), "fit")


def test_train_mode_with_dropout_measures_one_fixed_function(tmp_path):
    """Dropout 0.3 in train mode: the masks are the same at every weight point of a measurement,
    so the worst case is never negative and a small ball gives ρ‖g‖ (fresh masks per evaluation
    gave noise of the size of the measure, negative values included)."""
    rhos = [1e-4, 0.05]
    monitor = SharpnessMonitor(kinds=["sam"], rho=rhos, mode="train", num_batches=2, seed=3)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], max_epochs=4, logger=False)
    trainer.fit(Classifier(dropout=0.3), DataLoader(random_classes(), batch_size=8))
    assert len(monitor.history) == 5
    for row in monitor.history:
        small, large = (row[f"sharpness/sam_rho{r:g}"] for r in rhos)
        assert 0 <= small <= large
        assert small == pytest.approx(rhos[0] * row["sharpness/grad_norm"], rel=1e-2)


def test_bit_identical_training_with_dropout_and_every_kind_in_train_mode(tmp_path):
    def run(callbacks, folder):
        pl.seed_everything(0)
        model = Classifier(dropout=0.3)
        trainer = make_trainer(folder, callbacks, max_epochs=2, logger=False)
        trainer.fit(model, DataLoader(random_classes(), batch_size=8, shuffle=True))
        return model

    plain = run([], tmp_path / "plain")
    monitor = SharpnessMonitor(
        mode="train", num_batches=2, ascent_steps=3, polish_steps=2, average_samples=2,
        local_entropy_gamma=100.0, local_entropy_samples=2,
    )  # fmt: skip
    watched = run([monitor], tmp_path / "watched")
    assert len(monitor.history) == 3 and all(r["sharpness/sam"] >= 0 for r in monitor.history)
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b)
