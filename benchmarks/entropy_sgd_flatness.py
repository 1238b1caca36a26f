"""Does Entropy-SGD find flatter minima than SGD? Compared at EQUAL training loss.

Each optimizer trains a small MLP on scikit-learn's digits until the training loss (over the
whole training set, at the anchor x for Entropy-SGD) first reaches ``--target``; then, at those
weights, in float64:

- λ_max and the trace of the Hessian of the training loss (one shared Lanczos run,
  :func:`lightning_landscape.curvature.analyze` on a :class:`HessianOperator`);
- SAM ρ-sharpness, max over ‖ε‖ ≤ ρ of L(w + ε) − L(w), and its scale-invariant variant ASAM
  (max over ‖ε / (|w| + 0.01)‖ ≤ ρ) (:mod:`lightning_landscape.landscape.sharpness`);
- local entropy log E over w' ~ N(w, I/γ) of exp(−β (L(w') − L(w))) (Chaudhari et al. 2017,
  eq. 3, relative to a flat landscape), when ``lightning_landscape.landscape.sharpness`` has a
  ``local_entropy`` function (the column is left out otherwise);
- the weight norm and the accuracy on held-out digits.

Comparing at a fixed budget instead would compare a less trained network with a more trained one
(a higher point of the landscape is sharper). The training loop is plain torch (EntropySGD is a
``torch.optim.Optimizer``): the loss is checked every ``L`` steps, where the parameters hold x.

    python benchmarks/entropy_sgd_flatness.py [--seeds 3] [--target 0.01] [--threads 1]

Prints a markdown table: mean ± std over the seeds that reached the target.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call

from lightning_landscape import EntropySGD
from lightning_landscape.curvature import HessianOperator, analyze
from lightning_landscape.landscape import sharpness

PAPER = dict(lr=1.0, momentum=0.9, nesterov=True, gamma=0.03, scoping=1e-3, sgld_lr=0.1,
             noise=1e-4, alpha=0.75)  # fmt: skip
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD (lr 0.1, momentum 0.9)": ("sgd", dict(lr=0.1, momentum=0.9)),
    "Entropy-SGD, L = 5": ("esgd", dict(PAPER, L=5)),
    "Entropy-SGD, L = 20": ("esgd", dict(PAPER, L=20)),
    "Entropy-SGD, L = 5, Langevin Nesterov 0.9": (
        "esgd",
        dict(PAPER, L=5, langevin_momentum=0.9, langevin_nesterov=True),
    ),
    "Entropy-SGD, L = 5, as the reference code": (
        "esgd",
        dict(
            PAPER,
            L=5,
            langevin_momentum=0.9,
            langevin_nesterov=True,
            noise_scale="sqrt_2lr",
            alpha_weights="old",
        ),
    ),  # fmt: skip
    "Entropy-SGD, L = 5, the paper's outer step γ(x − μ)": (
        "esgd",
        dict(PAPER, L=5, outer_gamma=True),
    ),
}


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train_to_target(kind, kwargs, seed, train, target, max_grads) -> tuple[nn.Module, int | None]:
    """Train until the full training loss first reaches ``target``; return the model and the
    number of gradients spent (None if ``max_grads`` ran out first)."""
    x, y = train
    model = mlp(seed)
    if kind == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), **kwargs)
        check_every = 5
    else:
        opt = EntropySGD(model.parameters(), seed=seed, **kwargs)
        check_every = kwargs["L"]  # every outer step: the parameters hold x
    gen = torch.Generator().manual_seed(seed)
    step = 0
    while step < max_grads:
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if step % check_every == 0:
                with torch.no_grad():
                    loss = F.cross_entropy(model(x), y).item()
                if not math.isfinite(loss):
                    return model, None
                if loss <= target:
                    return model, step
            if step >= max_grads:
                break
    return model, None


def find_local_entropy():
    """The local-entropy estimator of ``landscape.sharpness`` if it exists, else None."""
    for name in ("local_entropy", "local_entropy_estimate"):
        fn = getattr(sharpness, name, None)
        if callable(fn):
            return fn
    return None


def call_local_entropy(fn, objective, w, gamma, beta, seed) -> float:
    accepted = inspect.signature(fn).parameters
    options = dict(gamma=gamma, beta=beta, generator=torch.Generator().manual_seed(seed))
    result = fn(objective, w, **{k: v for k, v in options.items() if k in accepted})
    if isinstance(result, (int, float)):
        return float(result)
    for attr in ("local_entropy", "value", "estimate", "entropy"):
        if hasattr(result, attr):
            return float(getattr(result, attr))
    raise TypeError(f"cannot read a value from {type(result).__name__}")


def measure(model, train, test, args, local_entropy) -> dict[str, float]:
    model = copy.deepcopy(model).double()
    x, y = train[0].double(), train[1]
    params = dict(model.named_parameters())
    names = list(params)
    shapes = [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    w = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_at(flat: torch.Tensor) -> torch.Tensor:
        moved = {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes, strict=True)}
        return F.cross_entropy(functional_call(model, moved, (x,)), y)

    batches = list(zip(x.split(360), y.split(360), strict=True))
    with HessianOperator(lambda b: F.cross_entropy(model(b[0]), b[1]), model, batches) as op:
        result = analyze(op, top_k=1, trace=True, trace_probes=args.trace_probes, seed=0)
    sam = sharpness.sam_sharpness(sharpness.FunctionObjective(loss_at), w, args.rho)
    asam = sharpness.adaptive_sharpness(sharpness.FunctionObjective(loss_at), w, args.asam_rho)
    with torch.no_grad():
        acc = (model(test[0].double()).argmax(1) == test[1]).double().mean().item()
    out = {
        "lambda_max": float(result.top.eigenvalues[0]),
        "trace": result.trace.estimate,
        "sam": sam.sharpness,
        "asam": asam.sharpness,
        "norm": float(w.norm()),
        "test_acc": acc,
    }
    if local_entropy is not None:
        objective = sharpness.FunctionObjective(loss_at)
        out["local_entropy"] = call_local_entropy(
            local_entropy, objective, w, args.le_gamma, args.le_beta, seed=0
        )
    return out


def cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(spread, fmt)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.01, help="training loss to reach")
    parser.add_argument("--max-grads", type=int, default=20_000)
    parser.add_argument("--rho", type=float, default=0.1, help="SAM radius")
    parser.add_argument("--asam-rho", type=float, default=0.05, help="ASAM radius (η = 0.01)")
    parser.add_argument("--le-gamma", type=float, default=1000.0, help="local entropy γ")
    parser.add_argument("--le-beta", type=float, default=1.0, help="local entropy β")
    parser.add_argument("--trace-probes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = digits()
    local_entropy = find_local_entropy()
    if local_entropy is None:
        print(
            "(no local-entropy estimator in landscape.sharpness: column left out)", file=sys.stderr
        )

    rows = []
    start = time.perf_counter()
    for label, (kind, kwargs) in CONFIGS.items():
        runs, grads, missed = [], [], 0
        for seed in range(args.seeds):
            model, spent = train_to_target(kind, kwargs, seed, train, args.target, args.max_grads)
            if spent is None:
                missed += 1
                continue
            grads.append(spent)
            try:
                runs.append(measure(model, train, test, args, local_entropy))
            except Exception as err:  # an estimator the parallel helper is still shaping
                if local_entropy is None:
                    raise
                print(f"(local entropy failed: {err!r}; column left out)", file=sys.stderr)
                local_entropy = None
                runs.append(measure(model, train, test, args, None))
        rows.append((label, grads, runs, missed))
        print(f"  {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)

    columns = [("λ_max", "lambda_max", ".2f"), ("trace", "trace", ".1f"),
               (f"SAM (ρ = {args.rho:g})", "sam", ".4f"),
               (f"ASAM (ρ = {args.asam_rho:g})", "asam", ".4f")]  # fmt: skip
    if any("local_entropy" in r for _, _, runs, _ in rows for r in runs):
        label = f"local entropy (γ = {args.le_gamma:g}, β = {args.le_beta:g})"
        columns.append((label, "local_entropy", ".4f"))
    columns += [("‖w‖", "norm", ".2f"), ("test accuracy", "test_acc", ".3f")]
    print(
        f"\nDigits, MLP 64-64-10 (4,810 parameters), batch 64, trained until the training loss "
        f"first reaches {args.target:g}; mean ± std over seeds 0..{args.seeds - 1}. Entropy-SGD: "
        f"lr 1, Nesterov 0.9, γ₀ 0.03, scoping 1e-3, η' 0.1, ε 1e-4, α 0.75 (package defaults "
        f"otherwise). {time.perf_counter() - start:.0f} s, {args.threads} thread(s).\n"
    )
    print("| optimizer | gradients to target | " + " | ".join(c[0] for c in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for label, grads, runs, missed in rows:
        reached = f"{cell([float(g) for g in grads], '.0f')}"
        if missed:
            reached += f" ({missed} of {args.seeds} never reached it)"
        values = [cell([r[key] for r in runs], fmt) for _, key, fmt in columns]
        print(f"| {label} | {reached} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
