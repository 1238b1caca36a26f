"""Run an example's ``main`` in-process (the examples folder is not a package)."""

import importlib
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, argv: list[str]) -> Any:
    """``examples/<name>.py``'s ``main(argv)``."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name).main(argv)
    finally:
        sys.path.remove(str(EXAMPLES))
