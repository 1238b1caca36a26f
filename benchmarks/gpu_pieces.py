"""What a product costs as the batches are cut smaller, on the GPU models of ``gpu.py``.

    PYTHONPATH=. python benchmarks/gpu_pieces.py --out $OUT          # needs CUDA (~4 minutes)
    PYTHONPATH=. python benchmarks/gpu_pieces.py --smoke --out DIR   # the same code on CPU

``micro_batch_size="auto"`` cuts the fixed batches into pieces small enough for a product to fit
``memory_budget`` (default: one training step, T). On a GPU small pieces leave the device idle
between kernel launches, so the budget trades memory for time. For ResNet-18 and the GPT of
``gpu.py`` (same shapes, same batches) this prints, per piece size (samples a pass takes): one
``double_backward`` product and a vmapped block of 8 ``func`` products, time over a gradient of
the same batches and peak memory over a training step's; then a HessianMonitor measurement with
its defaults (top-1 + min + trace) at explicit budgets (in units of T as the operator's plan
estimates it, and ``math.inf``), with the free device memory before. Tables go to stdout and,
with ``--out``, to ``gpu.md``/``gpu.json`` there (``gpu.py``'s report).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[0]))
import gpu  # noqa: E402
from gpu_report import TABLES, describe, fmt, plan_note, ratio  # noqa: E402

from lightning_landscape.curvature import HessianOperator  # noqa: E402

TABLES["pieces"] = (
    "A product by piece size (samples a pass takes), over a gradient and a training step",
    ["piece", "kind", "ms a product", "/ gradient", "peak (GiB)", "/ training step", "notes"],
)
PIECES = dict(resnet18=(128, 64, 32), gpt=(8, 4, 2))
SMOKE_PIECES = dict(resnet18=(4, 2), gpt=(2, 1))
BUDGETS = (math.inf, 3.0)  # in T, the training step the operator's plan estimates


def sweep(bench: gpu.Bench, m: gpu.Model, pieces: tuple[int, ...]) -> float:
    """One row per piece size and kind; returns T (bytes) as the operator's plan estimated it."""
    step = math.nan
    g = torch.Generator(device=bench.device).manual_seed(0)
    v = torch.randn(m.dim, generator=g, device=bench.device)
    V = torch.randn(m.dim, 8, generator=g, device=bench.device)
    for piece in pieces:
        for kind, block in (("double_backward", False), ("func", True)):
            label = f"{kind}{', block of 8' if block else ''}"
            if time.perf_counter() > bench.model_deadline:
                bench.report.skip(m.key, "pieces", str(piece), f"{label}: over the time budget")
                continue
            try:
                op = HessianOperator(m.loss, m.model, m.batches, hvp=kind, micro_batch_size=piece)
                fn = (lambda o=op: o.matmat(V)) if block else (lambda o=op: o @ v)
                fn()
                bench.meter.reset_peak()
                t = bench.timed(fn, 2) / (8 if block else 1)
                peak = bench.meter.peak()
                del op, fn
                bench.cleanup()
                bench.report.add(
                    m.key, "pieces",
                    [piece, label, fmt(1e3 * t, ".1f"), ratio(t, m.t_grad), fmt(peak, "gib"),
                     ratio(peak, m.train_peak), ""],
                    dict(piece=piece, kind=kind, block=block, ms=1e3 * t,
                         per_gradient=t / m.t_grad if m.t_grad else None, peak=peak,
                         per_train_step=peak / m.train_peak if peak and m.train_peak else None),
                )  # fmt: skip
            except Exception as err:  # noqa: BLE001 - a row of its own, go on
                bench.cleanup()
                bench.report.fail(m.key, "pieces", str(piece), f"{label}: {describe(err)}")
        bench.report.save()
    op = HessianOperator(m.loss, m.model, m.batches)  # the default plan: its estimate of T
    op @ v
    step = getattr(getattr(op, "plan", None), "step_bytes", math.nan)
    m.info["plan_default"] = plan_note(op)[1]
    del op
    bench.cleanup()
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on CPU")
    parser.add_argument("--budget-seconds", type=float, default=240.0)
    parser.add_argument("--models", default="resnet18,gpt")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_pieces.py needs CUDA; --smoke runs on CPU", file=sys.stderr)
        return 2
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except Exception:  # noqa: BLE001, S110
        pass
    gargs = argparse.Namespace(
        smoke=args.smoke, budget_seconds=args.budget_seconds, out=args.out, operator_kwargs={},
        only=None, skip=None, models=args.models, resnet_share=0.45, no_tf32=True,
        fail_section=None, device=str(device),
    )  # fmt: skip
    bench = gpu.Bench(gargs, device)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    total = bench.deadline
    for i, key in enumerate(keys):
        # the sweep and the measurements of one model within its share of the time left
        bench.model_deadline = time.perf_counter() + (total - time.perf_counter()) / (len(keys) - i)
        m = bench.build(key)
        bench.report.title(key, m.title)
        bench.log(f"{key}: {m.title}")
        bench.train_step(m, "training step (forward, backward, SGD step)")
        bench.gradient(m, "gradient over the fixed batches")
        pieces = (SMOKE_PIECES if args.smoke else PIECES)[key]
        step = sweep(bench, m, pieces)
        m.info["plan_step_bytes"] = step
        if device.type == "cuda":
            free, total_mem = torch.cuda.mem_get_info()
            m.info["free_device_bytes"], m.info["device_bytes"] = free, total_mem
        d = bench.monitor
        kwargs = bench.analyze_kwargs(d["top_k"], d["min_eigenvalue"], d["trace"], d["density"])
        wall = 0.0  # the unbounded measurement's; a bounded one (smaller pieces) needs more
        for k in BUDGETS:
            budget = k * step if math.isfinite(k) else math.inf
            label = (
                f"HessianMonitor defaults, memory_budget={'inf' if math.isinf(k) else f'{k:g} T'}"
            )
            if not math.isfinite(budget) and math.isfinite(k):
                bench.report.fail(m.key, "memory", label, "no estimate of T")
                continue
            bench.attempt(m, "memory", label,
                          lambda lab, b=budget, m=m, kw=kwargs: bench.measurement(m, lab, kw, memory_budget=b),
                          1.5 * wall)  # fmt: skip
            done = [r for r in bench.report.rows(m.key, "memory") if r.get("seconds")]
            wall = max([wall] + [r["seconds"] for r in done])
            bench.report.save()
        m.model, m.batches = None, []
        bench.cleanup()
    bench.report.save()
    print(bench.report.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
