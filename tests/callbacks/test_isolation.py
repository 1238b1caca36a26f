"""The save-and-restore guard on its own (no Trainer): whatever a measurement does to the module,
parameters, gradients, buffers, train/eval flags, RNG, ``self.log`` and the marker come back."""

import dataclasses
from collections import namedtuple

import pytest
import torch

from lightning_landscape.callbacks._isolation import is_measuring, measuring, module_loss
from lightning_landscape.callbacks._precision import cast_batch, measurement_dtype
from lightning_landscape.callbacks._side_effects import (
    changed_attributes,
    plain_attributes,
    put_back,
)

from ._helpers import Classifier, random_classes


def _state(model):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
        [m.training for m in model.modules()],
    )


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_everything_touched_inside_is_restored(mode):
    model = Classifier(bn=True, dropout=0.5)
    model.train()
    model.net[2].eval()  # a mixed pattern of flags
    model.net[0].weight.grad = torch.ones_like(model.net[0].weight)
    before = _state(model)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="inside"), measuring(model, mode):
        assert is_measuring(model) and model.landscape_measuring
        # train mode is the training's own flags (a submodule it keeps in eval mode stays so)
        assert model.training == (mode == "train") and not model.net[2].training
        model.log("x", 1.0)  # silenced: no trainer needed
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        model.net[0].weight.grad = None
        model.net(torch.randn(4, 6, dtype=torch.float64))  # BatchNorm statistics move in train
        torch.rand(3)
        raise RuntimeError("inside")
    after = _state(model)
    for a, b in zip(before[:3], after[:3], strict=True):
        assert all(x is None and y is None or torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert before[3] == after[3]
    assert torch.equal(torch.get_rng_state(), rng)
    assert not is_measuring(model) and "landscape_measuring" not in model.__dict__
    assert "log" not in model.__dict__  # the class's own log is back


def test_buffers_come_back_by_owner_and_name():
    """What observers and running averages do to buffers in a forward: resize one in place
    (per-channel quantization ranges start empty), rebind a name to a new tensor, create one;
    the same tensors, sizes and values come back, and the created one goes."""
    model = Classifier(bn=True)
    bn = model.net[1]
    model.register_buffer("ranges", torch.tensor([]))
    model.register_buffer("unset", None)
    mean, ranges = bn.running_mean, model.ranges
    before = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(RuntimeError, match="inside"), measuring(model, "train"):
        model.ranges.resize_(3).copy_(torch.arange(3.0))
        bn.running_mean = bn.running_mean + 1.0  # rebound
        model.register_buffer("cache", torch.ones(2), persistent=False)
        model.unset = torch.zeros(1)
        raise RuntimeError("inside")
    assert bn.running_mean is mean and model.ranges is ranges
    assert model.unset is None and "cache" not in dict(model.named_buffers())
    assert "cache" not in model.state_dict() and not hasattr(model, "cache")
    after = dict(model.named_buffers())
    assert list(after) == list(before)
    assert all(torch.equal(after[n], b) for n, b in before.items())


def test_frozen_parameters_and_buffers_are_held_between_the_calls_of_a_measurement():
    """Whatever a call did to a frozen parameter or a buffer (rebinding its slot, reassigning
    ``.data``, an in-place update) is undone before the next call; trainable parameters are
    the measurement's to move."""
    model = Classifier()
    model.register_buffer("center", torch.zeros(3))
    frozen, trainable, center = model.net[0].weight, model.net[3].weight, model.center
    frozen.requires_grad_(False)
    before, storage = frozen.detach().clone(), frozen.data_ptr()
    batches = [random_classes()[:4]]
    calls = []

    def loss_fn(module, batch):
        held = torch.equal(module.net[0].weight, before) and module.net[0].weight is frozen
        calls.append(held and not module.center.any())  # a buffer: held by a fresh copy
        with torch.no_grad():
            module.net[0].weight.data = module.net[0].weight.data + 1.0
            module.net[0].bias.add_(1.0)  # trainable: left alone
            module.net[0].weight.lerp_(torch.zeros_like(before), 0.5)
            module.center.add_(1.0)
        module.net[0].weight = torch.nn.Parameter(torch.zeros_like(before), requires_grad=False)
        module.center = torch.ones(3)
        return module(batch[0]).sum()

    with measuring(model) as hold:
        loss = module_loss(model, batches, loss_fn, hold)
        bias = model.net[0].bias.detach().clone()
        for _ in range(3):
            loss(batches[0])
        assert torch.equal(model.net[0].bias, bias + 3.0) and trainable.requires_grad
        # what the measurement itself moves between calls (a trajectory's point: parameters
        # frozen since a snapshot) is what the next calls see
        with torch.no_grad():
            frozen.copy_(before + 2.0)
        before.add_(2.0)
        loss(batches[0])
        loss(batches[0])
    assert calls == [True] * 5
    assert model.net[0].weight is frozen and torch.equal(frozen, before - 2.0)
    assert frozen.data_ptr() == storage  # its own storage back (the hold gave it copies)
    assert model.center is center and not center.any()


def test_the_hold_makes_no_tensor_inside_a_torch_func_transform():
    """A copy made inside ``torch.func.grad`` belongs to the transform: put in a buffer's slot,
    it outlived it (and writes into captured tensors are refused there): the hold does nothing
    inside, and the call sees what the last call outside left."""
    model = Classifier()
    model.register_buffer("center", torch.ones(8, dtype=torch.float64))
    x = random_classes()[:4][0]

    def loss_fn(module, batch):
        return (module.net[0](batch) * module.center).sum()

    with measuring(model) as hold:
        loss = module_loss(model, [x], loss_fn, hold)
        loss(x)
        torch.func.grad(lambda inputs: loss(inputs))(x)
        assert not torch._C._functorch.is_functorch_wrapped_tensor(model.center)
        loss(x)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(model.center)


def test_a_half_buffer_stays_upcast_from_call_to_call():
    """The hold's copies of a bfloat16 buffer were taken before the measurement's upcast: from
    the second call on, the buffer was bfloat16 again (a different function)."""
    model = Classifier()
    model.register_buffer("scale", torch.full((3,), 1.1, dtype=torch.bfloat16))

    def loss_fn(module, batch):
        out = (module(batch[0]) * module.scale).sum()
        with torch.no_grad():
            module.scale.mul_(0.5)
        return out

    batch = random_classes()[:4]
    with measuring(model) as hold:
        loss = module_loss(model, [batch], loss_fn, hold)
        values = [float(loss(batch)) for _ in range(3)]
        assert model.scale.dtype == torch.float32
    assert values[0] == values[1] == values[2]
    assert model.scale.dtype == torch.bfloat16
    assert torch.equal(model.scale, torch.full((3,), 1.1, dtype=torch.bfloat16))


def test_half_precision_parameters_are_measured_in_float32():
    model = Classifier(dtype=torch.bfloat16)
    assert measurement_dtype(model) == torch.float32
    with measuring(model):
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    Pair = namedtuple("Pair", "x y")
    batch = {
        "a": [torch.ones(2, dtype=torch.bfloat16), torch.arange(2)],
        "b": Pair(torch.ones(1), 3),
    }
    cast = cast_batch(batch, torch.float64)
    assert cast["a"][0].dtype == torch.float64 and cast["a"][1].dtype == torch.int64
    assert isinstance(cast["b"], Pair) and cast["b"].x.dtype == torch.float64 and cast["b"].y == 3

    @dataclasses.dataclass
    class Batch:
        x: torch.Tensor
        y: torch.Tensor

    cast = cast_batch(Batch(torch.ones(2, dtype=torch.bfloat16), torch.arange(2)), torch.float32)
    assert isinstance(cast, Batch) and cast.x.dtype == torch.float32 and cast.y.dtype == torch.int64


def test_module_loss_is_training_step_or_the_users_loss():
    model = Classifier()
    data = random_classes(n=8)
    batches = [(data.tensors[0][:4], data.tensors[1][:4]), (data.tensors[0][4:], data.tensors[1][4:])]  # fmt: skip
    with measuring(model):  # training_step logs: silenced
        loss = module_loss(model, batches)
        assert loss(batches[1]).shape == ()
        assert float(loss(batches[1])) == pytest.approx(float(model.training_step(batches[1], 1)))
    mine = module_loss(model, batches, lambda m, b: m(b[0]).sum())
    assert float(mine(batches[0])) == pytest.approx(float(model(batches[0][0]).sum()))
    model.training_step = lambda batch, idx: {"loss": torch.ones(2)}
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        module_loss(model, batches)(batches[0])


def test_changed_plain_attributes_are_named():
    model = Classifier()
    model.outputs, model.count, model._private = [], 0, []
    before = plain_attributes(model)
    model.outputs.append(1)
    model.count += 2
    model._private.append(1)
    model.extra = "new"
    after = plain_attributes(model)
    assert changed_attributes(before, after) == [
        "outputs (length 0 → length 1)",
        "count (0 → 2)",
        "extra (absent → 'new')",
    ]
    outputs = model.outputs
    model.seen = {"a"}
    before = plain_attributes(model)
    outputs.append(2)
    model.count, model.seen, model.flag = 5, {"b"}, True
    model.seen.add("c")
    put_back(model, before, plain_attributes(model))
    assert model.outputs is outputs and outputs == [1]  # cut back, the same list
    assert model.count == 2 and model.seen == {"a"} and not hasattr(model, "flag")
    model.best, model.counts = float("nan"), 0
    before = plain_attributes(model)
    model.counts = model.counts + torch.ones(3)  # a number became a tensor: no crash
    after = plain_attributes(model)
    assert changed_attributes(before, after) == ["counts (0 → a tensor)"]  # NaN is NaN
    put_back(model, before, after)
    assert model.counts == 0


class SelfCast(torch.nn.Module):
    """Enters autocast itself, as a context (bfloat16) and as a decorator (the same instance
    every call, as ``@torch.autocast(...)`` on a method is)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a = self.lin(x)
        return a, self.decorated(x)

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def decorated(self, x):
        return self.lin(x)


def _cpu_autocast() -> bool:
    if torch.__version__ < "2.4":  # torch 2.1 has no device argument
        return torch.is_autocast_cpu_enabled()
    return torch.is_autocast_enabled("cpu")


def test_the_modules_own_autocast_is_off_inside_and_back_after():
    model, x = SelfCast(), torch.randn(2, 4)
    assert [y.dtype for y in model(x)] == [torch.bfloat16] * 2
    with measuring(model):
        a, b = model(x)
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, model.lin(x), rtol=0, atol=0)
        assert not _cpu_autocast()  # its exit put back what was before it
    assert [y.dtype for y in model(x)] == [torch.bfloat16] * 2
    assert not _cpu_autocast()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_spectral_norms_take_no_power_iteration_step_inside():
    """In train mode every forward would update the singular vectors in place: another function
    at every product. Inside, both APIs keep them; the flags come back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(4, 5)),
        torch.nn.utils.spectral_norm(torch.nn.Linear(5, 3)),
    )
    x = torch.randn(2, 4)
    vectors = lambda: [b.clone() for n, b in model.named_buffers() if "_u" in n or "_v" in n]  # noqa: E731
    before = vectors()
    with measuring(model, "train"):
        first = model(x)
        assert torch.equal(model(x), first)
        assert all(torch.equal(a, b) for a, b in zip(vectors(), before, strict=True))
    assert all(m.training for m in model.modules())
    model(x)
    assert not any(torch.equal(a, b) for a, b in zip(vectors(), before, strict=True))


