"""NoiseTemperatureMonitor in real Trainers: temperature, noise scale, DDP, resume, errors."""

import math
import types
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from lightning_landscape import NoiseTemperatureMonitor, SharpnessMonitor
from lightning_landscape.callbacks._noise_step import global_batch
from lightning_landscape.landscape.noise import effective_batch_size, exact_noise_scale
from lightning_landscape.landscape.sharpness import (
    FunctionObjective,
    adaptive_sharpness,
    keskar_sharpness,
    sam_sharpness,
)

from . import end_process_group
from ._helpers import make_trainer, scalars
from ._models import Fourier, fourier_data

D = torch.float64


class Regression(pl.LightningModule):
    """Linear least squares; float64; optimizer chosen by name (picklable for ddp_spawn)."""

    def __init__(self, d=3, lr=0.1, optimizer="sgd", momentum=0.0, groups=False, decay=False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(d, 1).double()
        self.lr, self.optimizer_name, self.momentum = lr, optimizer, momentum
        self.groups, self.decay = groups, decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.lin(x).squeeze(-1), y)

    def configure_optimizers(self):
        if self.groups:
            params = [
                {"params": [self.lin.weight], "dampening": 0.1},
                {"params": [self.lin.bias], "lr": self.lr / 2},
            ]
        else:
            params = self.parameters()
        if self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        if not self.decay:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _decay(step):
    return 1.0 / (1.0 + step)


def _data(n, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=D)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=D)[:d] + 0.3 * torch.randn(n, generator=g, dtype=D)
    return x, y


def test_temperature_with_accumulation_short_batch_momentum_and_groups(tmp_path):
    """14 samples, batches of 4 → 4, 4, 4, 2; accumulate 2 → steps over [4, 4] and [4, 2]."""
    x, y = _data(14)
    model = Regression(lr=0.2, momentum=0.9, groups=True, decay=True)
    monitor = NoiseTemperatureMonitor()
    trainer = make_trainer(tmp_path, [monitor], accumulate_grad_batches=2)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    logged = scalars(tmp_path)
    assert sorted(logged["noise/temperature"]) == [0, 1, 2, 3]
    for step in range(4):
        lr = 0.2 / (1 + step)
        batch = 8 if step % 2 == 0 else 2 * (2 / (1 / 4 + 1 / 2))  # harmonic size of [4, 2]
        assert logged["noise/batch_size"][step] == pytest.approx(batch, rel=1e-6)
        assert logged["noise/temperature"][step] == pytest.approx(lr / (2 * batch), rel=1e-6)
        assert logged["noise/temperature_momentum"][step] == pytest.approx(
            lr * 0.9 / (2 * batch * 0.1), rel=1e-6
        )
        assert logged["noise/temperature/group_1"][step] == pytest.approx(
            lr / (4 * batch), rel=1e-6
        )
        assert logged["noise/temperature_momentum/group_1"][step] == pytest.approx(
            lr / (4 * batch * 0.1), rel=1e-6
        )
        for key in ("noise/gradient_noise_scale", "noise/trace_covariance", "noise/grad_norm_sq"):
            assert math.isfinite(logged[key][step])
    assert "noise/temperature" in trainer.callback_metrics
    assert monitor.ema.count == 4
    for p in model.parameters():  # hooks removed after fit
        assert not p._backward_hooks


