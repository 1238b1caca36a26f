"""ShardedHessianOperator on FSDP2 and FSDP (v1) in this process (a gloo group of one rank: every
parameter a DTensor shard, or a view into FSDP (v1)'s ``FlatParameter``, which one rank keeps
whole (NO_SHARD); every product through FSDP's own backward) against the exact operator; the
2-rank runs with uneven shards are tests/callbacks/test_sharded.py and test_sharded_fsdp1.py."""

from __future__ import annotations

import contextlib
import importlib
import math

import pytest
import torch
import torch.distributed as dist
import torch.distributed.fsdp
import torch.nn.functional as F
from packaging.version import Version
from torch import nn

from lightning_landscape._core.fsdp import local_part
from lightning_landscape._core.random import gaussian, make_generator
from lightning_landscape._core.sharding import ShardLayout, is_fsdp2, is_sharded
from lightning_landscape._core.space import Space, space_of
from lightning_landscape.curvature import (
    HessianOperator,
    MatrixOperator,
    analyze,
    crosscheck,
    dense_hessian,
    spectral_density,
    top_eigenvalues,
    trace,
)
from lightning_landscape.curvature.sharded import ShardedHessianOperator

from . import end_process_group

# FSDP2 is public from torch 2.6 and runs on CPU from 2.7 (2.8 run; 2.6's CPU all-gather fails:
# "'Stream' object has no attribute 'record_event'", which 2.7's source has). Torch 2.4 and 2.5,
# where ModelParallelStrategy starts, keep it private and need CUDA streams. Without CPU forwards
# only FSDP (v1) and what needs no forward (recognising FSDP2 modules, the refusals) are tested.
FSDP2_ON_CPU = Version(torch.__version__).release >= (2, 7)
FSDP2 = torch.distributed.fsdp if hasattr(torch.distributed.fsdp, "fully_shard") else None
PUBLIC_DTENSOR = Version(torch.__version__).release >= (2, 5)
DT = importlib.import_module(f"torch.distributed.{'tensor' if PUBLIC_DTENSOR else '_tensor'}")
if FSDP2 is None and Version(torch.__version__).release >= (2, 4):
    with contextlib.suppress(ImportError):
        FSDP2 = importlib.import_module("torch.distributed._composable.fsdp")
pytestmark = pytest.mark.skipif(
    Version(torch.__version__).release < (2, 2), reason="FSDP (v1) on CPU fails in torch 2.1"
)
needs_fsdp2 = pytest.mark.skipif(FSDP2 is None, reason="FSDP2 starts at torch 2.4")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from torch.distributed.device_mesh import init_device_mesh

    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        end_process_group()


def make_net(bn: bool = False, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5)] + ([nn.BatchNorm1d(5)] if bn else [])
    layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


@pytest.fixture(params=["fsdp2", "fsdp1"])
def kind(request):
    return request.param


def sharded(mesh, net: nn.Module, children: bool = True, kind: str = "fsdp2") -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if kind == "fsdp1":  # the whole module wrapped, each Linear a unit of its own
        policy = ModuleWrapPolicy({nn.Linear}) if children else None
        return FullyShardedDataParallel(
            net, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy,
            sharding_strategy=ShardingStrategy.NO_SHARD,  # what FSDP picks on one rank anyway
        )  # fmt: skip

    if not FSDP2_ON_CPU:
        pytest.skip("FSDP2's forward on CPU needs torch 2.7 (2.8 checked; 2.6 fails)")
    for layer in net if children else ():
        if isinstance(layer, nn.Linear):
            FSDP2.fully_shard(layer, mesh=mesh)
    return FSDP2.fully_shard(net, mesh=mesh)


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in (6, 3, 5)
    ]


def loss_of(model):
    return lambda b: F.cross_entropy(model(b[0]), b[1])


def pair(mesh, kind="fsdp2", **kw):
    """(sharded operator, exact operator) of the same network and batches."""
    ref = make_net(**kw)
    model = sharded(mesh, make_net(**kw), kind=kind)
    return (
        ShardedHessianOperator(loss_of(model), model, batches(), seed=3),
        HessianOperator(loss_of(ref), ref, batches(), seed=3),
    )


