"""probes: blocks of trace probes within the memory budget, beside the Lanczos basis."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import lightning_landscape.curvature.lanczos as lanczos_module
import lightning_landscape.curvature.probes as probes_module
from lightning_landscape.curvature import analyze, trace
from lightning_landscape.curvature.pieces import Plan
from lightning_landscape.curvature.probes import default_probe_block, trace_block

from ._problems import Diagonal


class _Planned(Diagonal):
    """A diagonal operator with a planned budget (bytes), recording the vectors of each call."""

    def __init__(self, diag: torch.Tensor, budget: float) -> None:
        super().__init__(diag)
        self.plan = Plan(0, math.nan, math.nan, float(budget), "")
        self.widths: list[int] = []

    def _matmat(self, Vt: torch.Tensor) -> torch.Tensor:
        self.widths.append(Vt.shape[0])  # rows: the vectors
        return super()._matmat(Vt)


def test_trace_probes_share_the_budget_with_the_basis(monkeypatch):
    """The basis and the trace's block of probes (3 P each) share one budget: beside a basis
    of 16 vectors (one chunk) a budget of 8 probes leaves room for 2; a basis that can spill
    moves to host memory first, as far as the 8 need (the placement is counted on CPU, spilled
    to the CPU itself). The probes and the estimate do not depend on the block (the stderr's
    centring, from the first block, does)."""
    d = 5000
    diag = torch.cat([torch.linspace(5, 10, 4), torch.linspace(-1, 1, d - 4)]).double()
    budget = 8 * 3 * d * 8
    ops = [_Planned(diag, budget) for _ in range(3)]
    args = dict(top_k=1, trace=True, trace_probes=16, max_steps=10, seed=3)
    plain = analyze(ops[0], **args)
    j = plain.lanczos_steps  # < 16: one chunk of 16 vectors held
    assert ops[0].widths[j:] == [2] * 8
    assert default_probe_block(ops[0]) == 8 and default_probe_block(ops[0], 16 * d * 8) == 2
    original = lanczos_module.Basis
    seen = []

    def spilling(*a, **kw):
        seen.append(original(*a, **{**kw, "spill": "cpu"}))
        return seen[-1]

    monkeypatch.setattr(lanczos_module, "Basis", spilling)
    spilled = analyze(ops[1], **args, basis_device="auto")
    assert ops[1].widths[j:] == [8, 8] and seen[0].held == 0 and seen[0].spilled == 16
    assert spilled.trace.estimate == pytest.approx(plain.trace.estimate, rel=1e-12)
    roomy = _Planned(diag, budget + 16 * d * 8)  # room for the chunk and 8 probes: it stays
    analyze(roomy, **args, basis_device="auto")
    assert roomy.widths[j:] == [8, 8] and seen[1].held == 16 * d * 8 and seen[1].spilled == 0
    # under torch.distributed every rank takes the smallest block (as many product calls)
    ranked = _Planned(diag, budget + 16 * d * 8)
    ranked.distributed = True
    other_rank = lambda t, *a, **k: t.copy_(torch.maximum(t, torch.tensor([-1.0])))  # noqa: E731
    monkeypatch.setattr(probes_module, "all_reduce_max_", other_rank)
    analyze(ranked, **args, basis_device="auto")
    assert ranked.widths[j:] == [1] * 16
    # two chunks on the device, room for one beside 8 probes: only the last one moves
    spread = torch.cat([torch.linspace(5, 10, 30), torch.linspace(-1, 1, d - 30)]).double()
    two = _Planned(spread, (16 + 24) * d * 8)
    analyze(two, **{**args, "max_steps": 20, "tol": 1e-12}, basis_device="auto")
    k = len(seen[-1])
    assert k > 16 and two.widths[k:] == [8, 8]
    assert seen[-1].held == 16 * d * 8 and seen[-1].spilled == 16
    # a basis kept elsewhere (host memory beside an accelerator) leaves the whole budget
    host = original(1, d, torch.float64, "cpu")  # cannot spill
    for _ in range(16):
        host.append(torch.ones(1, d, dtype=torch.float64))
    gpu = SimpleNamespace(dim=d, dtype=torch.float64, device=torch.device("cuda"), plan=ops[0].plan)
    assert trace_block(gpu, host) == 8
    gpu.device = torch.device("cpu")
    assert trace_block(gpu, host) == 2
    wide = analyze(ops[2], **args, probe_block=8)  # an explicit block is kept as asked
    assert ops[2].widths[j:] == [8, 8]
    assert wide.trace.estimate == pytest.approx(plain.trace.estimate, rel=1e-12)
    assert spilled.trace.stderr == pytest.approx(wide.trace.stderr, rel=1e-12)


def test_the_deflated_trace_takes_its_probes_beside_its_basis():
    """``trace(method="auto")`` (pilots, a Lanczos run, then probes) sizes its blocks as
    ``analyze`` does; its estimate does not depend on the block."""
    d = 5000
    diag = torch.cat([torch.linspace(5, 10, 4), torch.linspace(-1, 1, d - 4)]).double()
    op = _Planned(diag, 8 * 3 * d * 8)
    res = trace(op, num_matvecs=60, seed=2)
    j = res.deflation_dim
    held = math.ceil(j / 16) * 16 * d * 8  # chunks of 16 vectors
    want = default_probe_block(op, held)
    assert want < 8 and op.widths[0] == 2 and op.widths[1 : 1 + j] == [1] * j  # pilots, steps
    probes = op.widths[1 + j :]
    assert sum(probes) == 60 - 2 - j and max(probes) == want and len(set(probes[:-1])) <= 1
    wide = _Planned(diag, math.inf)  # no budget: blocks of 8
    assert trace(wide, num_matvecs=60, seed=2).estimate == pytest.approx(res.estimate, rel=1e-12)
    assert max(wide.widths[1 + j :]) == 8
    big = torch.cat([diag, torch.zeros(1000, dtype=torch.float64)])  # above 5,000 dimensions
    unplanned = _Planned(big, 0.0)
    unplanned.plan = None  # no planned budget: the trace keeps its blocks of 8, as before
    trace(unplanned, num_matvecs=60, seed=2)
    assert max(unplanned.widths[3:]) == 8 and default_probe_block(unplanned) == 1