def test_noise_scale_with_accumulation_converges_to_exact(tmp_path):
    """lr = 0 keeps the weights fixed; samples drawn with replacement: the EMA of the unbiased
    estimates converges to the exact tr(Σ)/|G|² from per-sample gradients."""
    x, y = _data(512)
    model = Regression(lr=0.0)
    steps, batch, accumulate = 400, 8, 4
    sampler = RandomSampler(range(512), replacement=True, num_samples=steps * batch * accumulate)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, sampler=sampler)
    monitor = NoiseTemperatureMonitor(every_n_steps=1, ema_decay=0.998)
    trainer = make_trainer(tmp_path, [monitor], accumulate_grad_batches=accumulate, max_epochs=1)
    pl.seed_everything(0)
    trainer.fit(model, loader)
    xb = torch.cat([x, torch.ones(512, 1, dtype=D)], 1)
    residual = model.lin(x).squeeze(-1).detach() - y
    per_sample = 2 * residual[:, None] * xb  # gradient of (xᵀw + b − y)² in (w, b)
    exact = exact_noise_scale(per_sample)
    logged = scalars(tmp_path)
    last = max(logged["noise/gradient_noise_scale"])
    assert last == steps - 1 and monitor.ema.count == steps
    assert logged["noise/gradient_noise_scale"][last] == pytest.approx(exact.noise_scale, rel=0.1)
    assert logged["noise/trace_covariance"][last] == pytest.approx(exact.trace_covariance, rel=0.1)
    assert logged["noise/grad_norm_sq"][last] == pytest.approx(exact.grad_norm_sq, rel=0.1)
    assert logged["noise/temperature"][last] == 0.0


def test_one_device_without_accumulation_logs_temperature_only(tmp_path):
    x, y = _data(16)
    monitor = NoiseTemperatureMonitor(every_n_steps=2)
    trainer = make_trainer(tmp_path, [monitor], max_epochs=1)
    with pytest.warns(UserWarning, match="no second batch size"):
        trainer.fit(Regression(optimizer="adam"), DataLoader(TensorDataset(x, y), batch_size=4))
    logged = scalars(tmp_path)
    assert sorted(logged["noise/temperature"]) == [0, 2]  # every 2 of 4 steps
    assert logged["noise/temperature"][2] == pytest.approx(0.1 / 8, rel=1e-6)
    noise_keys = {k for k in logged if k.startswith("noise/")}
    assert noise_keys == {"noise/temperature", "noise/batch_size"}  # Adam: no momentum key


class ManualEveryTwo(Regression):
    """Manual optimization: one undivided backward per batch, a step every two batches."""

    def __init__(self, split=False):
        super().__init__(lr=0.0)
        self.automatic_optimization = False
        self.split = split

    def training_step(self, batch, batch_idx):
        x, y = batch
        parts = zip(x.chunk(2), y.chunk(2), strict=True) if self.split else [(x, y)]
        for xs, ys in parts:
            self.manual_backward(F.mse_loss(self.lin(xs).squeeze(-1), ys))
        if batch_idx % 2 == 1:
            self.optimizers().step()
            self.optimizers().zero_grad()


