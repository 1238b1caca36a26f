"""HessianMonitor's Gauss-Newton decomposition and edge of stability under real Trainers: values
against dense oracles, Adam's preconditioned sharpness, bit-identity, warnings and errors, and
Adam rising to its edge of stability on digits."""

import math
import types

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from curvature._problems import OutsideAutogradTanh
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import HessianMonitor
from lightning_landscape.curvature import GGNOperator, dense_hessian, stability_rule
from lightning_landscape.curvature.stability import inverse_sqrt_preconditioner

from ._helpers import make_trainer as trainer
from ._helpers import random_classes as dataset


class Net(pl.LightningModule):
    """Cross-entropy classifier that tells its output and target apart."""

    def __init__(self, optimizer: str = "sgd", noisy: bool = False):
        super().__init__()
        noise = [nn.BatchNorm1d(8), nn.Dropout(0.3)] if noisy else []
        self.net = nn.Sequential(nn.Linear(6, 8), *noise, nn.Tanh(), nn.Linear(8, 3)).double()
        self.optimizer = optimizer

    def output_and_target(self, batch):
        return self.net(batch[0]), batch[1]

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(*self.output_and_target(batch))

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=0.05, betas=(0.8, 0.99))
        if self.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=0.01)
        return torch.optim.SGD(params, lr=0.2)


def _fixed(data):
    x, y = data.tensors
    return [(x[:7], y[:7]), (x[7:20], y[7:20])]


def test_ggn_keys_and_values_equal_dense_oracles(tmp_path):
    pl.seed_everything(0)
    data = dataset()
    fixed = _fixed(data)
    mon = HessianMonitor(epochs=[1], top_k=2, ggn=True, density=True, tol=1e-10,
                         max_matvecs=300, trace_probes=20, num_batches=2, dataloader=fixed)  # fmt: skip
    model = Net()
    t = trainer(tmp_path, [mon], max_epochs=1)
    t.fit(model, DataLoader(data, batch_size=8))
    ea = EventAccumulator(t.logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    assert {"hessian/ggn/spectral_density"} <= set(ea.Tags()["images"])
    assert "hessian/ggn/eigenvalue_histogram" in ea.Tags()["histograms"]
    got = mon.history[-1]

    model.eval()
    H = dense_hessian(lambda b: F.cross_entropy(model.net(b[0]), b[1]), model, fixed)
    ggn = GGNOperator(model.output_and_target, model, fixed)
    G = ggn.matmat(torch.eye(ggn.dim, dtype=torch.float64))
    g_eig, g_vec = torch.linalg.eigh(G)
    h_vec = torch.linalg.eigh(H)[1]
    for i in (1, 2):
        assert got[f"hessian/ggn/eigenvalue_{i}"] == pytest.approx(float(g_eig[-i]), rel=1e-6)
        assert ea.Scalars(f"hessian/ggn/eigenvalue_{i}")[-1].value == pytest.approx(
            float(g_eig[-i]), rel=1e-5
        )
    # G has low rank: the deflated part is its whole trace, exact up to float64 rounding (here
    # 2 ulp), which the probes' stderr (1e-18 on a remainder of rounding noise) does not count
    rounding = 8 * torch.finfo(torch.float64).eps * float(g_eig.abs().sum())
    trace_error = abs(got["hessian/ggn/trace"] - float(g_eig.sum()))
    assert trace_error <= 3 * got["hessian/ggn/trace_stderr"] + rounding
    r_min = float(torch.linalg.eigvalsh(H - G)[0])
    assert got["hessian/residual/min_eigenvalue"] == pytest.approx(r_min, rel=1e-6)
    assert r_min < 0 <= float(g_eig[0]) + 1e-12
    overlap = float((h_vec[:, -1] @ g_vec[:, -1]).abs())
    assert got["hessian/ggn_overlap"] == pytest.approx(overlap, abs=1e-6)
    assert got["hessian/ggn/num_matvecs"] > 0 and got["hessian/residual/num_matvecs"] > 0


def _fit_adam(tmp_path, callbacks, epochs=2):
    pl.seed_everything(4)
    model = Net("adam", noisy=True)  # BatchNorm statistics and dropout masks must stay untouched
    t = trainer(tmp_path, callbacks, max_epochs=epochs, logger=False)
    t.fit(model, DataLoader(dataset(), batch_size=8, shuffle=True))
    return model, t


def test_adam_preconditioned_sharpness_and_training_untouched(tmp_path):
    fixed = _fixed(dataset())
    mon = HessianMonitor(every_n_epochs=1, ggn=True, tol=1e-10, max_matvecs=300,
                         num_batches=2, dataloader=fixed)  # fmt: skip
    model, t = _fit_adam(tmp_path / "a", [mon])
    plain, t_plain = _fit_adam(tmp_path / "b", [])
    for (key, a), b in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    opt, opt_plain = t.optimizers[0], t_plain.optimizers[0]
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt_plain.state[q][key]), key

    assert "hessian/preconditioned_eigenvalue_1" not in mon.history[0]  # no state at step 0
    assert mon.history[0]["hessian/eos_threshold"] == pytest.approx(3.6 / (0.2 * 0.05))
    model.eval()
    H = dense_hessian(lambda b: F.cross_entropy(model.net(b[0]), b[1]), model, fixed)
    d = inverse_sqrt_preconditioner(stability_rule(opt), list(model.parameters()))
    top = float(torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1])
    got = mon.history[-1]
    assert got["hessian/preconditioned_eigenvalue_1"] == pytest.approx(top, rel=1e-6)
    assert got["hessian/eos_ratio"] == pytest.approx(top * 0.2 * 0.05 / 3.6, rel=1e-6)


