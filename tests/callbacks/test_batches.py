"""Drawing the fixed batches on its own: the same batches at every draw, the global RNG and the
sampler's epoch untouched, worker loaders detached, clear errors; and the monitors on batches
that are not tuples (dataclasses, objects that only ``batch_size_fn`` can size)."""

import math
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning import Callback
from torch.utils.data import DataLoader

from lightning_landscape import HessianMonitor, SharpnessMonitor, TrajectoryMonitor
from lightning_landscape.callbacks._batches import draw_batches
from lightning_landscape.curvature import dense_hessian

from ._helpers import LIGHTNING_2_1, Classifier, make_trainer, random_classes


def _trainer(loader=None):
    """What draw_batches reads from a Trainer: its train dataloader, the precision plugin's input
    conversion and the batch transfer."""
    strategy = types.SimpleNamespace(batch_to_device=lambda batch, device: batch)
    precision = types.SimpleNamespace(convert_input=lambda batch: batch)
    return types.SimpleNamespace(
        train_dataloader=loader, strategy=strategy, precision_plugin=precision
    )


def test_the_same_batches_at_every_draw_and_the_rng_untouched():
    loader = DataLoader(random_classes(n=40), batch_size=8, shuffle=True)
    module = Classifier()
    state = torch.get_rng_state()
    first = draw_batches(_trainer(loader), module, 3)
    assert torch.equal(torch.get_rng_state(), state)
    again = draw_batches(_trainer(), module, 3, dataloader=loader)
    other = draw_batches(_trainer(loader), module, 3, seed=1)
    assert len(first) == 3 and all(len(b[0]) == 8 for b in first)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_a_sampler_epoch_is_restored():
    sampler = torch.utils.data.distributed.DistributedSampler(
        random_classes(n=16), num_replicas=1, rank=0, shuffle=True
    )
    sampler.set_epoch(5)
    loader = DataLoader(sampler.dataset, batch_size=4, sampler=sampler)
    draw_batches(_trainer(loader), Classifier(), 2)
    assert sampler.epoch == 5


def test_worker_loaders_are_drawn_without_their_workers():
    loader = DataLoader(random_classes(n=16), batch_size=4, num_workers=1, persistent_workers=True)
    batches = draw_batches(_trainer(loader), Classifier(), 2)
    assert len(batches) == 2 and loader._iterator is None  # the fit loop's iterator never made


class Bucketed(torch.utils.data.Sampler):
    """A batch sampler with its own generator (as bucketing samplers have)."""

    def __init__(self, n):
        self.n, self.generator = n, torch.Generator().manual_seed(7)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).tolist()
        return iter([order[i : i + 4] for i in range(0, self.n, 4)])

    def __len__(self):
        return self.n // 4


class _Counting:
    """An iterator that counts the batches it handed out."""

    def __init__(self, loader, start):
        self.inner, self.n = DataLoader.__iter__(loader), 0
        for _ in range(start):
            next(self)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.n += 1
        return batch