def test_manual_optimization(tmp_path):
    x, y = _data(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    model = ManualEveryTwo()
    trainer = make_trainer(tmp_path / "a", [NoiseTemperatureMonitor(ema_decay=0.0)], max_epochs=1)
    trainer.fit(model, loader)
    logged = scalars(tmp_path / "a")
    assert logged["noise/batch_size"] == {0: 4.0, 1: 4.0}
    xb = torch.cat([x, torch.ones(16, 1, dtype=D)], 1)
    theta = torch.cat([model.lin.weight.detach().reshape(-1), model.lin.bias.detach()])
    for step in (0, 1):
        smalls = []
        for b in (2 * step, 2 * step + 1):
            idx = slice(4 * b, 4 * b + 4)
            smalls.append(2 * (xb[idx] * (xb[idx] @ theta - y[idx])[:, None]).mean(0))
        small_sq = sum(float(g.pow(2).sum()) for g in smalls) / 2
        big_sq = float((sum(smalls) / 2).pow(2).sum())
        assert logged["noise/grad_norm_sq"][step] == pytest.approx(2 * big_sq - small_sq, rel=1e-5)
    split = NoiseTemperatureMonitor()
    trainer = make_trainer(tmp_path / "b", [split], max_epochs=1)
    with pytest.warns(UserWarning, match="do not match its batches"):
        trainer.fit(ManualEveryTwo(split=True), loader)
    assert split.ema.count == 0


def _unreadable(batch):
    raise ValueError("no size here")


def test_batch_size_fn_and_unreadable_batches(tmp_path):
    x, y = _data(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    monitor = NoiseTemperatureMonitor(batch_size_fn=lambda batch: 100)
    make_trainer(tmp_path / "a", [monitor], accumulate_grad_batches=2, max_epochs=1).fit(
        Regression(), loader
    )
    assert set(scalars(tmp_path / "a")["noise/batch_size"].values()) == {200.0}
    monitor = NoiseTemperatureMonitor(batch_size_fn=_unreadable)
    trainer = make_trainer(tmp_path / "b", [monitor], accumulate_grad_batches=2, max_epochs=1)
    with pytest.warns(UserWarning, match="cannot tell the batch size"):
        trainer.fit(Regression(), loader)
    assert not any(k.startswith("noise/") for k in scalars(tmp_path / "b"))
    assert monitor.ema.count == 0
    monitor = NoiseTemperatureMonitor(batch_size_fn=lambda batch: 0)  # dropped silently before
    trainer = make_trainer(tmp_path / "c", [monitor], accumulate_grad_batches=2, max_epochs=1)
    with pytest.warns(UserWarning, match="a batch of 0 samples; the steps that hold one"):
        trainer.fit(Regression(), loader)
    assert not any(k.startswith("noise/") for k in scalars(tmp_path / "c"))


class SkipsSecondBatches(Regression):
    def training_step(self, batch, batch_idx):
        return None if batch_idx % 4 == 1 else super().training_step(batch, batch_idx)


def test_a_skipped_micro_batch_is_named_and_its_step_left_out(tmp_path):
    """A step whose accumulation window had a batch skipped (training_step returned None) left
    out the noise scale silently, as if it were a short last window."""
    x, y = _data(32)
    monitor = NoiseTemperatureMonitor()
    trainer = make_trainer(tmp_path, [monitor], accumulate_grad_batches=2, max_epochs=1)
    with pytest.warns(UserWarning, match="do not match its batches"):
        trainer.fit(SkipsSecondBatches(), DataLoader(TensorDataset(x, y), batch_size=4))
    logged = scalars(tmp_path)
    assert sorted(logged["noise/temperature"]) == [0, 1, 2, 3]
    assert sorted(logged["noise/gradient_noise_scale"]) == [1, 3]  # not the windows with a skip


def test_resume_continues_steps_and_ema(tmp_path):
    x, y = _data(16)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    first = NoiseTemperatureMonitor(ema_decay=0.5)
    trainer = make_trainer(tmp_path / "a", [first], accumulate_grad_batches=2, max_epochs=2)
    trainer.fit(Regression(), loader)
    ckpt = str(tmp_path / "a.ckpt")
    trainer.save_checkpoint(ckpt)
    assert first.ema.count == 4
    second = NoiseTemperatureMonitor(ema_decay=0.5)
    trainer = make_trainer(tmp_path / "b", [second], accumulate_grad_batches=2, max_epochs=4)
    trainer.fit(Regression(), loader, ckpt_path=ckpt)
    assert second.ema.count == 8
    before, after = scalars(tmp_path / "a"), scalars(tmp_path / "b")
    assert sorted(before["noise/temperature"]) == [0, 1, 2, 3]
    assert sorted(after["noise/temperature"]) == [4, 5, 6, 7]  # no repeat, no skip
    torch.load(ckpt, weights_only=True)  # the callback state is plain


def test_errors():
    with pytest.raises(ValueError, match="`every_n_steps` must be a positive int"):
        NoiseTemperatureMonitor(every_n_steps=0)
    with pytest.raises(TypeError, match="`every_n_steps` must be a positive int"):
        NoiseTemperatureMonitor(every_n_steps=1.5)
    with pytest.raises(ValueError, match=r"`ema_decay` must be a number in \[0, 1\)"):
        NoiseTemperatureMonitor(ema_decay=1.0)
    with pytest.raises(TypeError, match="`ema_decay` must be a number"):
        NoiseTemperatureMonitor(ema_decay="0.9")
    with pytest.raises(TypeError, match="`noise_scale` must be a bool"):
        NoiseTemperatureMonitor(noise_scale=1)
    with pytest.raises(TypeError, match="`batch_size_fn` must be callable"):
        NoiseTemperatureMonitor(batch_size_fn=4)

    class DeepSpeedStrategy:  # the name is what setup checks
        pass

    fake = types.SimpleNamespace(strategy=DeepSpeedStrategy())
    with pytest.raises(ValueError, match="does not support the DeepSpeedStrategy strategy"):
        NoiseTemperatureMonitor().setup(fake, Regression(), "fit")


def _global_batch_ranks(rank: int, tmp: str) -> None:
    import datetime

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )  # fmt: skip
    try:
        uneven = global_batch([[8, 8], [2, 6]][rank], 2, 2)
        unknown = global_batch([4] if rank == 0 else None, 2, 1)  # rank 1 cannot tell
        torch.save((uneven, unknown), f"{tmp}/rank{rank}.pt")
    finally:
        end_process_group()


@pytest.mark.distributed
def test_global_batch_of_two_ranks_of_different_sizes(tmp_path):
    """B was W · A · this rank's harmonic mean: rank 0 logged 32 where the union gives 17.45."""
    import torch.multiprocessing as mp

    mp.spawn(_global_batch_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    union = effective_batch_size([8, 8, 2, 6], 2, 2)
    assert results == [(pytest.approx(union, rel=1e-12), None)] * 2
    assert union == pytest.approx(17.4545, rel=1e-4)


def test_global_batch_on_one_process():
    assert global_batch([4, 2], 1, 3) == pytest.approx(effective_batch_size([4, 2], 1, 3))
    assert global_batch([4, 2], 1, 3) == pytest.approx(3 * 2 / (1 / 4 + 1 / 2))
    for unknown in (None, [], [4, 0]):  # the batch size could not be read: nothing logged
        assert global_batch(unknown, 1, 1) is None


# ------------------------------------------------------------------------------------- DDP
N_DDP, B_DDP, W, A = 20, 4, 2, 2  # 10 samples per rank: batches 4, 4, 2 → steps over [4, 4], [2]


class RankShard(torch.utils.data.Sampler):
    """Rank r gets the samples r, r + W, r + 2W, ... in order (Lightning's own DistributedSampler
    always shuffles the training data)."""

    def __init__(self, n, world):
        self.n, self.world = n, world

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return iter(range(rank, self.n, self.world))

    def __len__(self):
        return len(range(0, self.n, self.world))


def _sgd_replay(x, y):
    """Replay the 2-rank run: per step, the micro-batch gradients of every rank, and the weights
    after each step."""
    model = Regression(momentum=0.9, decay=True)
    theta = torch.cat([model.lin.weight.detach().reshape(-1), model.lin.bias.detach()])
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=D)], 1)

    def grad(idx, th):
        r = xb[idx] @ th - y[idx]
        return 2 * (xb[idx] * r[:, None]).mean(0)

    shards = [list(range(r, N_DDP, W)) for r in range(W)]
    windows = [[(0, 4), (4, 8)], [(8, 10)]]
    steps, weights, buf, s = [], [theta.clone()], None, 0
    for _epoch in range(2):
        for window in windows:
            smalls = [grad(shards[r][a:b], theta) for r in range(W) for a, b in window]
            g = sum(smalls) / (W * A)  # DDP mean over ranks of the accumulated Σ_j g_j / A
            lr = 0.1 / (1 + s)
            buf = g.clone() if buf is None else 0.9 * buf + g
            steps.append((lr, window[0][1] - window[0][0] if len(window) == 2 else 2, smalls))
            theta = theta - lr * buf
            s += 1
        weights.append(theta.clone())
    return steps, weights, xb, shards