def test_products_equal_exact_ones_and_error_estimate_covers_them(mesh, kind):
    op, exact = pair(mesh, kind)
    assert is_sharded(op.module) and not is_sharded(exact.module)
    assert is_fsdp2(op.module) == (kind == "fsdp2")
    assert op.dim == exact.dim == 4 * 5 + 5 + 5 * 3 + 3 and op.local_dim == op.dim
    V = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(op @ V, exact @ V, rtol=0, atol=1e-8)
    assert op.num_matvecs == 3 and op.num_gradients == 6
    H = dense_hessian(loss_of(exact.module), exact.module, batches())
    eigs, vecs = torch.linalg.eigh(H)
    coarse = ShardedHessianOperator(op.loss_fn, op.module, op.batches, step=1e-2)
    x = vecs[:, -1]
    rho = float(x @ (coarse @ x))
    error = coarse.finite_difference_error(x, rho)
    assert abs(rho - float(eigs[-1])) <= error < 1e-3 * float(eigs[-1])


def test_nothing_is_disturbed(mesh, kind):
    op, _ = pair(mesh, kind, bn=True, dropout=0.3)
    model = op.module.train()
    params = list(model.parameters())
    storage = [local_part(p).data_ptr() for p in params]
    before = [local_part(p).clone() for p in params]
    sentinels = [torch.full_like(p, 7.0) for p in params]
    for p, s in zip(params, sentinels, strict=True):
        p.grad = s
    stats = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    first = op @ v
    assert torch.equal(op @ v, first)  # the same dropout masks at every product
    op.gradient()
    op.finite_difference_error(v / v.norm(), 0.0)
    for p, b, s, ptr in zip(params, before, sentinels, storage, strict=True):
        assert torch.equal(local_part(p), b) and p.grad is s
        assert local_part(p).data_ptr() == ptr  # FSDP's sharded storage, resharded
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats, strict=True))
    assert torch.equal(torch.get_rng_state(), rng) and model.training


def semi_gradient(model, stop: bool = True):
    """A semi-gradient TD-style loss: the target, the output at another input, is detached (a
    gradient that is not a scalar's; with ``stop=False`` the plain loss)."""

    def loss(b):
        target = model(0.8 * b[0] + 0.1)
        return ((model(b[0]) - (target.detach() if stop else target)) ** 2).mean()

    return loss


@pytest.mark.parametrize("stop", [True, False])
def test_a_stop_gradient_loss_is_caught_on_shards_as_on_whole_vectors(mesh, kind, stop):
    """Sharded products are always finite differences, which see the Jacobian of a
    stop-gradient loss's gradient (asymmetric): the symmetry check runs on shards (eight
    gradients through FSDP) and finds what it finds on whole vectors."""
    ref, model = make_net(), sharded(mesh, make_net(), kind=kind)
    op = ShardedHessianOperator(semi_gradient(model, stop), model, batches(), seed=3)
    exact = HessianOperator(semi_gradient(ref, stop), ref, batches(), seed=3, hvp="cached")
    v = space_of(op).draw(gaussian, (1, op.dim), make_generator(0))
    found = crosscheck.nonconservative(op, v, 1e-4)
    assert op.num_gradients == 8 and op.num_matvecs == 0
    if not stop:
        assert found is None
        return
    assert found == pytest.approx(crosscheck.nonconservative(exact, v, 1e-4), rel=1e-6)
    assert found > 0.05  # autograd's Hessian, which holds the target fixed, is symmetric:
    H = dense_hessian(semi_gradient(ref), ref, batches())
    assert float((H - H.T).abs().max()) < 1e-12


def test_a_failed_symmetry_check_raises_on_shards_and_is_nan_on_whole_vectors(mesh):
    """Sharded differences are collectives that one rank cannot leave alone: an exception there
    propagates (under DDP the monitors then stop the run) instead of being answered while the
    other ranks still wait in FSDP's passes; an unsharded operator's answer is NaN."""

    def failing(model):
        calls = iter(range(100))
        return lambda b: semi_gradient(model)(b) / (next(calls) < 7)  # 1/0: inf from the 8th

    model, ref = sharded(mesh, make_net()), make_net()
    op = ShardedHessianOperator(failing(model), model, batches())
    v = space_of(op).draw(gaussian, (1, op.dim), make_generator(0))
    assert math.isnan(crosscheck.nonconservative(op, v, 1e-4))  # non-finite: NaN on every rank

    def raising(model):
        calls = iter(range(100))
        return lambda b: semi_gradient(model)(b) if next(calls) < 7 else 1 / 0

    op = ShardedHessianOperator(raising(model), model, batches())
    with pytest.raises(ZeroDivisionError):
        crosscheck.nonconservative(op, v, 1e-4)
    plain = HessianOperator(raising(ref), ref, batches(), hvp="finite_difference")
    assert math.isnan(crosscheck.nonconservative(plain, v, 1e-4))
    with pytest.raises(ValueError, match="one row"):
        crosscheck.nonconservative(plain, torch.cat([v, v]), 1e-4)