def test_torchmetrics_states_are_put_back():
    """A metric updated in the forward (as ``self.train_acc(preds, y)`` in a training_step)
    keeps the training's own state: before, measurements added their calls to the epoch's
    logged accuracy."""
    import torchmetrics

    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)
            self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)
            self.both = torchmetrics.MetricCollection([torchmetrics.MeanMetric()])
            self.cat = torchmetrics.CatMetric()
            self.running = torchmetrics.RunningMean(window=3)  # its window position too
            self.extremes = torchmetrics.wrappers.MinMaxMetric(torchmetrics.MeanMetric())

        def forward(self, x, y):
            out = self.lin(x)
            self.acc(out, y)
            self.both.update(out.sum())
            self.cat.update(out[:, 0])
            self.running(out.mean())
            self.extremes(out.mean())
            return out

    model = Counting()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    model(x, y)
    model(x + 1, y)
    before = (model.acc.compute(), model.both.compute(), model.cat.compute().clone())
    more = (model.running.compute(), model.extremes.compute())
    counts = [m._update_count for m in (model.acc, model.cat, model.both["MeanMetric"])]
    with pytest.raises(RuntimeError, match="inside"), measuring(model):
        for _ in range(3):
            model(torch.randn(5, 4), torch.randint(0, 3, (5,)))
        raise RuntimeError("inside")
    assert [m._update_count for m in (model.acc, model.cat, model.both["MeanMetric"])] == counts
    assert torch.equal(model.acc.compute(), before[0])
    assert torch.equal(model.both.compute()["MeanMetric"], before[1]["MeanMetric"])
    assert torch.equal(model.cat.compute(), before[2])
    for a, b in zip((model.running.compute(), model.extremes.compute()), more, strict=True):
        assert (a == b).all() if isinstance(a, torch.Tensor) else a == b
    model(x, y)  # and they go on accumulating as in training
    assert model.acc._update_count == counts[0] + 1
