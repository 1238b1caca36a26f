"""Calibration of the trace estimators' reported standard error.

    python benchmarks/trace_calibration.py [--seeds 400] [--spectra outlier,flat,network]
        [--methods auto,hutchinson,hutch++,analyze] [--threads 1] [--quick]

For each method, budget and synthetic spectrum (the ``MatrixOperator`` of Q diag(λ) Qᵀ, d = 500,
the "outlier" and "flat" spectra of ``benchmarks/curvature.py``; ``--spectra network`` adds the
exact Hessian of its trained MLP), runs ``trace`` over many seeds and computes z = (estimate −
exact) / stderr. A calibrated stderr gives std(z) ≈ 1, about 4.6 % of runs with |z| > 2 and
0.3 % with |z| > 3, and a mean stderr close to the root-mean-square error. Rows "analyze" run :func:`analyze` (top eigenvalue, ``trace=True``) with ``trace_probes``
equal to the budget column (its Lanczos run comes on top). NaN stderrs are counted apart.

``--save results.json`` keeps the numbers; ``--before results.json`` (saved by a run of older
code, e.g. with ``PYTHONPATH`` at another checkout) prints each cell as "before → now".
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from curvature import dense_truth, digits, rotate, split, synthetic, trained_mlp

from lightning_landscape.curvature import MatrixOperator, analyze, trace

BUDGETS = (5, 6, 8, 10, 15, 20, 30, 50, 100)
PROBES = (2, 3, 5, 10, 20, 50)  # trace_probes of analyze
METHODS = ("auto", "hutchinson", "hutch++")


def problem(name: str) -> tuple[MatrixOperator, float]:
    """The operator and its exact trace: a synthetic spectrum (d = 500), or "network", the
    exact float64 Hessian of ``benchmarks/curvature.py``'s trained MLP (2,410 parameters)."""
    if name == "network":
        X, y = digits()
        model, _ = trained_mlp(X, y)
        lam, H = dense_truth(model, split(X, y))
        return MatrixOperator(H), float(lam.sum())
    lam = synthetic(500, name)
    return MatrixOperator(rotate(lam)), float(lam.sum())


def run(op: MatrixOperator, method: str, budget: int, seed: int) -> tuple[float, float]:
    if method == "analyze":
        r = analyze(op, top_k=1, trace=True, trace_probes=budget, seed=seed).trace
    else:
        r = trace(op, num_matvecs=budget, method=method, seed=seed)
    return r.estimate, r.stderr


def calibration(op: MatrixOperator, exact: float, method: str, budget: int, seeds: int) -> list:
    """std(z), fractions beyond 2 and 3, mean stderr / RMS error, NaN count (as strings)."""
    errors, stderrs = [], []
    for seed in range(seeds):
        est, se = run(op, method, budget, seed)
        errors.append(est - exact)
        stderrs.append(se)
    e, s = torch.tensor(errors), torch.tensor(stderrs)
    ok = torch.isfinite(s) & (s > 0)
    z = e[ok] / s[ok]
    rms = float(e.pow(2).mean().sqrt())
    return [
        f"{float(z.std()):.2f}",
        f"{float((z.abs() > 2).double().mean()):.3f}",
        f"{float((z.abs() > 3).double().mean()):.3f}",
        f"{float(s[ok].mean()) / rms:.2f}",
        str(int((~ok).sum())),
    ]


def merge(rows: list[list[str]], before: dict[str, list[str]]) -> list[list[str]]:
    """Cells "before → now" where the older run has the same row."""
    out = []
    for row in rows:
        old = before.get("/".join(row[:3]))
        cells = (
            row[3:] if old is None else [f"{a} → {b}" for a, b in zip(old, row[3:], strict=True)]
        )
        out.append(row[:3] + cells)
    return out


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="100 seeds, fewer budgets")
    parser.add_argument("--methods", default=",".join((*METHODS, "analyze")))
    parser.add_argument("--spectra", default="outlier,flat", help="also: network")
    parser.add_argument("--save", default=None, help="write the numbers to this JSON file")
    parser.add_argument("--before", default=None, help="JSON of an older run to compare with")
    args = parser.parse_args()
    budgets, probes = (BUDGETS, PROBES) if not args.quick else ((5, 8, 15, 30), (2, 5, 20))
    if args.quick:
        args.seeds = 100
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.seeds} seeds\n")
    rows = []
    for name in args.spectra.split(","):
        op, exact = problem(name)
        for method in args.methods.split(","):
            for budget in probes if method == "analyze" else budgets:
                cells = calibration(op, exact, method, budget, args.seeds)
                rows.append([name, method, str(budget), *cells])
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"/".join(r[:3]): r[3:] for r in rows}, f, indent=1)
    if args.before:
        with open(args.before) as f:
            rows = merge(rows, json.load(f))
    header = ["spectrum", "method", "budget", "std z", "|z|>2", "|z|>3", "stderr/RMS", "NaN"]
    print(table(header, rows))
    print(f"\ncalibrated: std z ≈ 1, |z|>2 ≈ 0.046, |z|>3 ≈ 0.003 (Gaussian); "
          f"total {time.perf_counter() - t0:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
