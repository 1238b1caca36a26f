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

from lightning_landscape import HessianMonitor
from lightning_landscape.curvature import dense_hessian

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
    """Mixed into a monitor: every rank writes its fixed batches and the whole weights it
    measured at, rank 0 what was logged (spawned processes send no attributes back)."""

    def measure(self, trainer, pl_module, ctx):
        metrics = super().measure(trainer, pl_module, ctx)
        weights = full_params(pl_module)
        rank = trainer.global_rank
        record = {
            "batches": [tuple(t.detach().cpu() for t in b) for b in ctx.batches],
            "weights": weights,
            "metrics": metrics,
            "step": ctx.step,
        }
        torch.save(record, os.path.join(self.out, f"{type(self).__name__}-{ctx.step}-{rank}.pt"))
        return metrics


class RecordingHessian(Recording, HessianMonitor):
    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out = out


def _fit(callbacks, out=None):
    from pytorch_lightning.strategies import ModelParallelStrategy

    model = ShardedNet()
    trainer = pl.Trainer(
        max_steps=4,
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
    watched = _fit([hessian])
    shards = {
        "plain": [p.detach().to_local().clone() for p in plain.parameters()],
        "watched": [p.detach().to_local().clone() for p in watched.parameters()],
    }
    torch.save(shards, os.path.join(out, f"shards-{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(out, name, step):
    return [torch.load(os.path.join(out, f"{name}-{step}-{r}.pt")) for r in range(WORLD)]


@pytest.mark.distributed
def test_monitors_under_fsdp2_equal_single_process_on_the_union(tmp_path):
    out = str(tmp_path)
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)

    # training is bit-identical with and without the monitors
    for r in range(WORLD):
        shards = torch.load(os.path.join(out, f"shards-{r}.pt"))
        for a, b in zip(shards["plain"], shards["watched"], strict=True):
            assert torch.equal(a, b)

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


def test_strategy_refusals_name_the_way_out():
    from pytorch_lightning.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    from lightning_landscape import NoiseTemperatureMonitor

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
    with pytest.raises(ValueError, match="does not support the ModelParallelStrategy"):
        NoiseTemperatureMonitor().setup(fsdp2, module, "fit")
