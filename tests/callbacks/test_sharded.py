"""The monitors under ModelParallelStrategy (FSDP2) on 2 gloo ranks, parameters sharded unevenly.

One spawn checks everything (each costs about 15 s): a fit without monitors and a fit with them
from the same weights must end bit for bit equal, and what the monitors logged must equal the
single-process answers on the union of both ranks' fixed batches at the weights they measured.
"""

from __future__ import annotations

import os
import types
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed.fsdp
import torch.multiprocessing as mp
import torch.nn.functional as F
from packaging.version import Version
from torch import nn
from torch.utils.data import DataLoader

from lightning_landscape import (
    HessianMonitor,
    NoiseTemperatureMonitor,
    SharpnessMonitor,
    TrajectoryMonitor,
)
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.space import space_of
from lightning_landscape.callbacks._noise_step import global_batch
from lightning_landscape.curvature import (
    HessianOperator,
    ShardedHessianOperator,
    crosscheck,
    spectral_density,
    top_eigenvalues,
    trace,
)
from lightning_landscape.curvature.lanczos import lanczos
from lightning_landscape.landscape.noise import effective_batch_size

from . import _sharded_checks as checks
from ._sharded_checks import WORLD


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


def _fit(callbacks, out=None):
    from pytorch_lightning.strategies import ModelParallelStrategy

    model = ShardedNet()
    trainer = pl.Trainer(
        max_steps=4,
        accumulate_grad_batches=checks.ACCUMULATE,
        accelerator="cpu",
        devices=WORLD,
        strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(checks.dataset(), batch_size=8, shuffle=False))
    return model


def _worker(rank: int, port: int, out: str) -> None:
    checks.set_env(rank, port)
    plain = _fit([])
    watched = _fit(checks.monitors(out, tol=1e-6, fd_step=1e-3))
    checks.save_shards(out, rank, plain, watched)
    torch.save(_engine(watched, rank), os.path.join(out, f"engine-{rank}.pt"))
    checks.leave()


def _engine(model, rank):
    """The curvature engine on the trained sharded model and this rank's share of fixed
    batches: the algorithms whose reductions the monitors do not exercise."""
    loss = lambda b: F.cross_entropy(model.net(b[0]), b[1])  # noqa: E731
    op = ShardedHessianOperator(loss, model, checks.share(rank))
    record, _ = checks.engine(op, 2)
    semi = ShardedHessianOperator(partial(_semi_gradient, model.net), model, checks.share(rank))
    v = space_of(semi).draw(gaussian, (1, semi.dim), make_generator(6))
    return record | {
        "hutch++": trace(op, num_matvecs=9, method="hutch++", seed=4).estimate,
        "hutchinson": trace(op, num_matvecs=4, method="hutchinson", seed=4).estimate,
        "density": spectral_density(op, num_probes=2, num_steps=5, seed=5).nodes,
        "asymmetry": crosscheck.nonconservative(semi, v, 1e-4),
        "global_batch": global_batch([8, 8] if rank == 0 else [2, 6], WORLD, 3),
    }


def _semi_gradient(net, batch):
    """A loss whose target, the output at another input, is detached (semi-gradient TD)."""
    return ((net(batch[0]) - net(0.8 * batch[0] + 0.1).detach()) ** 2).mean()


