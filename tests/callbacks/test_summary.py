"""The end-of-fit summary on its own: every column, one block per prefix, wrapped, rows only where
the block measured something; the CSV keeps everything."""

import csv
import types

from lightning_landscape.callbacks._summary import merged_history, summary_table, write_summary

HESSIAN = [
    {"epoch": 0.0, "step": 0.0, "hessian/eigenvalue_1": 2.5, "hessian/seconds": 0.1},
    {"epoch": 2.0, "step": 10.0, "hessian/eigenvalue_1": 3.25, "hessian/seconds": 0.2},
]
TRAJECTORY = [{"epoch": 1.4, "step": 7.0} | {f"trajectory/{k}": 1.0 for k in "abcdefghijkl"}]


def _monitor(rows):
    return types.SimpleNamespace(summary_rows=lambda: rows)


def test_blocks_wrap_and_skip_rows_without_measurements():
    rows = merged_history([_monitor(HESSIAN), _monitor(TRAJECTORY)])
    assert [r["step"] for r in rows] == [0.0, 7.0, 10.0]
    text = summary_table(rows, width=80)
    blocks = [b.splitlines() for b in text.split("\n\n")]
    assert [b[0] for b in blocks] == ["hessian"] + ["trajectory"] * (len(blocks) - 1)
    hessian = blocks[0]
    assert hessian[1].split() == ["epoch", "step", "eigenvalue_1", "seconds"]
    assert [line.split()[:3] for line in hessian[2:]] == [["0", "0", "2.5"], ["2", "10", "3.25"]]
    columns = [name for b in blocks[1:] for name in b[1].split()[2:]]
    assert columns == list("abcdefghijkl") and len(blocks) > 2  # every column, wrapped
    for b in blocks[1:]:
        assert all(len(line) <= 80 for line in b)
        assert [line.split()[:2] for line in b[2:]] == [["1.4", "7"]]  # its one measurement


def test_csv_has_every_key(tmp_path):
    trainer = types.SimpleNamespace(
        is_global_zero=True, loggers=[types.SimpleNamespace(log_dir=str(tmp_path))]
    )
    path = write_summary(trainer, [_monitor(HESSIAN), _monitor(TRAJECTORY)])
    with open(path) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 3 and table[0]["hessian/eigenvalue_1"] == "2.5"
    assert table[1]["trajectory/l"] == "1.0" and table[1]["hessian/seconds"] == ""
    assert write_summary(trainer, []) is None
