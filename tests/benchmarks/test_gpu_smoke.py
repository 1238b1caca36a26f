"""benchmarks/gpu.py in its --smoke mode on CPU: the same code paths as the GPU run (the
PyHessian comparison, failure rows, the time budget, the $OUT files), on tiny models."""

import importlib
import importlib.util
import json
import math
import typing
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# every kind of section, on the GPT (whose products are the cheapest of the two smoke models)
SECTIONS = (
    "training step,cached,top-1,HessianMonitor defaults,reference,ours: top_eigenvalues,"
    "kind decided,on one batch,PyHessian trace,PyHessian density,short Lightning fit"
)


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("gpu")


def rows(out: Path, model: str, table: str) -> list[dict]:
    data = json.loads((out / "gpu.json").read_text())
    return data["models"][model]["tables"].get(table, [])


def by_label(items: list[dict], label: str) -> dict:
    return next(r for r in items if r["label"] == label)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without CUDA")
def test_full_run_needs_cuda(gpu, tmp_path, capsys):
    assert gpu.main(["--out", str(tmp_path)]) == 2
    assert "needs CUDA" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # PyHessian's
def test_smoke_gpt_every_kind_of_section(gpu, tmp_path, capsys):
    code = gpu.main(["--smoke", "--models", "gpt", "--only", SECTIONS,
                     "--fail-section", "top-1", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    md = (tmp_path / "gpu.md").read_text()
    assert md in capsys.readouterr().out  # the tables are printed too
    assert "## GPT" in md and "## Targets of issue 10" in md
    # the injected failure is a row, and the sections after it ran
    assert "| top-1 | failed: RuntimeError: injected failure" in md
    memory = [r for r in rows(tmp_path, "gpt", "memory") if "products" in r]
    assert any(r["label"].startswith("HessianMonitor defaults") for r in memory)
    assert any("Lightning fit" in r["label"] for r in memory)
    whole = by_label(memory, "top-1, whole batches (micro_batch_size=None)")
    assert whole["plan"]["piece"] == 0 and whole["kwargs"]["micro_batch_size"] == "None"
    assert "| top-1, whole batches (micro_batch_size=None) |" in md and "plan: piece=0" in md
    products = [r for r in rows(tmp_path, "gpt", "products") if "ms" in r]
    assert products and all(r["ms"] > 0 for r in products)
    lam = [r for r in rows(tmp_path, "gpt", "lambda") if "lambda_max" in r]
    ours = by_label(lam, "ours: top_eigenvalues(tol=1e-4)")
    assert ours["rel_error"] < 1e-4 and ours["trial"]  # against the reference of tol 1e-6
    decided = [r for r in lam if r["label"].startswith("ours, kind decided: top_")]
    assert [r["tol"] for r in decided] == [1e-4, 1e-3, 1e-2]
    assert all(r["kind"] == ours["kind"] != "auto" and not r["trial"] for r in decided)
    assert decided[0]["rel_error"] < 1e-4 and decided[-1]["products"] <= ours["products"]
    blocks = [r for r in lam if r["label"].startswith("ours, kind decided: block_")]
    assert [r["lanczos_block"] for r in blocks] == [4, 8]  # block Lanczos, same kind
    assert all(r["kind"] == ours["kind"] and r["rel_error"] < 1e-4 for r in blocks)
    assert all(r["products"] % r["lanczos_block"] == 0 for r in blocks)
    decided += blocks
    if importlib.util.find_spec("pyhessian") is not None:
        peer = next(r for r in lam if r["label"].startswith("PyHessian"))
        # power iteration finds the eigenvalue largest in magnitude, which may be negative here
        assert peer["products"] > 0 and math.isfinite(peer["rel_error"])
        # the target's row: our fastest at PyHessian's error or better; the trial's ratio kept
        assert peer["ours_row"] in {r["label"] for r in [ours, *decided]}
        assert peer["ours_rel_error"] <= peer["rel_error"]
        assert peer["ours_row"] in peer["ours_choice"]
        assert peer["ours_with_trial_over_pyhessian"] == ours["seconds"] / peer["seconds"]
        goal = next(g for g in json.loads((tmp_path / "gpu.json").read_text())["targets"]
                    if g["target"].startswith("λ_max"))  # fmt: skip
        assert peer["ours_row"] in goal["measured"] and "with the trial" in goal["measured"]
        trace_rows = [r for r in rows(tmp_path, "gpt", "trace") if "estimate" in r]
        assert trace_rows[-1]["products"] == 4  # exactly M samples (smoke M = 4)
        density = rows(tmp_path, "gpt", "density")
        assert density and ("failed" in density[0] or density[0]["products"] > 0)
    data = json.loads((tmp_path / "gpu.json").read_text())
    assert data["meta"]["product kinds (HVPMode)"] and data["targets"]


def test_lambda_target_picks_the_fastest_row_at_equal_or_better_accuracy(gpu):
    from gpu_lambda import pick_ours

    rows = [dict(label="trial", seconds=3.0, rel_error=1e-8, trial=True),
            dict(label="1e-4", seconds=2.0, rel_error=1e-8, trial=False),
            dict(label="1e-2", seconds=1.0, rel_error=1e-3, trial=False)]  # fmt: skip
    assert pick_ours(rows, 2e-3)[0]["label"] == "1e-2"
    row, why = pick_ours(rows, 1e-4)  # the loosest row is less accurate than PyHessian here
    assert row["label"] == "1e-4" and "1.0e-08 ≤ PyHessian's 1.0e-04" in why
    for peer in (None, math.nan, 1e-9):  # no reference, or none of ours as accurate: the trial
        row, why = pick_ours(rows, peer)
        assert row["label"] == "trial" and ("no error known" in why or "none of ours" in why)
    assert pick_ours(rows[1:], None) == (None, "no row of ours to compare")


def test_smoke_resnet_builds_and_trains(gpu, tmp_path):
    only = "training step,gradient over the fixed batches"
    assert (
        gpu.main(["--smoke", "--models", "resnet18", "--only", only, "--out", str(tmp_path)]) == 0
    )
    train = rows(tmp_path, "resnet18", "train")
    assert [r["label"] for r in train] == [
        "training step (forward, backward, SGD step)",
        "gradient over the fixed batches",
    ]
    assert all(r["ms"] > 0 for r in train)


def test_skip_leaves_out_the_sections_it_names(gpu, tmp_path):
    only, skip = "training step,gradient over", "training step"
    args = ["--smoke", "--models", "resnet18", "--only", only, "--skip", skip, "--out", str(tmp_path)]  # fmt: skip
    assert gpu.main(args) == 0
    assert [r["label"] for r in rows(tmp_path, "resnet18", "train")] == [
        "gradient over the fixed batches"
    ]


def test_over_budget_sections_are_skipped_rows(gpu, tmp_path):
    assert gpu.main(["--smoke", "--budget-seconds", "0", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu.md").read_text()
    assert "skipped: over the time budget" in md


def test_a_kind_the_operator_refuses_is_a_failed_row(gpu, tmp_path, monkeypatch):
    kinds = typing.get_args(gpu._operator.HVPMode)
    monkeypatch.setattr(gpu._operator, "HVPMode", typing.Literal[(*kinds, "bogus")])
    args = ["--smoke", "--models", "gpt", "--only", "bogus", "--out", str(tmp_path)]
    assert gpu.main(args) == 0
    (row,) = rows(tmp_path, "gpt", "products")
    assert row["label"] == "bogus" and row["failed"].startswith("failed: ValueError")
