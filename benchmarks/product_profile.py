"""Where a Hessian-vector product's cost goes, against one gradient: FLOPs, dispatched aten ops,
bytes of new outputs, wall time, by kind, by op and by layer type (the autograd node).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/product_profile.py [--quick] [--out DIR]

Models (``benchmarks/gpu_models.py``, eval mode as the HessianMonitor measures, float32, one
batch, synthetic data): ResNet-18 with the CIFAR stem, width 64 (11.17M parameters), and a GPT
(pre-LayerNorm blocks, GELU tanh, SDPA attention, untied head). Two sizes:

- ``small`` (timed on CPU): ResNet-18 on 8 images 3x32x32 (``--quick``: 2); GPT with 4 layers,
  width 256, 4 heads, vocabulary 8192, context 64, 2 x 64 tokens (``--quick``: 1 x 64). The
  vocabulary keeps the head's share of the matrix FLOPs near GPT-2-small's (about 40 % here,
  30 % there) rather than 80 % at 50257;
- ``h200``: the shapes of ``benchmarks/gpu.py`` (one of its batches: 128 images; GPT 12 x 768,
  12 heads, vocabulary 50257, 8 x 256 tokens). On the ``meta`` device only the counts are taken
  (no data, no compute, seconds), so they describe the H200 runs exactly.

``--runs`` picks (size:device) pairs; default ``small:cpu,h200:meta`` (100 s on one CPU thread),
``small:cpu`` with ``--quick`` (30 s) or ``--tiny`` (toy widths, for the tests), ``h200:cuda``
when CUDA is available. Rows (every product through :func:`lightning_landscape.curvature.hvp.guard`,
as the operator runs them: math attention, same RNG; the gradient outside it, as
``benchmarks/gpu.py`` takes it, with the default kernels):

- ``gradient``: ``torch.autograd.grad(loss, params)``, the denominator of every ratio;
- ``gradient (math attention)``, GPT only: the same inside the guard;
- ``graph build``: the gradient with ``create_graph=True`` (what ``cached`` pays once);
- ``cached``: one backward through a kept gradient graph (``hvp_from_graph``, one vector);
- ``double_backward``: graph build + that backward, graph freed (``hvp_double_backward``);
- ``func``: ``jvp(grad(f))`` through ``functional_call`` (``hvp_func``), one vector;
- ``func, block of 8`` and ``cached, block of 8``: vmapped over 8 vectors, counts and time
  divided by 8 (per product).

Counts (``op_census.py``): FLOPs from ``FlopCounterMode`` (matrix products, convolutions and
attention only), all dispatched ops, computing ops (a proxy for kernel launches) and bytes of
new outputs (a proxy for memory written); time is the median of ``--repeats`` runs after the
counted run (which is the warm-up). Prints markdown; ``--out DIR`` also writes
``DIR/product_profile.json`` and ``DIR/product_profile.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_models import (  # noqa: E402
    GPT,
    ResNet18,
    classification_loss,
    image_batches,
    language_loss,
    token_batches,
)
from op_census import FLOP_OPS, census, time_convolutions, uncounted  # noqa: E402

from lightning_landscape.curvature import hvp as H  # noqa: E402

SIZES = {
    "small": dict(resnet=dict(batch=8, side=32, width=64),
                  gpt=dict(layers=4, width=256, heads=4, vocab=8192, context=64, batch=2)),
    "quick": dict(resnet=dict(batch=2, side=32, width=64),
                  gpt=dict(layers=4, width=256, heads=4, vocab=8192, context=64, batch=1)),
    "tiny": dict(resnet=dict(batch=2, side=8, width=4),
                 gpt=dict(layers=2, width=16, heads=2, vocab=64, context=8, batch=2)),
    "h200": dict(resnet=dict(batch=128, side=32, width=64),
                 gpt=dict(layers=12, width=768, heads=12, vocab=50257, context=256, batch=8)),
}  # fmt: skip
BLOCK = 8


def build(key: str, size: dict, device: torch.device):
    """The model in eval mode, its loss, parameters and one batch; a title saying the shapes."""
    torch.manual_seed(0)
    # on meta the model is made there (no initialization work); elsewhere on the CPU, as gpu.py
    where = torch.device(device) if device.type == "meta" else contextlib.nullcontext()
    if key == "resnet18":
        c = size["resnet"]
        with where:
            model = ResNet18(10, c["width"]).to(device)
        batch = image_batches(1, c["batch"], c["side"], 10, 1, torch.device("cpu"))[0]
        loss = classification_loss(model)
        title = (
            f"ResNet-18 (CIFAR stem, width {c['width']}), {c['batch']} x 3x{c['side']}x{c['side']}"
        )
    else:
        c = size["gpt"]
        with where:
            model = GPT(c["vocab"], c["context"], c["layers"], c["width"], c["heads"]).to(device)
        batch = token_batches(1, c["batch"], c["context"], c["vocab"], 1, torch.device("cpu"))[0]
        loss = language_loss(model)
        title = (f"GPT ({c['layers']} layers, width {c['width']}, {c['heads']} heads, vocabulary "
                 f"{c['vocab']}), {c['batch']} x {c['context']} tokens")  # fmt: skip
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = tuple(t.to(device) for t in batch)
    dim = sum(p.numel() for p in params)
    return model, loss, params, batch, f"{title}, {dim:,} parameters, float32, eval mode"


def rows(key: str, model, loss, params, batch, V):
    """(label, vectors, inside the guard (``"convs"``: with the standard convolutions of
    :mod:`lightning_landscape.curvature.conv`), setup, fn) for every measured call; ``setup`` runs
    before the counted call (the cached rows build their graph there, uncounted)."""
    graph = {}

    def build_graph(name: str = "g"):
        def build():
            if name not in graph:
                graph[name] = H.gradient_graph(loss, params, batch)

        return build

    def cached(k: int, name: str = "g"):
        return lambda: H.hvp_from_graph(graph[name], params, V[:k], retain=True)

    def grad():
        return torch.autograd.grad(loss(batch), params)

    none = lambda: None  # noqa: E731
    out = [("gradient", 1, False, none, grad)]
    if key == "gpt":
        out.append(("gradient (math attention)", 1, True, none, grad))
    if key == "resnet18":  # curvature/conv.py: the graph kinds' convolutions
        out += [
            ("cached, standard convolutions", 1, "convs", build_graph("c"), cached(1, "c")),
            ("double_backward, standard convolutions", 1, "convs", none,
             lambda: H.hvp_double_backward(loss, params, batch, V[:1])),
        ]  # fmt: skip
    return out + [
        ("graph build (create_graph=True)", 1, True, none,
         lambda: H.gradient_graph(loss, params, batch)),
        ("cached (graph kept)", 1, True, build_graph(), cached(1)),
        ("double_backward (build + product)", 1, True, none,
         lambda: H.hvp_double_backward(loss, params, batch, V[:1])),
        ("func", 1, True, none, lambda: H.hvp_func(loss, params, batch, V[:1], model)),
        (f"func, block of {BLOCK}", BLOCK, True, none,
         lambda: H.hvp_func(loss, params, batch, V, model)),
        (f"cached, block of {BLOCK}", BLOCK, True, build_graph(), cached(BLOCK)),
    ]  # fmt: skip


def measure(key: str, size_name: str, device: torch.device, repeats: int, block_repeats: int):
    """Counts (and, off the meta device, times) of every row for one model."""
    model, loss, params, batch, title = build(key, SIZES[size_name], device)
    dim = sum(p.numel() for p in params)
    if device.type == "meta":  # no data: 8 vectors of 162M numbers would cost 5 GB here
        V = torch.empty(BLOCK, dim, device=device)
    else:
        V = torch.randn(BLOCK, dim, device=device, generator=torch.Generator(device).manual_seed(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = []
    for label, k, guarded, setup, fn in rows(key, model, loss, params, batch, V):
        convs = guarded == "convs"  # PyTorch's own convolution double backward otherwise
        with H.guard(model, params, 0, graph_kernels=convs) if guarded else torch.enable_grad():
            setup()
            c, _ = census(fn)  # also the warm-up
            times = []
            for _ in range(0 if device.type == "meta" else block_repeats if k > 1 else repeats):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times.append(time.perf_counter() - start)
        per = c.scaled(k)
        t = statistics.median(times) / k if times else None
        results.append(dict(label=label, vectors=k, census=per, seconds=t))
        print(f"  {key} {size_name}:{device.type} {label}: {per.flops / 1e9:.2f} GFLOP, "
              f"{per.kernels:.0f} computing ops" + (f", {1e3 * t:.1f} ms" if t else ""),
              file=sys.stderr, flush=True)  # fmt: skip
    run = dict(model=key, size=size_name, device=str(device), title=title, dim=dim, rows=results)
    if device.type != "meta" and results[0]["census"].conv_calls:  # replay the convolutions
        run["conv_ms"] = {
            label: {k: 1e3 * t for k, t in time_convolutions(c, device).items()}
            for label, c in (("gradient", results[0]["census"]),
                             ("cached", rows_by(run, "cached (")), ("func", rows_by(run, "func")))
        }  # fmt: skip
    return run


def _ratio(x: float, g: float) -> str:
    return f"{x / g:.2f}" if g else "-"


def tables(run: dict) -> str:
    """The markdown of one run: ratios per kind, then the op and layer-type breakdowns."""
    rows = run["rows"]
    g, gt = rows[0]["census"], rows[0]["seconds"]
    timed = gt is not None
    lines = [f"**{run['title']}** ({run['size']} shapes on {run['device']})", "",
             "| kind | vectors | FLOPs / gradient | ops / gradient | computing ops / gradient "
             "| output bytes / gradient | time / gradient |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c = r["census"]
        time_ratio = _ratio(r["seconds"], gt) if timed else "-"
        lines.append(f"| {r['label']} | {r['vectors']} | {_ratio(c.flops, g.flops)} | "
                     f"{_ratio(c.calls, g.calls)} | {_ratio(c.kernels, g.kernels)} | "
                     f"{_ratio(c.bytes, g.bytes)} | {time_ratio} |")  # fmt: skip
    lines += ["", f"Gradient: {g.flops / 1e9:.2f} GFLOP, {g.calls} ops ({g.kernels} computing), "
              f"{g.bytes / 2**20:.0f} MiB of new outputs"
              + (f", {1e3 * gt:.1f} ms (median)." if timed else " (meta device: not timed)."),
              "Not given FLOPs by FlopCounterMode (most frequent computing ops of the cached "
              "product): " + ", ".join(f"`{o}`" for o in uncounted(rows_by(run, "cached (")))
              + ".", ""]  # fmt: skip
    cached, func = rows_by(run, "cached ("), rows_by(run, "func")
    ops = [o for o, _ in cached.by_op.most_common(15)]
    ops += [o for o, _ in g.by_op.most_common(15) if o not in ops]
    lines += ["Computing ops by aten op (count, MiB of new outputs, FLOPs), the top 15 of the cached "
              "product and of the gradient:", "",
              "| aten op | FLOPs counted | gradient | cached product | func product |",
              "|---|---|---|---|---|"]  # fmt: skip

    def cell(c, o):
        flops = f", {c.flops_by_op[o] / 1e9:.1f} GFLOP" if c.flops_by_op[o] else ""
        return f"{c.by_op[o]:.0f}, {c.bytes_by_op[o] / 2**20:.0f}{flops}"

    for o in ops:
        counted = "yes" if o in FLOP_OPS else ""
        lines.append(f"| `{o}` | {counted} | {cell(g, o)} | {cell(cached, o)} | {cell(func, o)} |")
    nodes = [n for n, _ in cached.by_node.most_common(12)]
    lines += ["", "Computing ops by the autograd node running them (\"forward\": outside a "
              "backward), count and MiB of new outputs:", "",
              "| node (layer type) | gradient | cached product |", "|---|---|---|"]  # fmt: skip
    for n in nodes + [n for n, _ in g.by_node.most_common(6) if n not in nodes]:
        lines.append(f"| `{n}` | {g.by_node[n]:.0f}, {g.bytes_by_node[n] / 2**20:.0f} | "
                     f"{cached.by_node[n]:.0f}, {cached.bytes_by_node[n] / 2**20:.0f} |")  # fmt: skip
    if cached.conv_calls:
        replay = run.get("conv_ms", {})
        lines += ["", "`aten.convolution` calls by kernel size (calls, GFLOP"
                  + (", ms replayed alone on the device" if replay else "") + "):", "",
                  "| kernel | gradient | cached product | func product |", "|---|---|---|---|"]  # fmt: skip

        def conv(c, label, k):
            ms = replay.get(label, {}).get(k)
            ms = f", {ms:.1f} ms" if ms is not None else ""
            return f"{c.conv_calls[k]:.0f}, {c.conv_flops[k] / 1e9:.1f}{ms}"

        keys = sorted({*g.conv_calls, *cached.conv_calls, *func.conv_calls})
        for k in keys:
            lines.append(f"| {k} | {conv(g, 'gradient', k)} | {conv(cached, 'cached', k)} | "
                         f"{conv(func, 'func', k)} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def rows_by(run: dict, prefix: str):
    """The census of the first row whose label starts with ``prefix``."""
    return next(r["census"] for r in run["rows"] if r["label"].startswith(prefix))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller CPU batches, fewer repeats")
    p.add_argument("--tiny", action="store_true", help="tiny models for a test of the script")
    p.add_argument("--runs", default=None, help="size:device pairs, e.g. small:cpu,h200:meta")
    p.add_argument("--models", default="resnet18,gpt")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of a single product")
    p.add_argument("--out", default=None, help="folder for product_profile.json and .md")
    args = p.parse_args(argv)
    default = "small:cpu" if args.quick or args.tiny else "small:cpu,h200:meta"
    default = "h200:cuda" if torch.cuda.is_available() else default
    runs = [r.split(":") for r in (args.runs or default).split(",")]
    repeats = args.repeats or (3 if args.quick else 5)
    block_repeats = 1 if args.quick or args.tiny else 3
    md = [f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "") + "\n"]  # fmt: skip
    out = []
    start = time.perf_counter()
    for size, device in runs:
        if size == "small" and (args.quick or args.tiny):
            size = "tiny" if args.tiny else "quick"
        for key in args.models.split(","):
            run = measure(key, size, torch.device(device), repeats, block_repeats)
            out.append(run)
            md.append(tables(run))
            print(md[-1], flush=True)
    md.append(f"Total {time.perf_counter() - start:.0f} s.")
    print(md[-1])
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "product_profile.md").write_text("\n".join(md))
        for run in out:
            for r in run["rows"]:
                r["census"] = r["census"].summary()
        meta = dict(
            torch=torch.__version__, threads=torch.get_num_threads(), argv=argv or sys.argv[1:]
        )
        (folder / "product_profile.json").write_text(
            json.dumps(dict(meta=meta, runs=out), indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
