"""examples/transformer.py in its reduced form: a causal Transformer (SDPA attention) trains and
every epoch's Hessian, SAM and trajectory values are finite and logged to TensorBoard."""

import math

from _run import run_example
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_transformer_quick(tmp_path):
    rows = run_example("transformer", ["--quick", "--logdir", str(tmp_path)])
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    keys = ["hessian/eigenvalue_1", "hessian/trace", "sharpness/sam", "trajectory/loss"]
    assert all(math.isfinite(r[k]) for r in rows for k in keys), rows
    assert all(r["hessian/eigenvalue_1"] >= r["hessian/eigenvalue_2"] > 0 for r in rows)
    assert math.isfinite(rows[-1]["hessian/eos_ratio"])  # Adam's, after its first steps
    assert rows[-1]["trajectory/loss"] < rows[0]["trajectory/loss"]
    (run,) = (tmp_path / "transformer").iterdir()
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    tags = acc.Reload().Tags()
    assert {"hessian/eigenvalue_1", "sharpness/sam", "trajectory/loss"} <= set(tags["scalars"])
    assert "trajectory/pca_landscape" in tags["images"]