def test_a_block_of_parameters_equals_the_exact_block(mesh, kind):
    ref = make_net()
    model = sharded(mesh, make_net(), kind=kind)
    block = list(model[0].parameters())
    op = ShardedHessianOperator(loss_of(model), model, batches(), params=block)
    exact = HessianOperator(loss_of(ref), list(ref[0].parameters()), batches())
    assert op.dim == exact.dim == 25
    v = torch.randn(25, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(op @ v, exact @ v, rtol=0, atol=1e-8)


def test_root_parameters_left_unsharded_by_a_forward_are_not_reused(mesh):
    """FSDP2 keeps the root's parameters unsharded after a forward; a product must neither
    compute with stale gathered values nor leave perturbed ones for the next forward."""
    ref = make_net()
    model = sharded(mesh, make_net(), children=False)  # one group: the root's
    x = batches()[0][0]
    before = model(x).detach()  # leaves the root unsharded
    op = ShardedHessianOperator(loss_of(model), model, batches())
    exact = HessianOperator(loss_of(ref), ref, batches())
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(op @ v, exact @ v, rtol=0, atol=1e-8)
    assert torch.equal(model(x).detach(), before)


@needs_fsdp2
def test_half_precision_fsdp2_policies_are_refused_at_the_measurement(mesh):
    """FSDP2's MixedPrecisionPolicy is set in configure_model, after the callbacks' setup: the
    finite-difference monitors refuse a float16/bfloat16 param_dtype or reduce_dtype at their
    first measurement (check_sharded), as FSDPStrategy's at setup; float32 policies pass."""
    from lightning_landscape._core.fsdp import fsdp2_policies
    from lightning_landscape.callbacks._errors import SetupError
    from lightning_landscape.callbacks._sharded import check_sharded, sharded_refusal

    def policed(**policy):
        net = make_net().float()
        FSDP2.fully_shard(net[0], mesh=mesh, mp_policy=FSDP2.MixedPrecisionPolicy(**policy))
        return FSDP2.fully_shard(net, mesh=mesh)

    for policy, match in (
        ({"param_dtype": torch.bfloat16}, r"param_dtype=torch\.bfloat16\) drowns"),
        ({"reduce_dtype": torch.float16}, r"\(reduce_dtype=torch\.float16\) drowns"),
    ):
        model = policed(**policy)
        assert FSDP2.MixedPrecisionPolicy(**policy) in fsdp2_policies(model)
        with pytest.raises(ValueError, match="HessianMonitor cannot measure under FSDP2's "
                           f"MixedPrecisionPolicy: a half-precision .*{match}.*mp_policy"):  # fmt: skip
            check_sharded(model, "HessianMonitor", upcast=False)
        refusal = sharded_refusal(None, model, "HessianMonitor", upcast=False)
        assert isinstance(refusal, SetupError) and "MixedPrecisionPolicy" in str(refusal)
    check_sharded(policed(param_dtype=torch.float32), "HessianMonitor", upcast=False)
    check_sharded(sharded(mesh, make_net(), kind="fsdp1"), "HessianMonitor", upcast=False)
    assert sharded_refusal(None, policed(param_dtype=torch.float32), "H", upcast=False) is None


def test_algorithms_on_shards_equal_those_on_whole_vectors(mesh, kind):
    op, exact = pair(mesh, kind)
    for kind in (top_eigenvalues, lambda o, **k: top_eigenvalues(o, which="smallest", **k)):
        a, b = kind(op, tol=1e-8, seed=0), kind(exact, tol=1e-8, seed=0)
        assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-7)
        assert a.num_matvecs == b.num_matvecs
    for method in ("auto", "hutch++", "hutchinson"):
        a, b = (trace(o, num_matvecs=15, method=method, seed=4) for o in (op, exact))
        assert a.estimate == pytest.approx(b.estimate, rel=1e-7), method
        assert a.num_matvecs == b.num_matvecs
    a, b = (spectral_density(o, num_probes=2, num_steps=8, seed=1) for o in (op, exact))
    assert torch.allclose(a.nodes, b.nodes, rtol=1e-6, atol=1e-8)
    kw = {"top_k": 2, "smallest": True, "trace": True, "trace_probes": 6, "density": True}
    a, b = (analyze(o, density_steps=10, tol=1e-8, seed=2, **kw) for o in (op, exact))
    assert torch.allclose(a.top.eigenvalues, b.top.eigenvalues, rtol=1e-7)
    assert a.trace.estimate == pytest.approx(b.trace.estimate, rel=1e-7)


