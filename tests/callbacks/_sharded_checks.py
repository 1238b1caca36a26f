"""What the 2-rank sharded tests share (FSDP2 in ``test_sharded.py``, FSDP (v1) in
``test_sharded_fsdp1.py``): the data, monitors that record what they measured (spawned processes
send no attributes back), and the checks of the records against single-process answers on the
union of both ranks' fixed batches at the weights the monitors measured.

Every rank writes its records to ``out``; the checks run in the parent process.
"""

from __future__ import annotations

import math
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_landscape import (
    HessianMonitor,
    NoiseTemperatureMonitor,
    SharpnessMonitor,
    TrajectoryMonitor,
)
from lightning_landscape._core.batches import flat_grad
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.sharding import flat_parameters
from lightning_landscape._core.space import space_of
from lightning_landscape.callbacks._sharded import fsdp_wrapper
from lightning_landscape.callbacks.base import MeasureContext
from lightning_landscape.curvature import dense_hessian, top_eigenvalues
from lightning_landscape.curvature.lanczos import lanczos
from lightning_landscape.landscape.noise import micro_batch_estimates

WORLD = 2
N = 42  # 21 samples a rank: batches of 8, 8, 5
ACCUMULATE = 2


try:
    from pytorch_lightning.plugins.precision import FSDPPrecision
except ImportError:  # Lightning 2.1
    from pytorch_lightning.plugins.precision import FSDPMixedPrecisionPlugin as FSDPPrecision


def fsdp_precision(precision: str):
    """Lightning's ``FSDPPrecision(precision)`` (Lightning 2.1's also asked for a device)."""
    try:
        return FSDPPrecision(precision)
    except TypeError:
        return FSDPPrecision(precision, "cuda")