def test_unknown_optimizer_and_mismatched_ggn_loss_warn_once(tmp_path):
    def one_hot(pl_module, batch):  # MSE on one-hot targets, while training uses cross-entropy
        out = pl_module.net(batch[0])
        return out, F.one_hot(batch[1], 3).to(out.dtype)

    mon = HessianMonitor(epochs=[0, 1], ggn=True, ggn_fn=one_hot, ggn_loss="mse", trace=False)
    t = trainer(tmp_path, [mon], max_epochs=1, logger=False)
    with pytest.warns(UserWarning) as record:
        t.fit(Net("rmsprop"), DataLoader(dataset(), batch_size=8))
    messages = [str(w.message) for w in record]
    assert sum("no stability threshold is known for RMSprop" in m for m in messages) == 1
    assert sum("the GGN's loss" in m for m in messages) == 1
    assert all(math.isnan(h["hessian/eos_ratio"]) for h in mon.history)
    assert all(math.isnan(h["hessian/eos_threshold"]) for h in mon.history)
    assert all(math.isfinite(h["hessian/ggn/eigenvalue_1"]) for h in mon.history)


class FusedTanhNet(Net):
    """Net with its tanh as a kernel whose backward runs outside autograd."""

    def output_and_target(self, batch):
        first, _, last = self.net
        return last(OutsideAutogradTanh.apply(first(batch[0]))), batch[1]


def test_failed_gauss_newton_part_keeps_the_hessian(tmp_path):
    """The GGN's J v differentiates Jᵀu again: through a backward outside autograd it was
    silently wrong; refused now, its metrics are NaN with one warning while the Hessian's
    (finite differences) are logged, equal to the differentiable twin's oracle."""
    pl.seed_everything(0)
    data = dataset()
    fixed = _fixed(data)
    mon = HessianMonitor(epochs=[0, 1], ggn=True, tol=1e-10, trace=False, num_batches=2,
                         dataloader=fixed)  # fmt: skip
    model = FusedTanhNet()
    with pytest.warns(UserWarning) as record:
        trainer(tmp_path, [mon], max_epochs=1, logger=False).fit(
            model, DataLoader(data, batch_size=8)
        )
    said = [str(w.message) for w in record if "Gauss-Newton part failed" in str(w.message)]
    assert len(said) == 1 and "outside autograd" in said[0]
    assert not [w for w in record if "non-finite" in str(w.message)]
    for row in mon.history:
        assert math.isnan(row["hessian/ggn/eigenvalue_1"]) and math.isnan(
            row["hessian/ggn_overlap"]
        )
    twin = Net()
    twin.load_state_dict(model.state_dict())
    H = dense_hessian(lambda b: F.cross_entropy(*twin.output_and_target(b)), twin.net, fixed)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert mon.history[-1]["hessian/eigenvalue_1"] == pytest.approx(top, rel=1e-6)
    assert mon.history[-1]["hessian/hvp_exact"] == 0.0


