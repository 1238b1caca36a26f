"""The digits example through LightningCLI: monitors and optimizer configured from YAML.

python examples/cli.py fit --config examples/config.yaml
"""

from __future__ import annotations

import os
import sys

from pytorch_lightning.cli import LightningCLI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from digits import DigitsCNN, DigitsData  # noqa: E402


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(
        DigitsCNN, DigitsData, args=args, run=run, save_config_kwargs={"overwrite": True}
    )


if __name__ == "__main__":
    main()
