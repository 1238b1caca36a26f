"""One exception type for every setup refusal of the callbacks."""

from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from lightning_landscape import EntropySGDCallback, HessianMonitor
from lightning_landscape.callbacks import SetupError
from lightning_landscape.callbacks.base import refuse_sharded


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
