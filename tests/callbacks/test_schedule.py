import pickle

import pytest

from lightning_landscape.callbacks.schedule import Schedule


def test_epochs_sorted_unique_and_due():
    s = Schedule(epochs=[5, 0, 5, 10])
    assert s.epochs == (0, 5, 10)
    assert [e for e in range(12) if s.due_epoch(e)] == [0, 5, 10]
    assert not s.by_step
    assert s.label(5, 123) == 5


def test_every_n_epochs_includes_start():
    s = Schedule(every_n_epochs=3)
    assert [e for e in range(10) if s.due(e, 0)] == [0, 3, 6, 9]


def test_every_n_steps():
    s = Schedule(every_n_steps=4)
    assert s.by_step
    assert [k for k in range(13) if s.due(0, k)] == [0, 4, 8, 12]
    assert s.label(3, 8) == 8


def test_numpy_integers_are_ints():
    """`epochs=np.arange(0, 20, 5)` and `every_n_epochs=np.int64(2)` were refused (TypeError);
    they are stored as ints (the schedule is pickled into checkpoints)."""
    import numpy as np

    from lightning_landscape._core.checks import check_positive_values

    s = Schedule(epochs=np.arange(0, 20, 5))
    assert s.epochs == (0, 5, 10, 15) and all(type(e) is int for e in s.epochs)
    assert type(Schedule(every_n_epochs=np.int64(2)).every_n_epochs) is int
    assert check_positive_values("rho", np.array([0.05, 0.1])) == (0.05, 0.1)


def test_picklable():
    s = Schedule(epochs=[1, 2])
    t = pickle.loads(pickle.dumps(s))
    assert t == s and t.due_epoch(2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one"),
        ({"epochs": [1], "every_n_epochs": 2}, ValueError, "exactly one"),
        ({"epochs": 3}, TypeError, "`epochs` must be an iterable"),
        ({"epochs": [1.5]}, TypeError, "`epochs` must hold ints"),
        ({"epochs": [-1]}, ValueError, "non-negative"),
        ({"epochs": []}, ValueError, "empty"),
        ({"every_n_epochs": 0}, ValueError, "`every_n_epochs` must be a positive int"),
        ({"every_n_steps": True}, TypeError, "`every_n_steps` must be a positive int"),
    ],
)
def test_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Schedule(**kwargs)
