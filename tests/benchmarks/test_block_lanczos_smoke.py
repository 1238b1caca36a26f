"""benchmarks/block_lanczos.py in its --quick mode: every solver row, near the reference."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("block_lanczos")


def test_quick_run_prints_every_solver_near_the_reference(bench, capsys):
    bench.main(["--quick", "--repeats", "1"])
    rows = [x.split(" | ") for x in capsys.readouterr().out.splitlines() if x.startswith("| MLP")]
    assert [r[3] for r in rows] == ["Lanczos (1 vector)", "block 2", "block 4", "block 8"]
    for r in rows[1:]:
        assert int(r[4]) % int(r[3].split()[-1]) == 0  # whole blocks of products
    assert all(float(r[6]) < 1e-5 and r[7].startswith("True") for r in rows)  # vs tol 1e-12
