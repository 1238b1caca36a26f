"""The monitors under ModelParallelStrategy (FSDP2) on 2 gloo ranks, parameters sharded unevenly.

One spawn checks everything (each costs about 15 s): a fit without monitors and a fit with them
from the same weights must end bit for bit equal, and what the monitors logged must equal the
single-process answers on the union of both ranks' fixed batches at the weights they measured.
"""

from __future__ import annotations

import os
import socket
import types

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_landscape import (
    HessianMonitor,
    NoiseTemperatureMonitor,
    SharpnessMonitor,
    TrajectoryMonitor,
)
from lightning_landscape._core.batches import flat_grad
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.space import space_of
from lightning_landscape.callbacks.base import MeasureContext
from lightning_landscape.curvature import (
    HessianOperator,
    ShardedHessianOperator,
    dense_hessian,
    spectral_density,
    top_eigenvalues,
    trace,
)
from lightning_landscape.curvature.lanczos import lanczos
from lightning_landscape.landscape.noise import micro_batch_estimates

WORLD = 2
N = 42  # 21 samples a rank: batches of 8, 8, 5


class ShardedNet(pl.LightningModule):
    """Linear(6, 5) and Linear(5, 3): 5 and 3 rows over 2 ranks (3 + 2, 2 + 1), float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    return TensorDataset(
        torch.randn(N, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g)
    )


def full_params(module: nn.Module) -> list[torch.Tensor]:
    """The whole parameters (a collective: every rank calls it)."""
    return [p.full_tensor().detach().clone() for p in module.parameters()]


class Recording:
    """Mixed into a monitor: at each measurement every rank writes its fixed batches, the whole
    weights it measured at and what it logged (spawned processes send no attributes back)."""

    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out, self.count = out, 0

    def measure(self, ctx):
        metrics = super().measure(ctx)
        record = {
            "batches": [tuple(t.detach().cpu() for t in b) for b in ctx.batches],
            "weights": full_params(ctx.module),
            "metrics": metrics,
            "step": ctx.step,
            "picture": dict(getattr(self, "last_picture", {})),
            "final": getattr(self, "_final", False),
        }
        name = f"{type(self).__name__}-{self.count}-{torch.distributed.get_rank()}.pt"
        torch.save(record, os.path.join(self.out, name))
        self.count += 1
        return metrics


class RecordingHessian(Recording, HessianMonitor):
    pass


class RecordingSharpness(Recording, SharpnessMonitor):
    pass


class RecordingTrajectory(Recording, TrajectoryMonitor):
    pass


def accuracy(module, batch):
    x, y = batch
    return (module.net(x).argmax(1) == y).double().mean()


class RecordingNoise(NoiseTemperatureMonitor):
    """Every rank writes, per step, the weights at its start, its micro-batches and the noise
    estimates (EMA decay 0: each step's own)."""

    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out, self.steps = out, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = self.steps.setdefault(trainer.global_step, {"batches": [], "noise": None})
        if "weights" not in step:
            step["weights"] = full_params(pl_module)  # every rank, at the same batches
        step["batches"].append(tuple(t.detach().cpu() for t in batch))
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _noise(self, trainer, scale_back):
        out = super()._noise(trainer, scale_back)
        self.steps[trainer.global_step]["noise"] = out
        return out

    def on_fit_end(self, trainer, pl_module):
        super().on_fit_end(trainer, pl_module)
        torch.save(self.steps, os.path.join(self.out, f"noise-{trainer.global_rank}.pt"))


ACCUMULATE = 2
SHARPNESS = {
    "epochs": [0], "num_batches": 3, "seed": 2, "ascent": "gradient", "ascent_steps": 3,
    "average_samples": 3,
}  # fmt: skip
TRAJECTORY = {
    "every_n_steps": 2, "num_batches": 3, "num_points": 5, "grid_size": 3,
    "snapshot_dtype": torch.float64, "metric_fn": accuracy, "seed": 4,
}  # fmt: skip


def _fit(callbacks, out=None):
    from pytorch_lightning.strategies import ModelParallelStrategy

    model = ShardedNet()
    trainer = pl.Trainer(
        max_steps=4,
        accumulate_grad_batches=ACCUMULATE,
        accelerator="cpu",
        devices=WORLD,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(dataset(), batch_size=8, shuffle=False))
    return model


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
        RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)
    plain = _fit([])
    hessian = RecordingHessian(
        out, epochs=[0], top_k=2, num_batches=3, tol=1e-6, trace_probes=12, seed=5, fd_step=1e-3
    )
    sharpness = RecordingSharpness(out, **SHARPNESS)
    trajectory = RecordingTrajectory(out, **TRAJECTORY)
    noise = RecordingNoise(out, ema_decay=0.0)
    watched = _fit([hessian, sharpness, trajectory, noise])
    shards = {
        "plain": [p.detach().to_local().clone() for p in plain.parameters()],
        "watched": [p.detach().to_local().clone() for p in watched.parameters()],
    }
    torch.save(shards, os.path.join(out, f"shards-{rank}.pt"))
    torch.save(_engine(watched, rank), os.path.join(out, f"engine-{rank}.pt"))


