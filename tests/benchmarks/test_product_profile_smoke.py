"""benchmarks/op_census.py on known ops, and benchmarks/product_profile.py in its --tiny mode
(the markdown tables and the JSON of $OUT)."""

import importlib
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def test_census_counts_flops_kernels_and_new_bytes(bench):
    census = bench("op_census").census
    a, b = torch.randn(4, 3), torch.randn(3, 5)

    def fn():
        c = a @ b  # mm: 2*4*3*5 FLOPs, 80 new bytes
        d = c.view(20)  # a view: dispatched, not computing
        d.add_(1.0)  # in place: computing, no new bytes
        return (d * 2).sum()  # mul (80 bytes) and sum (4 bytes)

    c, out = census(fn)
    assert c.flops == 2 * 4 * 3 * 5 and c.flops_by_op["mm"] == c.flops
    assert c.by_op == {"mm": 1, "add_": 1, "mul": 1, "sum": 1}
    assert c.calls == 5 and c.kernels == 4 and c.calls_by_op["view"] == 1
    assert c.bytes == 80 + 80 + 4 and c.bytes_by_op["add_"] == 0
    assert c.by_node == {"forward": 4}
    half = c.scaled(2)
    assert half.kernels == 2 and half.by_op["mm"] == 0.5


def test_census_charges_backward_ops_to_their_node(bench):
    census = bench("op_census").census
    w = torch.randn(3, requires_grad=True)
    c, (g,) = census(lambda: torch.autograd.grad((w.exp() * 2).sum(), w))
    assert torch.allclose(g, 2 * w.exp())
    assert c.by_node["MulBackward0"] >= 1 and c.by_node["ExpBackward0"] >= 1


def test_tiny_run_writes_tables_and_json(bench, tmp_path, capsys):
    profile = bench("product_profile")
    code = profile.main(["--tiny", "--runs", "small:cpu,small:meta", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("| kind | vectors | FLOPs / gradient |") == 4
    assert "| `NativeBatchNormBackwardBackward0` |" in out
    runs = json.loads((tmp_path / "product_profile.json").read_text())["runs"]
    assert [(r["model"], r["device"]) for r in runs] == [
        ("resnet18", "cpu"),
        ("gpt", "cpu"),
        ("resnet18", "meta"),
        ("gpt", "meta"),
    ]
    assert set(runs[0]["conv_ms"]) == {"gradient", "cached", "func"}  # replayed on the CPU
    assert all("conv_ms" not in run for run in runs[1:])  # no convolution, or on meta
    for run in runs:
        labels = [r["label"] for r in run["rows"]]
        assert labels[0] == "gradient" and "cached (graph kept)" in labels
        cached = next(r for r in run["rows"] if r["label"] == "cached (graph kept)")
        grad = run["rows"][0]
        # an exact product costs about two gradients in matrix FLOPs, and more ops
        assert 1.5 < cached["census"]["flops"] / grad["census"]["flops"] < 2.6
        assert cached["census"]["kernels"] > grad["census"]["kernels"]
        assert (grad["seconds"] is None) == (run["device"] == "meta")
    assert (tmp_path / "product_profile.md").read_text().startswith("torch ")


def test_compiled_product_refuses_unknown_parts(bench):
    compiled = bench("compiled_product")
    with pytest.raises(SystemExit) as info:
        compiled.main(["--parts", "func,nonsense"])
    assert info.value.code == 2
