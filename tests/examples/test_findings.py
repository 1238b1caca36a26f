"""examples/findings.py in its reduced form: every finding runs, draws its figure and prints a
number; the two findings that hold even in the reduced run are asserted."""

import re

import pytest
from _run import run_example


@pytest.mark.slow
def test_findings_quick(tmp_path):
    findings = run_example("findings", ["--quick", "--out", str(tmp_path)])
    names = [f.name for f in findings]
    assert names == [
        "edge_of_stability",
        "outliers",
        "saddles",
        "interpolation",
        "batch_size",
        "entropy_sgd",
        "adam_edge_of_stability",
    ]
    for name in names:
        assert (tmp_path / f"findings_{name}.png").stat().st_size > 10_000
    by_name = {f.name: f.measured for f in findings}
    low, high = map(
        float,
        re.search(r"([\d.]+)-([\d.]+) over the second half", by_name["edge_of_stability"]).groups(),
    )
    assert 0.8 < low <= high < 1.3  # λ_max·η/2 hovers near 1
    assert "monotonic: True" in by_name["interpolation"]
    assert "nan" not in " ".join(by_name.values()).lower()