def test_space_of_plain_operators_is_local():
    op = MatrixOperator(torch.eye(3, dtype=torch.float64))
    space = space_of(op)
    assert type(space) is Space and space.local_dim == space.dim == 3
    x = torch.arange(6.0).reshape(2, 3)
    assert space.reduce(x) is x and torch.equal(space.norm(x), x.norm(dim=-1))
    assert not space.all_finite(torch.tensor([1.0, float("nan")]))


def test_sharded_space_orthonormalizes_and_drops_deficient_columns(mesh):
    op, _ = pair(mesh)
    g = torch.Generator().manual_seed(0)
    Y = torch.randn(op.dim, 3, dtype=torch.float64, generator=g)
    Y = torch.cat([Y, Y[:, :1] + Y[:, 1:2]], dim=1)  # rank 3
    Q = op.space.orthonormalize(Y)
    assert Q.shape == (op.dim, 3)
    assert torch.allclose(Q.T @ Q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(Q @ (Q.T @ Y), Y, atol=1e-10)


def test_layout_restricts_and_assembles(mesh):
    op, _ = pair(mesh)
    full = torch.arange(op.dim, dtype=torch.float64)
    assert torch.equal(op.layout.assemble(op.layout.restrict(full)), full)
    assert torch.equal(op.space.draw(lambda s, g, d, dev: full[None].expand(*s), (2, op.dim), None),
                       full[None].expand(2, -1))  # fmt: skip


def test_errors_name_the_argument(mesh):
    op, exact = pair(mesh)
    with pytest.raises(ValueError, match="is not sharded"):
        ShardedHessianOperator(exact.loss_fn, exact.module, batches())
    with pytest.raises(ValueError, match="is not sharded"):
        ShardLayout([torch.zeros(3, requires_grad=True)])
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    flat = FullyShardedDataParallel(
        make_net(), device_id=torch.device("cpu"), use_orig_params=False,
        sharding_strategy=ShardingStrategy.NO_SHARD,
    )  # fmt: skip
    with pytest.raises(ValueError, match="FSDP \\(v1\\) with use_orig_params=False"):
        ShardedHessianOperator(loss_of(flat), flat, batches())
    with pytest.raises(ValueError, match="`batches` is empty"):
        ShardedHessianOperator(op.loss_fn, op.module, [])
    with pytest.raises(TypeError, match="`batches` must be a sequence"):
        ShardedHessianOperator(op.loss_fn, op.module, torch.zeros(3))
    with pytest.raises(TypeError, match="`module` must be an nn.Module"):
        ShardedHessianOperator(op.loss_fn, [1], batches())
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        ShardedHessianOperator(3, op.module, batches())
    with pytest.raises(TypeError, match="`seed` must be an int"):
        ShardedHessianOperator(op.loss_fn, op.module, batches(), seed="0")
    with pytest.raises(ValueError, match="`step` must be a positive number"):
        ShardedHessianOperator(op.loss_fn, op.module, batches(), step=0.0)
    with pytest.raises(ValueError, match=r"`v` must have shape \(43,\)"):
        op.matvec(torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`V` must have shape \(43, k\)"):
        op.matmat(torch.zeros(43, dtype=torch.float64))


@needs_fsdp2
def test_parameters_fsdp2_cannot_measure_are_refused_at_the_measurement(mesh):
    """A parameter left out of ``fully_shard``, or one placed otherwise than Shard(0) (tensor
    parallelism: here Replicate), is refused by check_sharded with its name, the same verdict on
    every rank: the monitors log NaN with one warning instead of stopping the fit."""
    from lightning_landscape.callbacks._errors import SetupError
    from lightning_landscape.callbacks._sharded import check_sharded, sharded_refusal

    partial = make_net()
    FSDP2.fully_shard(partial[0], mesh=mesh)  # the last Linear stays a plain module
    with pytest.raises(ValueError, match=r"cannot measure this FSDP2 model: parameter '3\.weight' "
                       "is not sharded"):  # fmt: skip
        check_sharded(partial, "HessianMonitor", upcast=False)

    def replicate(name, module, device_mesh):
        for key, p in list(module.named_parameters(recurse=False)):
            dt = DT.distribute_tensor(p.detach(), device_mesh, [DT.Replicate()])
            module.register_parameter(key, nn.Parameter(dt))

    tp = make_net()
    DT.distribute_module(tp[3], mesh, replicate)
    FSDP2.fully_shard(tp[0], mesh=mesh)
    refusal = sharded_refusal(None, tp, "HessianMonitor", upcast=False)
    assert isinstance(refusal, SetupError)
    assert "'3.weight' has placements (Replicate(),)" in str(refusal)
    assert "not tensor parallelism or HSDP" in str(refusal)