@pytest.mark.distributed
def test_ddp_spawn_temperature_noise_scale_and_sharpness(tmp_path):
    x, y = _data(N_DDP)
    loader = DataLoader(TensorDataset(x, y), batch_size=B_DDP, sampler=RankShard(N_DDP, W))
    noise = NoiseTemperatureMonitor(ema_decay=0.0)  # the last step's estimates, unsmoothed
    sharp = SharpnessMonitor(num_batches=2, ascent_steps=3, average_samples=2, rho=0.05)
    trainer = make_trainer(
        tmp_path,
        [noise, sharp],
        devices=W,
        strategy="ddp_spawn",
        accumulate_grad_batches=A,
        max_epochs=2,
        use_distributed_sampler=False,
    )
    trainer.fit(Regression(momentum=0.9, decay=True), loader)
    logged = scalars(tmp_path)
    steps, weights, xb, shards = _sgd_replay(x, y)
    assert sorted(logged["noise/temperature"]) == [0, 1, 2, 3]
    for s, (lr, b, smalls) in enumerate(steps):
        k = len(smalls) // W
        # the formula lr / (2 · b · 2 · 2), b = 4 or the short last batch 2
        assert logged["noise/temperature"][s] == pytest.approx(lr / (2 * b * W * A), rel=1e-6)
        assert logged["noise/temperature_momentum"][s] == pytest.approx(
            lr / (2 * b * W * A * 0.1), rel=1e-6
        )
        assert logged["noise/batch_size"][s] == pytest.approx(b * W * A, rel=1e-6)
        # McCandlish's estimators: small = each rank's micro-batch gradient (b samples),
        # big = their mean (b · W · k samples)
        small_sq = sum(float(g.pow(2).sum()) for g in smalls) / len(smalls)
        big_sq = float((sum(smalls) / len(smalls)).pow(2).sum())
        b_small, b_big = b, b * W * k
        g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
        trs = (small_sq - big_sq) / (1 / b_small - 1 / b_big)
        assert logged["noise/grad_norm_sq"][s] == pytest.approx(g2, rel=1e-5)
        assert logged["noise/trace_covariance"][s] == pytest.approx(trs, rel=1e-5)
        assert logged["noise/gradient_noise_scale"][s] == pytest.approx(trs / g2, rel=1e-5)
    # sharpness at epochs 0, 1, 2 (steps 0, 2, 4) equals the single-process value on the union
    # of both ranks' fixed batches (the first 2 batches of each shard)
    union = [i for r in range(W) for i in shards[r][:8]]

    def loss(theta):
        return ((xb[union] @ theta - y[union]) ** 2).mean()

    assert sorted(logged["sharpness/sam"]) == [0, 2, 4]
    for epoch, step in enumerate([0, 2, 4]):
        w = weights[epoch]
        sam = sam_sharpness(FunctionObjective(loss), w, 0.05, steps=3)
        ada = adaptive_sharpness(FunctionObjective(loss), w, 0.5, eta=0.01, steps=3)
        kes = keskar_sharpness(FunctionObjective(loss), w, 1e-3, steps=3)
        assert logged["sharpness/sam"][step] == pytest.approx(sam.sharpness, rel=1e-5)
        assert logged["sharpness/adaptive"][step] == pytest.approx(ada.sharpness, rel=1e-5)
        assert logged["sharpness/keskar"][step] == pytest.approx(kes.sharpness, rel=1e-5)
        assert math.isfinite(logged["sharpness/average"][step])
        assert logged["sharpness/average_stderr"][step] >= 0


