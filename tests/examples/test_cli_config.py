"""examples/config.yaml parses through LightningCLI into the package's monitors and EntropySGD."""

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module")
def cli():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from cli import main

        yield main(["--config", str(EXAMPLES / "config.yaml")], run=False)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_callbacks_are_built_from_yaml(cli):
    from lightning_landscape import (
        EntropySGDCallback,
        HessianMonitor,
        NoiseTemperatureMonitor,
        SharpnessMonitor,
        TrajectoryMonitor,
    )

    by_type = {type(cb): cb for cb in cli.trainer.callbacks}
    for cls in (
        HessianMonitor,
        NoiseTemperatureMonitor,
        SharpnessMonitor,
        TrajectoryMonitor,
        EntropySGDCallback,
    ):
        assert cls in by_type, cls.__name__
    hessian = by_type[HessianMonitor]
    assert hessian.top_k == 3 and hessian.density is True and hessian.num_batches == 4
    assert hessian.schedule.epochs == (0, 1, 3, 6)
    assert by_type[TrajectoryMonitor].schedule.every_n_epochs == 1
    assert cli.trainer.max_epochs == 6


def test_optimizer_is_entropy_sgd_from_yaml(cli):
    from lightning_landscape import EntropySGD

    optimizer = cli.model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert isinstance(optimizer, EntropySGD)
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert optimizer.param_groups[0]["momentum"] == 0.9
