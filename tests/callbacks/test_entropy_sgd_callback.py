"""EntropySGD under a real Trainer: against a plain Algorithm 1, resume, schedulers, precision, DDP."""

import math
import os

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

try:
    from pytorch_lightning.plugins.precision import MixedPrecision
except ImportError:  # Lightning 2.1
    from pytorch_lightning.plugins.precision import MixedPrecisionPlugin as MixedPrecision
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import EntropySGD, EntropySGDCallback

BASE = dict(lr=0.5, L=3, gamma=0.5, scoping=0.1, sgld_lr=0.1, noise=0.05, alpha=0.75, seed=7)


# ---------------------------------------------------------------------------- the reference
def algorithm1(
    x, grad_at, *, outer_steps, lr, L, gamma, scoping, sgld_lr, noise, alpha, seed,
    momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, noise_scale="sqrt_lr",
    alpha_weights="new", outer_gamma=False, lr_at=None,
):  # fmt: skip
    """Algorithm 1 of Chaudhari et al. (2017) written out plainly, apart from the package; by
    default with the reference code's outer step x − μ (the package default), γ (x − μ) with
    ``outer_gamma=True``.

    ``x`` is a list of tensors; ``grad_at(xp)`` returns the gradients at ``xp`` on the next
    mini-batch. Returns the anchors after each outer step (``history[k]`` is x_k).
    """
    gen = torch.Generator().manual_seed(seed)
    x = [t.detach().clone() for t in x]
    velocity = [None] * len(x)
    history = [[t.clone() for t in x]]
    for k in range(outer_steps):
        g = gamma * (1 + scoping) ** k
        xp = [t.clone() for t in x]
        mu = [t.clone() for t in x]
        for _ in range(L):
            grads = grad_at(xp)
            for i in range(len(x)):
                eps = torch.randn(xp[i].shape, generator=gen, dtype=xp[i].dtype)
                scale = math.sqrt(sgld_lr) if noise_scale == "sqrt_lr" else math.sqrt(2 * sgld_lr)
                xp[i] = xp[i] - sgld_lr * (grads[i] - g * (x[i] - xp[i])) + scale * noise * eps
                if alpha_weights == "new":
                    mu[i] = (1 - alpha) * mu[i] + alpha * xp[i]
                else:
                    mu[i] = alpha * mu[i] + (1 - alpha) * xp[i]
        eta = lr if lr_at is None else lr_at(k)
        # The outer step is SGD. `a.add(b, alpha=c)` is one fused multiply-add on CPU, as in
        # torch.optim.SGD; writing `a + c * b` would differ in the last bit.
        for i in range(len(x)):
            d = g * (x[i] - mu[i]) if outer_gamma else x[i] - mu[i]
            if weight_decay:
                d = d.add(x[i], alpha=weight_decay)
            if momentum:
                if velocity[i] is None:
                    velocity[i] = d.clone()
                else:
                    velocity[i] = (momentum * velocity[i]).add(d, alpha=1 - dampening)
                d = d.add(velocity[i], alpha=momentum) if nesterov else velocity[i]
            x[i] = x[i].add(d, alpha=-eta)
        history.append([t.clone() for t in x])
    return history


# ---------------------------------------------------------------------------- the module
def _data(n=64, dim=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=dtype)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=gen, dtype=dtype)
    return x, y