@pytest.mark.distributed
@pytest.mark.skipif(
    Version(torch.__version__).release < (2, 7),
    reason="FSDP2 on CPU needs torch 2.7 (2.6's CPU all-gather fails; before, it needs CUDA)",
)
def test_monitors_under_fsdp2_equal_single_process_on_the_union(tmp_path):
    out = str(tmp_path)
    mp.spawn(_worker, args=(checks.free_port(), out), nprocs=WORLD, join=True)

    assert checks.check_bit_identical(out) == [33, 20]  # of 53

    # the engine on shards: the same as on whole vectors, the basis 1/world of them per rank
    eng = [torch.load(os.path.join(out, f"engine-{r}.pt"), weights_only=False) for r in range(2)]
    model = checks.load_weights(checks.plain_net(), eng[0]["weights"])
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
    # the symmetry check of finite differences on a stop-gradient loss, on uneven shards
    semi = HessianOperator(partial(_semi_gradient, model), model, union, hvp="finite_difference")
    v = gaussian((1, semi.dim), make_generator(6), semi.dtype, semi.device)
    expected = crosscheck.nonconservative(semi, v, 1e-4)
    assert expected > 0.01 and [e["asymmetry"] for e in eng] == pytest.approx([expected] * 2)
    # B of ranks that see different batch sizes: the union's harmonic mean, on every rank
    union_b = effective_batch_size([8, 8, 2, 6], WORLD, 3)
    assert union_b == pytest.approx(2 * 3 * 4 / (1 / 8 + 1 / 8 + 1 / 2 + 1 / 6))
    assert [e["global_batch"] for e in eng] == pytest.approx([union_b] * 2, rel=1e-12)

    # the float64 dense oracle of the unsharded model, single-process replays, on the union
    hessian = checks.check_hessian(out)
    assert hessian["fd_step"] == 1e-3 and 0 < hessian["fd_error"] < 1e-4 * abs(hessian["top"])
    checks.check_sharpness(out)
    checks.check_trajectory(out)
    checks.check_noise(out)


def test_strategy_refusals_name_the_way_out():
    from pytorch_lightning import strategies
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy
    from torch.distributed.fsdp import MixedPrecision

    from lightning_landscape.callbacks.base import LandscapeMonitor

    module = ShardedNet()
    fake = types.SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    with pytest.raises(ValueError, match="DeepSpeed partitions"):
        HessianMonitor().setup(fake, module, "fit")
    hybrid = {"sharding_strategy": "HYBRID_SHARD"}
    if torch.__version__ >= "2.2":  # Lightning takes a device_mesh from torch 2.2 on
        hybrid["device_mesh"] = (1, 2)
    else:
        hybrid["auto_wrap_policy"] = {nn.Linear}
    for kwargs, match in (
        ({"use_orig_params": False}, "use_orig_params=False registers no original parameters"),
        ({"cpu_offload": True}, "cpu_offload keeps the shards on the CPU"),
        (hybrid, "sharding_strategy=HYBRID_SHARD replicates"),
        ({"sharding_strategy": "NO_SHARD"}, "sharding_strategy=NO_SHARD replicates every"),
        ({"mixed_precision": MixedPrecision(reduce_dtype=torch.float16)}, "float16.*'32-true'"),
        ({"precision_plugin": checks.fsdp_precision("bf16-mixed")}, "bfloat16.*round-off"),
    ):
        fake = types.SimpleNamespace(strategy=FSDPStrategy(**kwargs), world_size=2)
        with pytest.raises(ValueError, match=f"cannot measure under this FSDPStrategy:.*{match}"):
            HessianMonitor().setup(fake, module, "fit")
    fake = types.SimpleNamespace(strategy=FSDPStrategy(cpu_offload=True), world_size=2)
    with pytest.raises(ValueError, match="cpu_offload"):  # no finite differences, same refusals
        NoiseTemperatureMonitor().setup(fake, module, "fit")
    half = types.SimpleNamespace(
        strategy=FSDPStrategy(precision_plugin=checks.fsdp_precision("bf16-mixed"))
    )
    NoiseTemperatureMonitor().setup(half, module, "fit")  # ... but half precision is fine there
    kinds = [FSDPStrategy()]
    if hasattr(strategies, "ModelParallelStrategy"):  # not in Lightning 2.1
        kinds.append(strategies.ModelParallelStrategy.__new__(strategies.ModelParallelStrategy))
    for strategy in kinds:
        supported = types.SimpleNamespace(strategy=strategy, world_size=2)
        for monitor in (HessianMonitor(), SharpnessMonitor(), TrajectoryMonitor(),
                        NoiseTemperatureMonitor()):  # fmt: skip
            monitor.setup(supported, module, "fit")
        name = type(strategy).__name__
        with pytest.raises(ValueError, match=f"does not support the {name}"):
            LandscapeMonitor().setup(supported, module, "fit")  # a monitor without FSDP support