def plain_net(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


class PlainModule(nn.Module):
    """The unsharded model with the LightningModules' attribute names (``metric_fn`` uses
    ``module.net``)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.net = plain_net(dtype)

    def forward(self, x):
        return self.net(x)


def dataset(dtype=torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64).to(dtype)
    return TensorDataset(x, torch.randint(0, 3, (N,), generator=g))


def accuracy(module, batch):
    x, y = batch
    return (module.net(x).argmax(1) == y).double().mean()


def whole_params(module: nn.Module) -> list[torch.Tensor]:
    """The whole parameters of a sharded module, shaped (a collective: every rank calls it)."""
    layout = flat_parameters(module)
    flat = layout.assemble(layout.get())
    sizes = [math.prod(s) for s in layout.shapes]
    return [t.reshape(s).clone() for t, s in zip(flat.split(sizes), layout.shapes, strict=True)]


class Recording:
    """Mixed into a monitor: at each measurement every rank writes its fixed batches, the whole
    weights it measured at and what it logged."""

    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out, self.count = out, 0

    def measure(self, ctx):
        metrics = super().measure(ctx)
        record = {
            "batches": [tuple(t.detach().cpu() for t in b) for b in ctx.batches],
            "weights": whole_params(ctx.sharded_module),
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


class RecordingNoise(NoiseTemperatureMonitor):
    """Every rank writes, per step, the weights at its start, its micro-batches and the noise
    estimates (EMA decay 0: each step's own)."""

    def __init__(self, out, **kw):
        super().__init__(**kw)
        self.out, self.steps = out, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = self.steps.setdefault(trainer.global_step, {"batches": [], "noise": None})
        if "weights" not in step:  # every rank, at the same batches
            step["weights"] = whole_params(fsdp_wrapper(trainer, pl_module) or pl_module)
        step["batches"].append(tuple(t.detach().cpu() for t in batch))
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def _noise(self, trainer, scale_back):
        out = super()._noise(trainer, scale_back)
        self.steps[trainer.global_step]["noise"] = out
        return out

    def on_fit_end(self, trainer, pl_module):
        super().on_fit_end(trainer, pl_module)
        torch.save(self.steps, os.path.join(self.out, f"noise-{trainer.global_rank}.pt"))


SHARPNESS = {
    "epochs": [0], "num_batches": 3, "seed": 2, "ascent": "gradient", "ascent_steps": 3,
    "average_samples": 3,
}  # fmt: skip
TRAJECTORY = {
    "every_n_steps": 2, "num_batches": 3, "num_points": 5, "grid_size": 3,
    "snapshot_dtype": torch.float64, "metric_fn": accuracy, "seed": 4,
}  # fmt: skip


def monitors(out, **hessian):
    """The four monitors, recording (HessianMonitor with ``hessian`` on top of the test's
    settings)."""
    settings = {"epochs": [0], "top_k": 2, "num_batches": 3, "trace_probes": 12, "seed": 5}
    return [
        RecordingHessian(out, **(settings | hessian)),
        RecordingSharpness(out, **SHARPNESS),
        RecordingTrajectory(out, **TRAJECTORY),
        RecordingNoise(out, ema_decay=0.0),
    ]


def cpu_fsdp_strategy(**kwargs):
    """Lightning's ``FSDPStrategy`` on CPU ranks (gloo). Lightning runs it on GPUs only: its
    accelerator check refuses the class itself with ``accelerator="cpu"`` (a subclass passes),
    and it hands FSDP ``device_id=None`` on CPU, which FSDP refuses for a module on CPU ("FSDP
    needs a non-CPU accelerator device"); this subclass wraps with ``device_id=cpu``."""
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel

    class CPUFSDPStrategy(FSDPStrategy):
        def _setup_model(self, model: nn.Module) -> nn.Module:
            return FullyShardedDataParallel(
                model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                **self.kwargs,
            )  # fmt: skip

    return CPUFSDPStrategy(**kwargs)


def float64_precision():
    """An ``FSDPPrecision`` in float64 (Lightning's stop at "32-true"): float64 parameters and
    inputs, no FSDP mixed precision; single-process answers are then matched to round-off."""

    class Float64(FSDPPrecision):
        def __init__(self) -> None:
            super().__init__("32-true")
            self._desired_input_dtype = torch.float64

        @property
        def mixed_precision_config(self):
            return None

    return Float64()


def set_env(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
        RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0",
    )  # fmt: skip
    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out, name, index):
    return [
        torch.load(os.path.join(out, f"{name}-{index}-{r}.pt"), weights_only=False)
        for r in range(WORLD)
    ]


def load_weights(model: nn.Module, weights) -> nn.Module:
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(w)
    return model


def _context(model, record, seed, union):
    """What a single process measures with: the plain model at the recorded weights, the union."""
    load_weights(model, record["weights"])
    params = list(model.parameters())
    loss = lambda b: F.cross_entropy(model(b[0]), b[1])  # noqa: E731
    return MeasureContext(model, union, loss, params=params, seed=seed, step=record["step"])


def share(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the data for a sharded operator by hand: two batches of 7."""
    mine = dataset()[rank * 21 : rank * 21 + 21]
    return [tuple(t[i : i + 7] for t in mine) for i in (0, 7)]


def engine(op, top_k: int):
    """The record of the engine on a sharded operator (its whole weights, batches, top
    eigenvalues and a 6-step Lanczos basis from ``top_k`` vectors) and its top eigenpairs."""
    top = top_eigenvalues(op, top_k, tol=1e-6, seed=1)
    run = lanczos(op, space_of(op).draw(gaussian, (top_k, op.dim), make_generator(2)), 6,
                  generator=make_generator(3))  # fmt: skip
    record = {
        "weights": whole_params(op.module),
        "batches": op.batches,
        "top": top.eigenvalues,
        "basis": (tuple(run.basis.shape), run.alphas),
    }
    return record, top


def save_shards(out: str, rank: int, plain: nn.Module, watched: nn.Module) -> None:
    """This rank's parts of the weights after a fit without and with the monitors."""
    shards = {"plain": flat_parameters(plain).get(), "watched": flat_parameters(watched).get()}
    torch.save(shards, os.path.join(out, f"shards-{rank}.pt"))


def leave() -> None:
    """End a spawned rank once every rank has written its records: a barrier, then ``os._exit``.

    A rank that returned let the interpreter tear the gloo group down, and one run in about six
    of the whole suite aborted a rank there (SIGABRT, "terminate called without an active
    exception") after its records were written. Exiting without teardown, after every rank is
    past its last collective, leaves nothing to abort; the exit status is still 0."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_bit_identical(out: str) -> list[int]:
    """Training is bit-identical with and without the monitors; returns each rank's part size."""
    sizes = []
    for r in range(WORLD):
        shards = torch.load(os.path.join(out, f"shards-{r}.pt"))
        assert torch.equal(shards["plain"], shards["watched"])
        sizes.append(shards["plain"].numel())
    return sizes


def check_hessian(out, min_abs: float = 1e-6, blocks: dict | None = None) -> dict[str, float]:
    """The logged eigenvalues and trace against the float64 dense oracle of the unsharded model
    on the union of batches (and the top eigenvalue of each of the ``blocks``, name: slice of
    the whole vector); returns the numbers compared."""
    rec = records(out, "RecordingHessian", 0)
    union = [tuple(t.double() if t.is_floating_point() else t for t in b)
             for r in rec for b in r["batches"]]  # fmt: skip
    assert sorted(len(b[1]) for b in union) == [5, 5, 8, 8, 8, 8]
    model = load_weights(plain_net(), [w.double() for w in rec[0]["weights"]])
    H = dense_hessian(lambda b: F.cross_entropy(model(b[0]), b[1]), model, union)
    eigs = torch.linalg.eigvalsh(H)
    m = rec[0]["metrics"]
    top, second = float(eigs[-1]), float(eigs[-2])
    error = abs(m["hessian/eigenvalue_1"] - top)
    assert error <= m["hessian/fd_error"] and error <= 2e-3 * abs(top)
    assert m["hessian/eigenvalue_2"] == pytest.approx(second, rel=2e-3)
    assert m["hessian/min_eigenvalue"] == pytest.approx(float(eigs[0]), rel=2e-3, abs=min_abs)
    z = (m["hessian/trace"] - float(H.trace())) / m["hessian/trace_stderr"]
    assert abs(z) <= 4
    for name, part in (blocks or {}).items():
        block = float(torch.linalg.eigvalsh(H[part, part])[-1])
        assert m[f"hessian/{name}/eigenvalue_1"] == pytest.approx(block, rel=1e-6), name
    return {"top": top, "error": error, "fd_error": m["hessian/fd_error"], "trace_z": z,
            "fd_step": m["hessian/fd_step"]}  # fmt: skip


def check_sharpness(out, dtype=torch.float64, rel=1e-9) -> None:
    """The same measures on one process, on the union, with the same directions."""
    rec = records(out, "RecordingSharpness", 0)
    union = [b for r in rec for b in r["batches"]]
    ctx = _context(PlainModule(dtype), rec[0], SHARPNESS["seed"], union)
    single = SharpnessMonitor(**SHARPNESS).measure(ctx)
    for key, value in single.items():
        if key.startswith("sharpness/num_"):  # passes over each rank's own batches
            assert rec[0]["metrics"][key] == value / WORLD
            continue
        for r in range(WORLD):
            assert rec[r]["metrics"][key] == pytest.approx(value, rel=rel, abs=1e-12), key


def check_trajectory(out, dtype=torch.float64, rel=1e-9) -> None:
    """The measurements at steps 0, 2, 4 and the fit-end picture, replayed on one process from
    the same weights."""
    single = TrajectoryMonitor(**TRAJECTORY)
    model = PlainModule(dtype)
    index = 0
    while os.path.exists(os.path.join(out, f"RecordingTrajectory-{index}-0.pt")):
        rec = records(out, "RecordingTrajectory", index)
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
                assert got == pytest.approx(value, rel=rel, abs=1e-12), (index, key)
        for key, value in single.last_picture.items():
            if isinstance(value, torch.Tensor):
                assert torch.allclose(rec[0]["picture"][key], value, rtol=rel), (index, key)
        index += 1
    assert index == 4 and rec[0]["final"] and "trajectory/pca_explained_variance" in expected


def check_noise(out, rel=1e-9, local=False) -> None:
    """The small batches: the micro-batches of both ranks together (FSDP2: their mean over the
    ranks), or with ``local`` each rank's own (FSDP (v1), as DDP)."""
    steps = [torch.load(os.path.join(out, f"noise-{r}.pt"), weights_only=False) for r in range(2)]
    measured = [s for s in steps[0] if steps[0][s]["noise"]]
    # steps 1 and 3 close a short accumulation window: one pass, one small batch under FSDP2
    assert measured == ([0, 1, 2, 3] if local else [0, 2])
    model = plain_net()
    for s in measured:
        load_weights(model, [w.double() for w in steps[0][s]["weights"]])
        micro, sizes = [], []
        for j in range(len(steps[0][s]["batches"])):
            batches = [steps[r][s]["batches"][j] for r in range(WORLD)]
            grads = [flat_grad(F.cross_entropy(model(x.double()), y), list(model.parameters()))
                     for x, y in batches]  # fmt: skip
            sizes += [len(y) for _, y in batches] if local else [len(batches[0][1]) * WORLD]
            micro += grads if local else [sum(grads) / WORLD]  # FSDP2's mean over the ranks
        est = micro_batch_estimates(
            sum(float(g.square().sum()) for g in micro),
            sum(1 / b for b in sizes),
            len(micro),
            float((sum(micro) / len(micro)).square().sum()),
        )
        for r in range(WORLD):
            got = steps[r][s]["noise"]
            assert got["noise/grad_norm_sq"] == pytest.approx(est.grad_norm_sq, rel=rel)
            assert got["noise/trace_covariance"] == pytest.approx(est.trace_covariance, rel=rel)