def test_a_failed_residual_keeps_the_gauss_newton_values(tmp_path, monkeypatch):
    """The residual's run failing (out of memory, say) made every GGN metric NaN, though the
    GGN's own run had succeeded; now only the residual's two are NaN, with one warning."""
    from lightning_landscape.callbacks import _hessian_ggn

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(_hessian_ggn.products, "derived_eigenvalues", out_of_memory)
    pl.seed_everything(0)
    data = dataset()
    mon = HessianMonitor(epochs=[0], ggn=True, tol=1e-8, trace=False, num_batches=2,
                         dataloader=_fixed(data))  # fmt: skip
    with pytest.warns(UserWarning, match="the residual failed .*simulated.* and the GGN's"):
        trainer(tmp_path, [mon], max_epochs=1, logger=False).fit(
            Net(), DataLoader(data, batch_size=8)
        )
    (row,) = mon.history
    assert math.isnan(row["hessian/residual/min_eigenvalue"])
    assert math.isnan(row["hessian/residual/num_matvecs"])
    assert math.isfinite(row["hessian/ggn/eigenvalue_1"]) and math.isfinite(
        row["hessian/ggn_overlap"]
    )
    assert math.isfinite(row["hessian/min_eigenvalue"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ggn": 1}, TypeError, "`ggn` must be a bool"),
        ({"preconditioned": "yes"}, TypeError, "`preconditioned` must be a bool"),
        ({"ggn_fn": 3}, TypeError, "`ggn_fn` must be callable"),
        ({"ggn_loss": "hinge"}, ValueError, "^`ggn_loss` must be 'cross_entropy', 'mse' or a"),
        ({"ggn_loss": 3}, TypeError, "^`ggn_loss` must be 'cross_entropy', 'mse' or a callable"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        HessianMonitor(**kwargs)


def test_setup_requires_a_way_to_split_output_and_target():
    class Plain(Net):
        output_and_target = None

    ok = types.SimpleNamespace(strategy=object())
    with pytest.raises(ValueError, match="needs the model output and the target apart"):
        HessianMonitor(ggn=True).setup(ok, Plain(), "fit")
    HessianMonitor(ggn=True, ggn_fn=lambda m, b: (m.net(b[0]), b[1])).setup(ok, Plain(), "fit")
    HessianMonitor(ggn=True).setup(ok, Net(), "fit")


class TanhMLP(pl.LightningModule):
    """The 64-64-10 tanh MLP of benchmarks/adam_eos.py: MSE on one-hot digits, full-batch Adam."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, 10))  # fmt: skip

    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, betas=(0.9, 0.999))


def test_full_batch_adam_rises_to_its_edge_of_stability(tmp_path):
    """Cohen et al. 2022: λ_max(P⁻¹H) rises to 38/η. Measured (benchmarks/adam_eos.py, seed 0):
    ratio 0.23 / 0.65 / 0.74 at steps 100 / 200 / 300, 0.9-1.0 from step 400 on."""
    pl.seed_everything(0)
    digits = load_digits()
    x = torch.tensor(digits.data[:1000], dtype=torch.float32) / 16
    y = F.one_hot(torch.tensor(digits.target[:1000]), 10).float()
    mon = HessianMonitor(every_n_steps=150, dataloader=[(x, y)], num_batches=1, trace=False,
                         min_eigenvalue=False)  # fmt: skip
    t = trainer(tmp_path, [mon], max_epochs=300, logger=False)
    t.fit(TanhMLP(), DataLoader(TensorDataset(x, y), batch_size=1000))
    ratios = [h.get("hessian/eos_ratio", math.nan) for h in mon.history]
    assert [int(h["step"]) for h in mon.history] == [0, 150, 300]
    assert ratios[-1] > 0.5 and all(r <= 1.3 for r in ratios[1:])
    sharp = mon.history[-1]["hessian/eigenvalue_1"]
    assert sharp * 1e-3 / 2 < 0.05  # the SGD reading would say "far from the edge"
