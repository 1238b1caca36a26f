"""benchmarks/gpu_pieces.py in its --smoke mode on CPU: the piece sweep and the monitor's
defaults at explicit budgets, on the tiny GPT."""

import importlib
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def pieces(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu_pieces")


def test_smoke_gpt_sweeps_pieces_and_budgets(pieces, tmp_path, capsys):
    assert pieces.main(["--smoke", "--models", "gpt", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu.json").read_text())
    tables = data["models"]["gpt"]["tables"]
    sweep = tables["pieces"]
    assert [(r["piece"], r["kind"], r["block"]) for r in sweep] == [
        (p, k, b) for p in pieces.SMOKE_PIECES["gpt"]
        for k, b in (("double_backward", False), ("func", True))
    ]  # fmt: skip
    assert all(r["ms"] > 0 and r["per_gradient"] > 0 for r in sweep)
    memory = [r for r in tables["memory"] if "products" in r]
    assert [r["label"] for r in memory] == [
        "HessianMonitor defaults, memory_budget=inf", "HessianMonitor defaults, memory_budget=3 T"
    ]  # fmt: skip
    assert all(r["converged"] and math.isfinite(r["lambda_max"]) for r in memory)
    assert memory[0]["lambda_max"] == pytest.approx(memory[1]["lambda_max"], rel=1e-6)
    assert "A product by piece size" in capsys.readouterr().out