def _engine(model, rank):
    """The curvature engine on the trained sharded model and this rank's share of fixed
    batches: the algorithms whose reductions the monitors do not exercise."""
    mine = [tuple(t[i : i + 7] for t in dataset()[rank * 21 : rank * 21 + 21]) for i in (0, 7)]
    op = ShardedHessianOperator(lambda b: F.cross_entropy(model.net(b[0]), b[1]), model, mine)
    top = top_eigenvalues(op, 2, tol=1e-6, seed=1)
    run = lanczos(op, space_of(op).draw(gaussian, (2, op.dim), make_generator(2)), 6,
                  generator=make_generator(3))  # fmt: skip
    return {
        "weights": full_params(model),
        "batches": mine,
        "top": top.eigenvalues,
        "hutch++": trace(op, num_matvecs=9, method="hutch++", seed=4).estimate,
        "hutchinson": trace(op, num_matvecs=4, method="hutchinson", seed=4).estimate,
        "density": spectral_density(op, num_probes=2, num_steps=5, seed=5).nodes,
        "basis": (tuple(run.basis.shape), run.alphas),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(out, name, index):
    return [
        torch.load(os.path.join(out, f"{name}-{index}-{r}.pt"), weights_only=False)
        for r in range(WORLD)
    ]


def _context(model, record, seed, union):
    """What a single process measures with: the plain model at the recorded weights, the union."""
    with torch.no_grad():
        for p, w in zip(model.parameters(), record["weights"], strict=True):
            p.copy_(w)
    params = list(model.parameters())
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    return MeasureContext(model, union, loss, params=params, seed=seed, step=record["step"])


class PlainModule(nn.Module):
    """The unsharded model with the LightningModule's attribute names (``metric_fn`` uses
    ``module.net``)."""

    def __init__(self):
        super().__init__()
        self.net = plain_net()

    def forward(self, x):
        return self.net(x)


@pytest.mark.distributed
def test_monitors_under_fsdp2_equal_single_process_on_the_union(tmp_path):
    out = str(tmp_path)
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)

    # training is bit-identical with and without the monitors
    for r in range(WORLD):
        shards = torch.load(os.path.join(out, f"shards-{r}.pt"))
        for a, b in zip(shards["plain"], shards["watched"], strict=True):
            assert torch.equal(a, b)

    # the engine on shards: the same as on whole vectors, the basis 1/world of them per rank
    eng = [torch.load(os.path.join(out, f"engine-{r}.pt"), weights_only=False) for r in range(2)]
    model = plain_net()
    with torch.no_grad():
        for p, w in zip(model.parameters(), eng[0]["weights"], strict=True):
            p.copy_(w)
    union = [b for r in range(WORLD) for b in eng[r]["batches"]]
    exact = HessianOperator(lambda b: F.cross_entropy(model(b[0]), b[1]), model, union)
    run = lanczos(exact, gaussian((2, exact.dim), make_generator(2), exact.dtype, exact.device), 6,
                  generator=make_generator(3))  # fmt: skip
    assert [e["basis"][0] for e in eng] == [(2, 6, 33), (2, 6, 20)]  # of (2, 6, 53)
    for e in eng:
        assert torch.allclose(e["top"], top_eigenvalues(exact, 2, tol=1e-6, seed=1).eigenvalues,
                              rtol=1e-7)  # fmt: skip
        for method, budget in (("hutch++", 9), ("hutchinson", 4)):
            expected = trace(exact, num_matvecs=budget, method=method, seed=4).estimate
            assert e[method] == pytest.approx(expected, rel=1e-7), method
        expected = spectral_density(exact, num_probes=2, num_steps=5, seed=5).nodes
        assert torch.allclose(e["density"], expected, rtol=1e-6, atol=1e-9)
        assert torch.allclose(e["basis"][1], run.alphas, rtol=1e-7, atol=1e-10)

    # HessianMonitor: the float64 dense oracle of the unsharded model on the union of batches
    rec = _records(out, "RecordingHessian", 0)
    union = [b for r in rec for b in r["batches"]]
    assert sorted(len(b[1]) for b in union) == [5, 5, 8, 8, 8, 8]
    model = plain_net()
    with torch.no_grad():
        for p, w in zip(model.parameters(), rec[0]["weights"], strict=True):
            p.copy_(w)
    H = dense_hessian(lambda b: F.cross_entropy(model(b[0]), b[1]), model, union)
    eigs = torch.linalg.eigvalsh(H)
    m = rec[0]["metrics"]
    top, second = float(eigs[-1]), float(eigs[-2])
    assert abs(m["hessian/eigenvalue_1"] - top) <= m["hessian/fd_error"]
    assert abs(m["hessian/eigenvalue_1"] - top) <= 2e-3 * abs(top)
    assert m["hessian/eigenvalue_2"] == pytest.approx(second, rel=2e-3)
    assert m["hessian/min_eigenvalue"] == pytest.approx(float(eigs[0]), rel=2e-3, abs=1e-6)
    assert m["hessian/fd_step"] == 1e-3 and 0 < m["hessian/fd_error"] < 1e-4 * abs(top)
    assert abs(m["hessian/trace"] - float(H.trace())) <= 4 * m["hessian/trace_stderr"]

    # SharpnessMonitor: the same measures on one process, the union, the same directions
    rec = _records(out, "RecordingSharpness", 0)
    union = [b for r in rec for b in r["batches"]]
    model = PlainModule()
    ctx = _context(model, rec[0], SHARPNESS["seed"], union)
    single = SharpnessMonitor(**SHARPNESS).measure(ctx)
    for key, value in single.items():
        if key.startswith("sharpness/num_"):  # passes over each rank's own batches
            assert rec[0]["metrics"][key] == value / WORLD
            continue
        for r in range(WORLD):
            assert rec[r]["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    # TrajectoryMonitor: measurements at steps 0, 2, 4 and the fit-end picture, replayed on one
    # process from the same weights
    single = TrajectoryMonitor(**TRAJECTORY)
    model = PlainModule()
    index = 0
    while os.path.exists(os.path.join(out, f"RecordingTrajectory-{index}-0.pt")):
        rec = _records(out, "RecordingTrajectory", index)
        union = [b for r in rec for b in r["batches"]]
        ctx = _context(model, rec[0], TRAJECTORY["seed"], union)
        if index == 0:
            single.snapshots.add(torch.cat([w.reshape(-1) for w in rec[0]["weights"]]), 0, 0)
        single._final = rec[0]["final"]
        expected = single.measure(ctx)
        assert set(expected) == set(rec[0]["metrics"]) - {"trajectory/seconds"}
        for key, value in expected.items():
            for r in range(WORLD):
                got = rec[r]["metrics"][key]
                if key.endswith("num_forward"):  # passes over each rank's own batches
                    value = expected[key] / WORLD
                assert got == pytest.approx(value, rel=1e-9, abs=1e-12), (index, key)
        for key, value in single.last_picture.items():
            if isinstance(value, torch.Tensor):
                assert torch.allclose(rec[0]["picture"][key], value, rtol=1e-9), (index, key)
        index += 1
    assert index == 4 and rec[0]["final"] and "trajectory/pca_explained_variance" in expected

    # NoiseTemperatureMonitor: the micro-batches of both ranks together are the small batches
    steps = [torch.load(os.path.join(out, f"noise-{r}.pt"), weights_only=False) for r in range(2)]
    measured = [s for s in steps[0] if steps[0][s]["noise"]]
    assert measured == [0, 2]  # steps 1 and 3 close a short accumulation window: one pass
    model = plain_net()
    for s in measured:
        with torch.no_grad():
            for p, w in zip(model.parameters(), steps[0][s]["weights"], strict=True):
                p.copy_(w)
        micro = []
        for j in range(ACCUMULATE):  # FSDP's mean over the ranks of their micro-batch j
            grads = [
                flat_grad(F.cross_entropy(model(x), y), list(model.parameters()))
                for x, y in (steps[r][s]["batches"][j] for r in range(WORLD))
            ]
            micro.append(sum(grads) / WORLD)
        sizes = [len(steps[0][s]["batches"][j][1]) * WORLD for j in range(ACCUMULATE)]
        est = micro_batch_estimates(
            sum(float(g.square().sum()) for g in micro),
            sum(1 / b for b in sizes),
            ACCUMULATE,
            float((sum(micro) / ACCUMULATE).square().sum()),
        )
        for r in range(WORLD):
            got = steps[r][s]["noise"]
            assert got["noise/grad_norm_sq"] == pytest.approx(est.grad_norm_sq, rel=1e-9)
            assert got["noise/trace_covariance"] == pytest.approx(est.trace_covariance, rel=1e-9)


def test_strategy_refusals_name_the_way_out():
    from pytorch_lightning.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    from lightning_landscape.callbacks.base import LandscapeMonitor

    module = ShardedNet()
    for cls, match in (
        (FSDPStrategy, "FlatParameters.*ModelParallelStrategy with FSDP2"),
        (DeepSpeedStrategy, "DeepSpeed partitions"),
    ):
        fake = types.SimpleNamespace(strategy=cls.__new__(cls))
        with pytest.raises(ValueError, match=match):
            HessianMonitor().setup(fake, module, "fit")
    fsdp2 = types.SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy))
    HessianMonitor().setup(fsdp2, module, "fit")  # supported
    for monitor in (SharpnessMonitor(), TrajectoryMonitor(), NoiseTemperatureMonitor()):
        monitor.setup(fsdp2, module, "fit")
    with pytest.raises(ValueError, match="does not support the ModelParallelStrategy"):
        LandscapeMonitor().setup(fsdp2, module, "fit")  # a monitor without FSDP2 support