class Tiny(pl.LightningModule):
    def __init__(self, opt_kwargs, scheduler=False, out_dir=None, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(dtype)
        self.opt_kwargs, self.scheduler, self.out_dir = opt_kwargs, scheduler, out_dir
        self.val_seen, self.eval_seen = [], []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        opt = self.trainer.optimizers[0]
        params = [p.detach().clone() for p in self.parameters()]
        self.val_seen.append((opt.outer_step, opt.inner_step, params))
        self.log("val_loss", F.mse_loss(self.net(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.eval_seen.append([p.detach().clone() for p in self.parameters()])
        self.log("test_loss", F.mse_loss(self.net(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        self.eval_seen.append([p.detach().clone() for p in self.parameters()])
        return self.net(batch[0])

    def configure_optimizers(self):
        opt = EntropySGD(self.parameters(), **self.opt_kwargs)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_fit_end(self):
        if self.out_dir is not None:  # ddp_spawn: attributes do not come back; files do
            params = [p.detach().cpu().clone() for p in self.parameters()]
            torch.save(params, os.path.join(self.out_dir, f"rank{self.global_rank}.pt"))


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[EntropySGDCallback()],
    )  # fmt: skip
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def _loaders(batch_size=8):
    x, y = _data()
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(*_data(n=16, seed=1)), batch_size=16)
    return train, val


def _reference_grads(module, batches, repeat=1, accumulate=1):
    """``grad_at`` for :func:`algorithm1`: each call takes the next batch (cycling over the
    epoch); ``repeat=L`` serves each batch L times (the closure mode); ``accumulate=k`` sums the
    gradients of the next k batches' losses divided by k (Lightning's accumulation)."""
    names = [n for n, _ in module.named_parameters()]
    net = module.net
    state = {"call": 0}

    def grad_at(xp):
        leaves = [t.detach().requires_grad_(True) for t in xp]
        params = {n.removeprefix("net."): t for n, t in zip(names, leaves, strict=True)}
        total = None
        for _ in range(accumulate):
            batch = batches[(state["call"] // repeat) % len(batches)]
            state["call"] += 1
            loss = F.mse_loss(functional_call(net, params, (batch[0],)), batch[1])
            grads = torch.autograd.grad(loss / accumulate if accumulate > 1 else loss, leaves)
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        return total

    return grad_at


# ---------------------------------------------------------------------------- equality
CASES = {
    "defaults": {},
    "paper_outer_gamma": {"outer_gamma": True},
    "noise_sqrt_2lr": {"noise_scale": "sqrt_2lr"},
    "alpha_old": {"alpha_weights": "old"},
    "outer_without_gamma": {"outer_gamma": False, "lr": 0.2},
    "nesterov_weight_decay": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    "momentum_dampening": {"momentum": 0.5, "dampening": 0.1},
    "scheduler": {"momentum": 0.9},
    "closure_mode": {"mode": "closure"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_plain_algorithm1_under_a_trainer(case):
    kwargs = {**BASE, **CASES[case]}
    closure = kwargs.get("mode") == "closure"
    scheduler = case == "scheduler"
    train, val = _loaders()
    model = Tiny(kwargs, scheduler=scheduler)
    init = [p.detach().clone() for p in model.parameters()]
    outer = 4
    steps = outer if closure else outer * kwargs["L"] + 2  # batches mode ends mid-cycle
    trainer = _trainer(
        max_steps=steps, val_check_interval=2 if closure else 5, check_val_every_n_epoch=None,
        limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(model, train, val)

    L = kwargs["L"]
    lr_at = (lambda k: kwargs["lr"] * (1 / (1 + (k * L + L - 1)))) if scheduler else None
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "mode"}
    history = algorithm1(
        init, _reference_grads(model, list(train), repeat=L if closure else 1),
        outer_steps=outer, lr_at=lr_at, **ref_kwargs,
    )  # fmt: skip
    opt = trainer.optimizers[0]
    assert opt.outer_step == outer and opt.holds_anchor
    final = [p.detach() for p in model.parameters()]
    for mine, ref in zip(final, history[outer], strict=True):
        assert torch.equal(mine, ref), (mine - ref).abs().max()
    # every validation saw the anchor x_k of the outer step in progress, mid-cycle included
    assert model.val_seen
    assert closure or any(inner > 0 for _, inner, _ in model.val_seen)
    for k, _, seen in model.val_seen:
        for mine, ref in zip(seen, history[k], strict=True):
            assert torch.equal(mine, ref)
    if scheduler:
        assert opt.base_optimizer.param_groups[0]["lr"] == kwargs["lr"] / (1 + steps)


def test_gradient_accumulation_averages_batches_into_each_langevin_step():
    kwargs = {**BASE, "momentum": 0.9}
    train, _ = _loaders()
    model = Tiny(kwargs)
    init = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(max_steps=6, accumulate_grad_batches=2)  # 12 batches, 2 outer steps
    trainer.fit(model, train)
    history = algorithm1(
        init, _reference_grads(model, list(train), accumulate=2), outer_steps=2, **kwargs
    )
    assert trainer.optimizers[0].outer_step == 2
    for mine, ref in zip(model.parameters(), history[2], strict=True):
        assert torch.equal(mine.detach(), ref)


# ---------------------------------------------------------------------------- resume
def test_resume_from_a_mid_cycle_checkpoint_continues_bit_identically(tmp_path):
    """5 batches per epoch and L=3: the checkpoint at the end of epoch 0 is 2 Langevin steps into
    an outer step. Resuming from it and finishing 3 epochs equals the uninterrupted run."""
    kwargs = {**BASE, "momentum": 0.9, "nesterov": True}
    x, y = _data(n=40)
    train = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, every_n_epochs=1)  # Lightning
    full = Tiny(kwargs)  # 2.1 saved a Path as given, which weights_only refuses
    trainer = _trainer(
        max_epochs=3, enable_checkpointing=True, callbacks=[EntropySGDCallback(), ckpt]
    )
    trainer.fit(full, train)
    path = tmp_path / "epoch=0-step=5.ckpt"
    saved = torch.load(path, weights_only=True)  # plain types and tensors only
    opt_state = saved["optimizer_states"][0]
    assert opt_state["entropy_sgd"]["inner_step"] == 2
    # the weights are the anchor x; the optimizer keeps the sample x'
    names = [n for n, _ in full.named_parameters()]
    for index, name in enumerate(names):
        assert torch.equal(saved["state_dict"][name], opt_state["state"][index]["anchor"])
        assert not torch.equal(saved["state_dict"][name], opt_state["state"][index]["sample"])

    resumed = Tiny(kwargs)
    trainer2 = _trainer(max_epochs=3)
    trainer2.fit(resumed, train, ckpt_path=path)
    assert trainer2.global_step == trainer.global_step == 15
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    opt, opt2 = trainer.optimizers[0], trainer2.optimizers[0]
    assert (opt2.outer_step, opt2.inner_step) == (opt.outer_step, opt.inner_step) == (5, 0)


# ---------------------------------------------------------------------------- a real task
class Digits(pl.LightningModule):
    def __init__(self, opt_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.opt_kwargs = opt_kwargs

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return EntropySGD(self.parameters(), **self.opt_kwargs)


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(data.target)


def _full_loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model.net(x.to(next(model.parameters()).dtype)), y).item()


DIGITS_OPT = dict(lr=1.0, momentum=0.9, nesterov=True, L=5, gamma=0.5, scoping=1e-3,
                  sgld_lr=0.1, noise=1e-4, alpha=0.75)  # fmt: skip


def test_digits_training_loss_falls_and_metrics_are_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = _digits()
    train = DataLoader(TensorDataset(x[:1500], y[:1500]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[1500:], y[1500:]), batch_size=300)
    model = Digits(DIGITS_OPT)
    before = _full_loss(model, x[:1500], y[:1500])
    logger = TensorBoardLogger(tmp_path, name="", version=0)
    trainer = _trainer(max_epochs=4, logger=logger, log_every_n_steps=5)
    trainer.fit(model, train, val)
    after = _full_loss(model, x[:1500], y[:1500])
    assert after < 0.5 * before, (before, after)

    events = EventAccumulator(str(tmp_path / "version_0")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"entropy_sgd/gamma", "entropy_sgd/outer_step", "entropy_sgd/anchor_distance"} <= tags
    gamma = events.Scalars("entropy_sgd/gamma")
    outer = events.Scalars("entropy_sgd/outer_step")
    for g, k in zip(gamma, outer, strict=True):
        assert g.value == pytest.approx(0.5 * 1.001**k.value, rel=1e-6)
    assert outer[-1].value == trainer.global_step // 5
    assert all(e.value > 0 for e in events.Scalars("entropy_sgd/anchor_distance"))
    epoch_loss = [e.value for e in events.Scalars("train_loss")]
    assert epoch_loss[-1] < epoch_loss[0]


PAPER_OPT = dict(lr=1.0, momentum=0.9, nesterov=True, L=5, gamma=0.03, scoping=1e-3,
                 sgld_lr=0.1, noise=1e-4, alpha=0.75)  # fmt: skip


class DigitsCNN(Digits):
    def __init__(self, opt_kwargs):
        super().__init__(opt_kwargs)
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(),
            nn.Linear(4 * 6 * 6, 10),
        )  # fmt: skip


def test_paper_hyperparameters_halve_the_loss_of_a_digits_cnn_within_10_epochs():
    """Chaudhari et al.'s hyperparameters (lr 1, Nesterov 0.9, L = 5, gamma 0.03, scoping 1e-3,
    eta' 0.1, noise 1e-4) with the default outer step x - mu (the reference code's); the paper's
    literal step lr gamma (x - mu) is 33x shorter and does not get there."""
    x, y = _digits()
    x, y = x[:512], y[:512]
    ratios = {}
    for outer_gamma in (False, True):
        kwargs = PAPER_OPT if not outer_gamma else {**PAPER_OPT, "outer_gamma": True}
        model = DigitsCNN(kwargs)
        before = _full_loss(model, x, y)
        gen = torch.Generator().manual_seed(0)
        train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=gen)
        _trainer(max_epochs=10).fit(model, train)
        ratios[outer_gamma] = _full_loss(model, x, y) / before  # at the anchor x
    assert ratios[False] < 0.5, ratios
    assert ratios[True] > 0.5, ratios


# ---------------------------------------------------------------------------- precision
def test_bf16_mixed_precision_trains():
    x, y = _digits()
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = Digits(DIGITS_OPT)
    before = _full_loss(model, x, y)
    trainer = _trainer(max_epochs=2, precision="bf16-mixed")
    trainer.fit(model, train)
    opt = trainer.optimizers[0]
    assert opt.outer_step == trainer.global_step // 5 and opt.holds_anchor
    after = _full_loss(model, x, y)
    assert math.isfinite(after) and after < 0.7 * before, (before, after)


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="no CPU GradScaler in torch 2.1")
def test_fp16_gradient_scaling_calls_step_without_a_closure():
    """Lightning turns `precision="16-mixed"` into bf16 on CPU; the plugin given explicitly runs
    fp16 autocast with a CPU GradScaler, which calls `step()` without a closure and skips the
    steps whose gradients overflow (forced here by a huge initial scale)."""
    x, y = _digits()
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = Digits(DIGITS_OPT)
    before = _full_loss(model, x, y)
    calls = []
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # the first steps overflow
    trainer = _trainer(max_epochs=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    original = EntropySGD.step

    def spy(self, closure=None):
        calls.append(closure)
        return original(self, closure)

    EntropySGD.step = spy
    try:
        trainer.fit(model, train)
    finally:
        EntropySGD.step = original
    assert calls and all(c is None for c in calls)
    opt = trainer.optimizers[0]
    assert trainer.precision_plugin.scaler is scaler and scaler.get_scale() < 2.0**20
    # the scaler skips `step()` on overflow: those batches are not Langevin steps
    assert opt.outer_step * opt.L + opt.inner_step == len(calls) < trainer.global_step
    assert _full_loss(model, x, y) < 0.7 * before


# ---------------------------------------------------------------------------- refusals
class Plain(Tiny):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_refuses_a_fit_without_entropy_sgd():
    train, _ = _loaders()
    with pytest.raises(MisconfigurationException, match="found no EntropySGD among"):
        _trainer(max_steps=1).fit(Plain(BASE), train)


@pytest.mark.parametrize(
    ("trainer_kwargs", "match"),
    [
        ({"accumulate_grad_batches": 2}, r"gradient accumulation \(up to 2 batches a step"),
        (  # accumulation from epoch 1 on: the inner gradients piled up there, silently
            {"callbacks": [EntropySGDCallback(), GradientAccumulationScheduler({1: 2})]},
            r"gradient accumulation \(up to 2 batches a step",
        ),
        ({"plugins": [MixedPrecision("16-mixed", "cpu")]}, r"cannot be used with fp16 gradient"),
    ],
)
def test_callback_refuses_closure_mode_where_it_cannot_work(trainer_kwargs, match):
    train, _ = _loaders()
    model = Tiny({**BASE, "mode": "closure"}, dtype=torch.float32)
    with pytest.raises(MisconfigurationException, match=match):
        _trainer(max_steps=1, **trainer_kwargs).fit(model, train)


def _fake_trainer(strategy_cls, mode):
    from types import SimpleNamespace

    return SimpleNamespace(
        optimizers=[EntropySGD(Tiny(BASE).parameters(), mode=mode)],
        accumulate_grad_batches=1,
        precision_plugin=None,
        strategy=strategy_cls.__new__(strategy_cls),  # the class is all the check looks at
        callbacks=[],
    )


def test_callback_refuses_closure_mode_under_deepspeed_and_warns_for_sharding():
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    callback = EntropySGDCallback()
    with pytest.raises(MisconfigurationException, match="cannot be used with DeepSpeed"):
        callback.on_fit_start(_fake_trainer(DeepSpeedStrategy, "closure"), None)
    with pytest.warns(UserWarning, match="under FSDPStrategy is untested"):
        callback.on_fit_start(_fake_trainer(FSDPStrategy, "batches"), None)


def test_callback_warns_about_weights_only_checkpoints(tmp_path):
    train, _ = _loaders()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)
    trainer = _trainer(
        max_steps=1, enable_checkpointing=True, callbacks=[EntropySGDCallback(), ckpt]
    )
    with pytest.warns(UserWarning, match="weights-only checkpoints"):
        trainer.fit(Tiny(BASE), train)


def test_fit_ends_on_the_anchor_and_test_predict_swap_it_in():
    train, val = _loaders()
    model = Tiny(BASE)
    trainer = _trainer(max_steps=7)  # stops 1 Langevin step into the third outer step
    trainer.fit(model, train)
    opt = trainer.optimizers[0]
    anchors = [a.detach().clone() for a in opt.anchors()]
    assert opt.holds_anchor and opt.inner_step == 1
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), anchors, strict=True))
    assert opt.swap_out_anchor()  # x' back in the parameters, as in the middle of a fit
    sample = [p.detach().clone() for p in model.parameters()]
    trainer.test(model, val, verbose=False)
    trainer.predict(model, val)
    assert len(model.eval_seen) == 2
    for seen in model.eval_seen:
        assert all(torch.equal(p, a) for p, a in zip(seen, anchors, strict=True))
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), sample, strict=True))