def test_prefix_names_the_keys_and_the_state(tmp_path):
    x, y = _data(16)
    plain, other = NoiseTemperatureMonitor(), NoiseTemperatureMonitor(prefix="noise_b")
    trainer = make_trainer(tmp_path, [plain, other], accumulate_grad_batches=2, max_epochs=1)
    trainer.fit(Regression(), DataLoader(TensorDataset(x, y), batch_size=4))
    logged = scalars(tmp_path)
    assert logged["noise_b/temperature"] == logged["noise/temperature"]
    assert sorted(logged["noise_b/gradient_noise_scale"]) == sorted(logged["noise/grad_norm_sq"])
    assert plain.state_key != other.state_key


def test_entropy_sgd_is_named_in_one_warning(tmp_path):
    """With Entropy-SGD the logged temperature is the outer step's: one warning says so, naming
    both learning rates."""
    import warnings

    from lightning_landscape.optim import EntropySGD

    from ._helpers import Classifier, random_classes

    class Entropic(Classifier):
        def configure_optimizers(self):
            return EntropySGD(self.parameters(), lr=0.5, L=2, sgld_lr=0.05)

    mon = NoiseTemperatureMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [mon], max_epochs=1, max_steps=2, logger=False).fit(
            Entropic(), DataLoader(random_classes(), batch_size=8)
        )
    said = [str(w.message) for w in caught if "with EntropySGD" in str(w.message)]
    assert len(said) == 1 and "lr 0.5" in said[0] and "sgld_lr 0.05" in said[0], said


