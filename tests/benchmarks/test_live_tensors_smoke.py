"""benchmarks/live_tensors.py on a tiny GPT: the monitor's measurement inside the counting
mode, its report of the storages alive at the peak; the monitor class is put back after."""

import importlib
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.skipif(torch.__version__ < "2.2", reason="torch 2.1 segfaults (at exit, or on detach) "
                    "on weak references to storages")  # fmt: skip
def test_tiny_gpt_report(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    live = importlib.import_module("live_tensors")
    import lightning_landscape.callbacks.hessian as hessian

    before = hessian.HessianMonitor
    assert live.main(["--model", "gpt", "--tiny", "--min-mib", "0.01"]) == 0
    out = capsys.readouterr().out
    assert hessian.HessianMonitor is before
    assert "counted peak" in out and " x aten." in out and "products" in out
    peak = float(out.split("counted peak ")[1].split(" MiB")[0])
    assert peak > 0
