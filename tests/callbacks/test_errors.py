"""One exception type for every setup refusal of the callbacks."""

import math
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_landscape import EntropySGDCallback, HessianMonitor
from lightning_landscape.callbacks import SetupError
from lightning_landscape.callbacks.base import refuse_sharded

from ._helpers import Classifier, make_trainer, random_classes


class FSDPStrategy:  # the name and the options are read
    def __init__(self, **options):
        self.__dict__.update(options)


def test_setup_error_is_both_a_misconfiguration_and_a_value_error():
    assert issubclass(SetupError, MisconfigurationException)
    assert issubclass(SetupError, ValueError)


def test_every_setup_refusal_raises_setup_error():
    trainer = SimpleNamespace(strategy=FSDPStrategy(), optimizers=[])
    with pytest.raises(SetupError, match="Owner does not support the FSDPStrategy strategy: why"):
        refuse_sharded(trainer, "Owner", "why")  # without sharded support
    with pytest.raises(SetupError, match="Owner cannot measure under this FSDPStrategy"):
        offload = SimpleNamespace(offload_params=True)
        refuse_sharded(SimpleNamespace(strategy=FSDPStrategy(cpu_offload=offload)), "Owner", "why",
                       sharded=True)  # fmt: skip

    manual = SimpleNamespace(automatic_optimization=False)
    with pytest.raises(SetupError, match="uses manual optimization"):
        HessianMonitor().setup(SimpleNamespace(strategy=object()), manual, "fit")

    module = torch.nn.Linear(2, 1)
    module.automatic_optimization = True
    with pytest.raises(SetupError, match="exceeds the 3 trainable parameters"):
        HessianMonitor(top_k=4).setup(SimpleNamespace(strategy=object()), module, "fit")

    sgd = torch.optim.SGD(module.parameters(), lr=0.1)
    with pytest.raises(SetupError, match="found no EntropySGD among"):
        EntropySGDCallback().on_fit_start(SimpleNamespace(optimizers=[sgd]), module)


def test_two_monitors_with_one_state_key_are_refused_at_setup(tmp_path):
    """Lightning refuses equal state_keys among the Trainer's own callbacks when the Trainer is
    built, before any hook of ours; those a module's configure_callbacks returns, or ones added
    to ``trainer.callbacks`` later, only reach the monitors' setup."""
    twins = lambda: [HessianMonitor(num_batches=1), HessianMonitor(num_batches=1, top_k=2)]  # noqa: E731
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        make_trainer(tmp_path, twins())

    class Twins(Classifier):
        def configure_callbacks(self):
            return twins()

    loader = DataLoader(random_classes(), batch_size=8)
    message = r"Two HessianMonitors with the prefix 'hessian' have the same state_key .*`prefix`"
    with pytest.raises(SetupError, match=message):
        make_trainer(tmp_path, max_epochs=1).fit(Twins(), loader)
    trainer = make_trainer(tmp_path, [HessianMonitor(num_batches=1)], max_epochs=1)
    trainer.callbacks.append(HessianMonitor(num_batches=1, top_k=2))
    with pytest.raises(SetupError, match=message):
        trainer.fit(Classifier(), loader)

    class Apart(Classifier):  # distinct prefixes: both measured, each under its own keys
        def configure_callbacks(self):
            return [
                HessianMonitor(epochs=[0], trace=False, top_k=k, prefix=f"h{k}") for k in (1, 2)
            ]

    trainer = make_trainer(tmp_path, max_epochs=1, max_steps=1, logger=False)
    trainer.fit(Apart(), loader)
    rows = {cb.prefix: cb.history[0] for cb in trainer.callbacks if isinstance(cb, HessianMonitor)}
    assert "h1/eigenvalue_1" in rows["h1"] and "h2/eigenvalue_2" in rows["h2"]


class MeasuredBadly(Classifier):
    """A training_step that fails only on the monitor's calls (on a batch it cannot read)."""

    def training_step(self, batch, batch_idx):
        if self.landscape_measuring:
            raise KeyError("input_ids")
        return super().training_step(batch, batch_idx)


def test_any_failure_of_a_measurement_is_nan_and_one_warning(tmp_path):
    """A KeyError (or AttributeError, TypeError) from training_step on the fixed batches
    ended the fit: only RuntimeError, ValueError and FloatingPointError were caught."""
    mon = HessianMonitor(epochs=[0, 1, 2], num_batches=1, trace=False)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="failed \\(KeyError: 'input_ids'\\)") as caught:
        make_trainer(tmp_path, [mon]).fit(MeasuredBadly(), DataLoader(random_classes(), 8))
    assert len([w for w in caught if "HessianMonitor" in str(w.message)]) == 1
    assert len(mon.history) == 3 and all(math.isnan(h["hessian/eigenvalue_1"]) for h in mon.history)