class Bag(pl.LightningModule):
    """An embedding (sparse gradients when ``sparse``) and a linear head, float64."""

    def __init__(self, sparse):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5, 2, sparse=sparse).double()
        self.head = nn.Linear(2, 1).double()

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return F.mse_loss(self.head(self.emb(ids).sum(1)).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def assert_same_noise(tmp_path, make, data):
    """The noise statistics of ``make(True)`` and ``make(False)`` (two ways of writing one
    model) agree to 1e-9, at both optimizer steps, without a skipped step."""
    logged = {}
    for variant in (True, False):
        trainer = make_trainer(
            tmp_path / str(variant), [NoiseTemperatureMonitor(ema_decay=0.0)], max_epochs=1,
            accumulate_grad_batches=2,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(make(variant), DataLoader(data, batch_size=4))
        assert not [w for w in caught if "could not be measured" in str(w.message)]
        logged[variant] = scalars(tmp_path / str(variant))
    for key in ("noise/grad_norm_sq", "noise/trace_covariance"):
        assert len(logged[True][key]) == len(logged[False][key]) == 2
        for step, value in logged[False][key].items():
            assert math.isfinite(value)
            assert logged[True][key][step] == pytest.approx(value, rel=1e-9)


def test_sparse_gradients_are_measured_like_dense_ones(tmp_path):
    """Before: the gradient hook raised inside the user's backward on a sparse gradient
    ("Could not run 'aten::linalg_vector_norm' ... 'SparseCPU'") and the fit crashed. Repeated
    indices in a batch (sparse gradients keep duplicates) are summed first."""
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(
        torch.randint(0, 5, (16, 3), generator=g), torch.randn(16, generator=g, dtype=D)
    )
    assert_same_noise(tmp_path, lambda sparse: Bag(sparse), data)


def test_a_failing_gradient_hook_skips_the_step_and_warns(tmp_path, monkeypatch):
    """The hook runs inside the user's backward: whatever goes wrong there, training goes on,
    the step's noise scale is skipped (not the previous EMA logged again) and one warning says
    why."""
    from lightning_landscape.callbacks import _noise_step

    def broken(grad, dtype):
        raise RuntimeError("no norm here")

    monkeypatch.setattr(_noise_step, "squared_norm", broken)
    x, y = _data(16)
    trainer = make_trainer(
        tmp_path, [NoiseTemperatureMonitor()], max_epochs=1, accumulate_grad_batches=2
    )
    with pytest.warns(UserWarning, match=r"could not be measured \(RuntimeError: no norm here\)"):
        trainer.fit(Regression(), DataLoader(TensorDataset(x, y), batch_size=4))
    logged = scalars(tmp_path)
    assert sorted(logged["noise/temperature"]) == [0, 1]
    assert "noise/gradient_noise_scale" not in logged


def test_non_finite_steps_are_skipped_quietly_unless_a_hook_failed():
    """An fp16 overflow step (non-finite gradients) is skipped without a warning; the sharded
    steps (FSDP2), which take no per-tensor hooks, too (they have no failure to report)."""
    from lightning_landscape.callbacks._noise_sharded import ShardedGradientSteps
    from lightning_landscape.callbacks._noise_step import GradientHooks, hook_failed

    for hooks in (GradientHooks(), ShardedGradientSteps()):
        assert not hook_failed(None, hooks, 1.0)
        assert hook_failed(None, hooks, math.inf)  # no warning: would need the trainer


def test_complex_gradients_count_real_and_imaginary_parts(tmp_path):
    """Before: "linalg.vector_norm: dtype should be complex for complex inputs" in the hook,
    every step skipped. PyTorch's gradient of a complex weight is dL/dre + i dL/dim, so its
    squared norm is that of the two real parts."""
    assert_same_noise(tmp_path, Fourier, fourier_data())
