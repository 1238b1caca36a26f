"""benchmarks/memory.py in its --tiny mode: fresh processes, a real Trainer with the
HessianMonitor, the peak resident set above a baseline, the markdown table and $OUT files."""

import importlib
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_tiny_run_writes_the_table(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    memory = importlib.import_module("memory")
    code = memory.main(
        ["--tiny", "--no-warmup", "--configs", "train,defaults", "--out", str(tmp_path),
         "--where-peak"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| HessianMonitor() with its defaults |" in out
    results = json.loads((tmp_path / "memory.json").read_text())
    assert [r["config"] for r in results] == ["train", "defaults"]
    train, defaults = results
    assert train["metrics"] == {} and len(train["train_steps"]) == 5
    assert defaults["metrics"]["hessian/num_matvecs"] > 0
    assert defaults["measurement"] > 0 and defaults["peak_reset"]
    assert (tmp_path / "memory.md").read_text().startswith("| configuration |")
    assert isinstance(defaults["peak_stack"], list) and "defaults: peak at" in out


def test_unknown_configuration_is_refused(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    memory = importlib.import_module("memory")
    with pytest.raises(SystemExit) as info:
        memory.main(["--configs", "train,nonsense"])
    assert info.value.code == 2


@pytest.mark.parametrize("model", ["resnet18", "gpt"])
def test_tiny_run_of_the_gpu_architectures(monkeypatch, tmp_path, model):
    """--model resnet18 / gpt: the same rows on convolutions with BatchNorm and on attention,
    written to memory_<model>.md/.json."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    memory = importlib.import_module("memory")
    args = ["--tiny", "--no-warmup", "--model", model, "--configs", "train,top1"]
    assert memory.main([*args, "--out", str(tmp_path)]) == 0
    train, top1 = json.loads((tmp_path / f"memory_{model}.json").read_text())
    assert train["model"] == model and len(train["train_steps"]) == 5
    assert top1["metrics"]["hessian/num_matvecs"] > 0 and top1["measurement"] > 0
    assert not (tmp_path / "memory.md").exists()