class StatefulLoader(DataLoader):
    """torchdata's ``StatefulDataLoader`` in miniature: ``state_dict`` is the position of the
    last iterator handed out, ``load_state_dict`` the start of the next one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last, self.resume = None, 0

    def __iter__(self):
        self.last, self.resume = _Counting(self, self.resume), 0
        return self.last

    def state_dict(self):
        return {"n": self.last.n if self.last else 0}

    def load_state_dict(self, state):
        self.resume = state["n"]


@pytest.mark.skipif(LIGHTNING_2_1, reason="Lightning 2.1 saves no dataloader state")
def test_a_stateful_loaders_saved_position_is_the_trainings(tmp_path):
    """Drawing the fixed batches from torchdata's StatefulDataLoader handed it a second
    iterator, whose position the next checkpoint saved (1 batch instead of 4): a resume
    replayed three batches and training diverged. The loader is rebuilt for the draw now."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def fit(monitors, ckpt=None, where=None):
        torch.manual_seed(0)
        model = Classifier()
        saving = [ModelCheckpoint(dirpath=where, every_n_train_steps=4, save_top_k=-1)]
        trainer = make_trainer(
            tmp_path, [*monitors, *saving], max_epochs=2, logger=False, enable_checkpointing=True
        )
        trainer.fit(model, StatefulLoader(random_classes(n=48), batch_size=8), ckpt_path=ckpt)
        return model

    whole = fit([TrajectoryMonitor(num_batches=1, every_n_steps=3)], where=tmp_path / "a")
    plain = fit([], where=tmp_path / "b")
    first = sorted((tmp_path / "a").iterdir())[0]  # at step 4
    loops = torch.load(first, weights_only=False)["loops"]["fit_loop"]["state_dict"]
    assert loops["combined_loader"] == [{"n": 4}]
    resumed = fit([TrajectoryMonitor(num_batches=1, every_n_steps=3)], ckpt=str(first))
    for a, b, c in zip(whole.parameters(), plain.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_a_stateful_iterable_that_is_no_dataloader_is_drawn_with_a_warning():
    """It cannot be rebuilt: iterated as it is, with a warning naming the remedy."""
    inner = DataLoader(random_classes(n=16), batch_size=4)

    class Stream:
        def __iter__(self):
            return iter(inner)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.warns(UserWarning, match="Stream whose position .* `dataloader=`"):
        assert len(draw_batches(_trainer(Stream()), Classifier(), 2)) == 2


def test_a_loaders_own_generators_are_untouched():
    """``DataLoader(..., generator=g)``: the draw advanced ``g`` (the sampler's shuffle and the
    loader's base seed), so the training's data order changed with a monitor; so did a batch
    sampler's own generator."""
    g = torch.Generator().manual_seed(5)
    loader = DataLoader(random_classes(n=16), batch_size=4, shuffle=True, generator=g)
    state = g.get_state()
    draw_batches(_trainer(loader), Classifier(), 2)
    assert torch.equal(g.get_state(), state)
    bucketed = DataLoader(random_classes(n=16), batch_sampler=Bucketed(16))
    state = bucketed.batch_sampler.generator.get_state()
    draw_batches(_trainer(bucketed), Classifier(), 2)
    assert torch.equal(bucketed.batch_sampler.generator.get_state(), state)


def test_a_loader_that_yields_nothing_is_an_error():
    with pytest.raises(ValueError, match="yielded no batch"):
        draw_batches(_trainer(), Classifier(), 2, dataloader=[])


class TwoSources(Classifier):
    """The classifier trained on two loaders at once (Lightning combines them: each training
    batch is ``{"a": [x, y], "b": [x, y]}``), the loss summed over both."""

    def training_step(self, batch, batch_idx):
        return sum(F.cross_entropy(self(x), y) for x, y in batch.values())

    def train_dataloader(self):
        a = DataLoader(random_classes(n=24, seed=1), batch_size=6, shuffle=True)
        return {"a": a, "b": DataLoader(random_classes(n=16, seed=2), batch_size=4, shuffle=True)}


class Seen(Callback):
    def __init__(self):
        self.first = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first.append(batch["a"][0][0].clone())


def test_several_train_loaders_give_batches_as_training_step_gets_them(tmp_path):
    """Before: the fixed batches came from the first loader alone, and a ``training_step`` that
    reads the combined batch crashed the fit (AttributeError: 'list' object has no attribute
    'values'). Now each fixed batch holds one batch of every loader, as in training (the fit's
    mode, here Lightning's default max_size_cycle), the draw leaves the training's data order
    alone, and the Hessian is the one of the summed loss on those batches."""
    mon = HessianMonitor(epochs=[0, 1], num_batches=2, top_k=1, tol=1e-10, trace=False)
    fits = []
    for callbacks in ([Seen()], [Seen(), mon]):
        torch.manual_seed(0)
        model = TwoSources()
        trainer = make_trainer(tmp_path, callbacks, max_epochs=1, logger=False)
        trainer.fit(model)
        fits.append((model, trainer, callbacks[0].first))
    (plain, _, seen), (model, trainer, watched) = fits
    assert len(seen) == 4 and all(torch.equal(a, b) for a, b in zip(seen, watched, strict=True))
    for a, b in zip(plain.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    state = torch.get_rng_state()
    fixed = draw_batches(trainer, model, 2)  # the monitor's batches: the same seed
    assert torch.equal(torch.get_rng_state(), state)
    assert [sorted(b) for b in fixed] == [["a", "b"]] * 2
    assert [len(b["a"][0]) for b in fixed] == [6, 6] and [len(b["b"][0]) for b in fixed] == [4, 4]
    model.eval()
    H = dense_hessian(lambda batch: model.training_step(batch, 0), model, fixed)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert mon.history[-1]["hessian/eigenvalue_1"] == pytest.approx(top, rel=1e-6)


@dataclass
class Pair:
    """A dataclass batch (Lightning moves these to the device field by field)."""

    x: torch.Tensor
    y: torch.Tensor


class Plain:
    """A batch neither Lightning nor the default batch size can look into."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


class AttributeClassifier(Classifier):
    """The float64 classifier of the other tests, on batches with ``x`` and ``y`` attributes."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch.x), batch.y)


def _loader(wrap=None) -> DataLoader:
    """The same 5 batches of 8, as lists ``[x, y]`` (``wrap=None``) or as ``wrap(x, y)``."""

    def collate(items):
        return wrap(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))

    return DataLoader(random_classes(), batch_size=8, collate_fn=collate if wrap else None)


def _fit(tmp_path, model_cls, loader, monitors):
    torch.manual_seed(0)  # the same initial weights in every fit
    make_trainer(tmp_path, monitors, max_epochs=1, logger=False).fit(model_cls(), loader)
    return monitors


def _hessian(**kwargs) -> HessianMonitor:
    return HessianMonitor(epochs=[0, 1], num_batches=2, trace_probes=3, **kwargs)


def test_dataclass_batches_give_the_hessian_of_tuple_batches(tmp_path):
    """The largest eigenvalue at epochs 0 and 1 on dataclass batches, cut into pieces of at most
    3 samples, equals the one on the same batches as lists, whole."""
    (ref,) = _fit(tmp_path, Classifier, _loader(), [_hessian(micro_batch_size=None)])
    (mon,) = _fit(tmp_path, AttributeClassifier, _loader(Pair), [_hessian(micro_batch_size=3)])
    want = [row["hessian/eigenvalue_1"] for row in ref.history]
    got = [row["hessian/eigenvalue_1"] for row in mon.history]
    assert len(got) == 2 and all(math.isfinite(v) for v in want)
    assert got == pytest.approx(want, rel=0, abs=1e-6)


def test_batch_size_fn_sizes_batches_the_default_cannot_read(tmp_path):
    with pytest.warns(UserWarning, match="cannot infer the batch size.*pass `batch_size_fn`"):
        (blind,) = _fit(tmp_path, AttributeClassifier, _loader(Plain), [_hessian()])
    assert math.isnan(blind.history[-1]["hessian/eigenvalue_1"])

    size = lambda batch: len(batch.x)  # noqa: E731
    monitors = _fit(
        tmp_path,
        AttributeClassifier,
        _loader(Plain),
        [
            _hessian(batch_size_fn=size),
            SharpnessMonitor(
                epochs=[1], kinds=["sam"], ascent_steps=3, polish_steps=1, batch_size_fn=size
            ),
            TrajectoryMonitor(num_points=3, grid_size=2, slices=False, batch_size_fn=size),
        ],
    )
    (ref,) = _fit(tmp_path, Classifier, _loader(), [_hessian()])
    rows = [m.history[-1] for m in monitors]
    assert all(math.isfinite(v) for row in rows for v in row.values()), rows
    assert rows[0]["hessian/eigenvalue_1"] == pytest.approx(
        ref.history[-1]["hessian/eigenvalue_1"], rel=0, abs=1e-6
    )


@pytest.mark.parametrize("cls", [HessianMonitor, SharpnessMonitor, TrajectoryMonitor])
def test_batch_size_fn_must_be_callable(cls):
    with pytest.raises(TypeError, match="`batch_size_fn` must be callable or None, got int"):
        cls(batch_size_fn=4)