# ---------------------------------------------------------------------------- DDP
class EveryOther(torch.utils.data.Sampler):
    """Rank r reads samples r, r + 2, ... (Lightning's own sampler would shuffle)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n // 2

    def __iter__(self):
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return iter(range(rank, self.n, 2))


@pytest.mark.distributed
def test_ddp_spawn_ranks_end_identical(tmp_path):
    """Two gloo ranks, each on half of every batch, draw the same Langevin noise: they end with
    identical parameters, equal (to rounding) to one process on the union of the shards."""
    kwargs = {**BASE, "momentum": 0.9}
    x, y = _data()
    per_rank = DataLoader(TensorDataset(x, y), batch_size=4, sampler=EveryOther(len(x)))
    model = Tiny(kwargs, out_dir=str(tmp_path))
    trainer = _trainer(max_steps=11, devices=2, strategy="ddp_spawn", use_distributed_sampler=False)
    trainer.fit(model, per_rank)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for a, b in zip(rank0, rank1, strict=True):
        assert torch.equal(a, b)

    # rank r gets samples r, r + 2, ... so its batch j and the other's make samples 8j .. 8j + 7
    single = Tiny(kwargs)
    init = [p.detach().clone() for p in single.parameters()]
    union = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)
    _trainer(max_steps=11).fit(single, union)
    for a, b, c in zip(rank0, single.parameters(), init, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
        assert not torch.equal(a, c)
