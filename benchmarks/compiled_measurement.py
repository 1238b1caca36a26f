"""A whole HessianMonitor measurement (its defaults: top-1, the most negative eigenvalue, the
trace) with eager products against ``hvp="compiled"``, per product over a gradient.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/compiled_measurement.py --model gpt \\
        [--size small] [--device cpu] [--out DIR]

Models and shapes are ``product_profile.py``'s (``--size small``: the 4-layer GPT on 2 batches of
2 x 64 tokens, ResNet-18 width 64 on 2 batches of 8 images; ``h200``: ``gpu.py``'s, for a GPU).
Rows, each on the same weights and probes (seed 0), ``analyze`` as the monitor calls it:

- ``auto``: a fit's first measurement (the trial of the kinds included);
- ``<kind> (decided)``: a later measurement with the kind ``auto`` chose;
- ``compiled, first``: compiles every variant the measurement meets (piece sizes x widths);
- ``compiled, later``: the same again, compiled code reused.

Each gives wall time, products, wall per product over a gradient (``torch.autograd.grad`` over
the same batches, median of 5), λ_max and the trace. Compiling uses inductor's cache directory
as it finds it (``TORCHINDUCTOR_CACHE_DIR``): a cold one is what a user's first fit pays.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from product_profile import SIZES, build  # noqa: E402

from lightning_landscape.curvature import HessianOperator, analyze  # noqa: E402

MONITOR = dict(top_k=1, smallest=True, trace=True, trace_probes=50, tol=1e-3, max_steps=200)


def run(loss, model, batches, kind: str, device: torch.device) -> tuple[dict, str]:
    op = HessianOperator(loss, model, batches, hvp=kind)
    sync(device)
    start = time.perf_counter()
    r = analyze(op, seed=0, **MONITOR)
    sync(device)
    wall = time.perf_counter() - start
    op.release()
    row = dict(kind=kind, wall=wall, products=r.num_matvecs, lambda_max=float(r.top.eigenvalues[0]),
               trace=r.trace.estimate, trace_stderr=r.trace.stderr)  # fmt: skip
    return row, op.hvp_choice or kind


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gpt", choices=["gpt", "resnet18"])
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    device = torch.device(args.device)
    model, loss, params, batch, title = build(args.model, SIZES[args.size], device)
    # a second batch of other samples: images mirrored, tokens and labels shifted by one
    second = tuple(t.flip(-1) if t.is_floating_point() else (t + 1) % (t.max() + 1) for t in batch)
    batches = [batch, second]

    def gradient():
        return [torch.autograd.grad(loss(b), params) for b in batches]

    gradient()
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        gradient()
        sync(device)
        times.append(time.perf_counter() - start)
    t_grad = statistics.median(times)
    lines = [f"{title}; 2 batches; gradient over them {1e3 * t_grad:.1f} ms; torch "
             f"{torch.__version__}, {device}", "",
             "| measurement | wall (s) | products | wall per product / gradient | λ_max | trace |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(lines), flush=True)
    rows: list[dict] = []

    def add(row: dict, label: str) -> None:
        """Print the row and rewrite the files: a run cut short by a timeout keeps its rows."""
        row |= dict(label=label, per_product_per_gradient=row["wall"] / row["products"] / t_grad)
        rows.append(row)
        lines.append(
            f"| {label} | {row['wall']:.1f} | {row['products']} | "
            f"{row['per_product_per_gradient']:.2f} | {row['lambda_max']:.6g} | "
            f"{row['trace']:.4g} ± {row['trace_stderr']:.2g} |"
        )
        print(lines[-1], flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            name = f"compiled_measurement_{args.model}_{args.size}"
            (out / f"{name}.md").write_text("\n".join(lines) + "\n")
            (out / f"{name}.json").write_text(
                json.dumps(dict(title=title, t_grad=t_grad, rows=rows))
            )

    first, decided = run(loss, model, batches, "auto", device)
    add(first, "auto (a fit's first measurement)")
    add(run(loss, model, batches, decided, device)[0], f"{decided} (decided: a later measurement)")
    add(run(loss, model, batches, "compiled", device)[0], "compiled, first (compiles)")
    add(run(loss, model, batches, "compiled", device)[0], "compiled, later")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
