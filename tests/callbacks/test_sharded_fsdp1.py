"""The monitors under FSDPStrategy (FSDP v1) on 2 gloo ranks, parameters sharded unevenly.

The first layer is an FSDP unit of its own, the second stays in the root's unit (which FSDP
keeps gathered after a forward): each unit's ``FlatParameter`` is cut in the middle, so each
rank holds pieces of the original parameters that end mid-row, and the two ranks hold different
numbers of entries. The model runs in float64 (a test precision plugin), so that, as for FSDP2
(``test_sharded.py``, whose checks this test shares), a fit without monitors and a fit with them
from the same weights end bit for bit equal, and what the monitors logged equals the
single-process answers on the union of both ranks' fixed batches at the weights they measured,
to round-off. (In float32, Lightning's "32-true", the same run gave λ_max 1.4e-5 from the oracle
with ``fd_error`` 8.6e-5 relative, trajectory and noise values to 1e-5; the sharpness
curvatures, quotients of loss differences, differ at the float32 round-off of the loss.)
"""

from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_landscape._core.fsdp1 import through
from lightning_landscape.curvature import ShardedHessianOperator, dense_hessian

from . import _sharded_checks as checks
from ._sharded_checks import WORLD


class Hidden(nn.Linear):
    """The first layer: ``auto_wrap_policy={Hidden}`` makes it an FSDP unit of its own."""


class FSDP1Net(pl.LightningModule):
    """Hidden(6, 5) in its own unit (35 entries), Linear(5, 3) in the root's (18), initialized
    as ``plain_net``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(Hidden(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)


def _fit(callbacks) -> nn.Module:
    """The FSDP wrapper of the trained module."""
    trainer = pl.Trainer(
        max_steps=4,
        accumulate_grad_batches=checks.ACCUMULATE,
        accelerator="cpu",
        devices=WORLD,
        strategy=checks.cpu_fsdp_strategy(
            auto_wrap_policy={Hidden}, precision_plugin=checks.float64_precision()
        ),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(FSDP1Net(), DataLoader(checks.dataset(), batch_size=8, shuffle=False))
    return trainer.strategy.model


def _worker(rank: int, port: int, out: str) -> None:
    checks.set_env(rank, port)
    plain = _fit([])
    watched = _fit(checks.monitors(out, tol=1e-6, per_module=True))
    checks.save_shards(out, rank, plain, watched)
    torch.save(_engine(watched, rank), os.path.join(out, f"engine-{rank}.pt"))
    checks.leave()


def _engine(wrapper, rank):
    """The sharded operator by hand on the FSDP wrapper (the loss through its forward), this
    rank's share of fixed batches."""
    module = wrapper.module
    loss = through(wrapper, module, lambda b: F.cross_entropy(module.net(b[0]), b[1]))
    op = ShardedHessianOperator(loss, wrapper, checks.share(rank))
    record, top = checks.engine(op, 1)
    return record | {
        "fd_error": op.finite_difference_error(top.eigenvectors[:, 0], top.eigenvalues[0])
    }


@pytest.mark.distributed
@pytest.mark.skipif(
    torch.__version__ < "2.2", reason="torch 2.1's FSDP does not run on CPU (it makes CUDA streams)"
)
def test_monitors_under_fsdp1_equal_single_process_on_the_union(tmp_path):
    out = str(tmp_path)
    mp.spawn(_worker, args=(checks.free_port(), out), nprocs=WORLD, join=True)

    sizes = checks.check_bit_identical(out)
    assert sum(sizes) == 53 and sizes[0] != sizes[1]

    # by hand: the basis holds each rank's part only; λ_max within the finite-difference error
    eng = [torch.load(os.path.join(out, f"engine-{r}.pt"), weights_only=False) for r in range(2)]
    assert [e["basis"][0] for e in eng] == [(1, 6, n) for n in sizes]
    model = checks.load_weights(checks.plain_net(), eng[0]["weights"])
    union = [b for r in range(WORLD) for b in eng[r]["batches"]]
    H = dense_hessian(lambda b: F.cross_entropy(model(b[0]), b[1]), model, union)
    top = float(torch.linalg.eigvalsh(H)[-1])
    for e in eng:
        assert abs(float(e["top"][0]) - top) <= min(e["fd_error"], 2e-3 * top)

    # the float64 dense oracle of the unsharded model, single-process replays, on the union
    hessian = checks.check_hessian(out, blocks={"net.0": slice(0, 35), "net.2": slice(35, 53)})
    assert 0 < hessian["fd_error"] < 1e-4 * abs(hessian["top"])
    checks.check_sharpness(out)
    checks.check_trajectory(out)
    checks.check_noise(out, local=True)  # each rank's micro-batches: hooks see them
