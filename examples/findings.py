"""Seven findings of the loss-landscape literature, reproduced on sklearn's digits in minutes on a CPU.

Each finding trains a small network in plain torch and reads the landscape with this package's
pure-torch floor (the same engine the Lightning monitors run: :mod:`lightning_landscape.curvature`,
:mod:`lightning_landscape.landscape`, :class:`lightning_landscape.optim.EntropySGD`). It prints one
markdown table (finding, paper, what the paper says, what was measured here) and saves one PNG per
finding (``findings_<name>.png``) in ``--out`` (default ``landscape_figures/`` in the current
directory; the README's pictures: ``--out docs/``).

1. Edge of stability (Cohen et al. 2021): full-batch gradient descent sharpens until λ_max ≈ 2/η,
   then hovers there while the loss keeps falling, non-monotonically.
2. Outliers (Sagun et al. 2017; Papyan 2019): the Hessian of a trained C-class classifier has a
   bulk near zero and about C − 1 outliers (C = 10 here).
3. Saddles early (Dauphin et al. 2014): negative curvature is large at initialization and fades as
   training goes on (|λ_min| / λ_max falls).
4. Monotone interpolation (Goodfellow, Vinyals, Saxe 2015): the loss along the straight line from
   the initial to the final weights falls monotonically.
5. Batch size and learning rate (Keskar et al. 2017; Jastrzębski et al. 2018): at a fixed learning
   rate a large batch ends sharper; scaling the learning rate with the batch (linear scaling)
   removes the difference, or reverses it.
6. Entropy-SGD (Chaudhari et al. 2017) against SGD at equal training loss: λ_max, trace and test
   accuracy.
7. Adam's edge of stability (Cohen et al. 2022): with full-batch Adam the preconditioned
   sharpness λ_max(P⁻¹H) rises to (2 + 2β₁)/((1 − β₁)η) and hovers (``HessianMonitor``'s
   ``hessian/eos_ratio`` ≈ 1), while λ_max(H)·η/2 stays far below 1.

    python examples/findings.py             # full run, a few minutes on one CPU thread
    python examples/findings.py --quick     # reduced (CI): under a minute
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from torch import Tensor, nn

from lightning_landscape.curvature import HessianOperator, analyze, top_eigenvalues
from lightning_landscape.landscape.trajectory import interpolate, interpolation_alphas
from lightning_landscape.optim import EntropySGD, anchor_in_parameters


@dataclass
class Finding:
    name: str
    paper: str
    claim: str
    measured: str
    figure: Figure


# ----------------------------------------------------------------------------- data and models
def digits(n_train: int = 1200) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits scaled to [0, 1], a fixed shuffled split (train, test)."""
    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, y = X[order], y[order]
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def mlp(seed: int, width: int = 64, depth: int = 2) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), nn.Tanh()]
        fan_in = width
    return nn.Sequential(*layers, nn.Linear(fan_in, 10))


def ce_loss(model: nn.Module) -> Callable[[tuple[Tensor, Tensor]], Tensor]:
    return lambda b: F.cross_entropy(model(b[0]), b[1])


def fixed_batches(X: Tensor, y: Tensor, size: int = 300) -> list[tuple[Tensor, Tensor]]:
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]


def lam_max(model: nn.Module, loss, batches, k: int = 1, **kwargs) -> Tensor:
    op = HessianOperator(loss, model, batches, hvp="double_backward")
    return top_eigenvalues(op, k, tol=1e-4, seed=0, **kwargs).eigenvalues


@torch.no_grad()
def full_loss(model: nn.Module, X: Tensor, y: Tensor) -> float:
    return float(F.cross_entropy(model(X), y))


@torch.no_grad()
def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    return float((model(X).argmax(1) == y).float().mean())


def train_to(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    X: Tensor,
    y: Tensor,
    batch: int,
    target: float,
    max_epochs: int,
    seed: int,
) -> tuple[int, int]:
    """SGD-style epochs until the full training loss is below ``target``; (epochs, gradients)."""
    gen = torch.Generator().manual_seed(seed)
    grads = 0
    for epoch in range(1, max_epochs + 1):
        for idx in torch.randperm(len(X), generator=gen).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
            grads += 1
        with anchor_in_parameters([opt]):  # Entropy-SGD: the iterate x, not the sample x'
            done = full_loss(model, X, y) < target
        if done:
            return epoch, grads
    return max_epochs, grads


def _fig(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    return fig, ax


# ----------------------------------------------------------------------------- the findings
def edge_of_stability(quick: bool) -> Finding:
    """Full-batch GD, MSE on one-hot targets, tanh MLP: λ_max rises to 2/η and hovers."""
    X, y, _, _ = digits(1000)
    Y = F.one_hot(y, 10).float()
    model = mlp(0)
    lr, steps, every = (0.2, 600, 25) if quick else (0.1, 2000, 25)

    def loss(b):
        return 0.5 * ((model(b[0]) - b[1]) ** 2).sum(1).mean()

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rows = []
    for step in range(steps + 1):
        if step % every == 0:
            lam = float(lam_max(model, loss, [(X, Y)])[0])
            rows.append((step, lam, float(loss((X, Y)).detach())))
        opt.zero_grad()
        loss((X, Y)).backward()
        opt.step()
    s, lams, losses = (np.array(c) for c in zip(*rows, strict=True))
    late = lams[s >= s.max() / 2] * lr / 2
    fig, ax = _fig(f"Edge of stability: full-batch GD, η = {lr}")
    ax.plot(s, lams, color="tab:blue", label="λ_max(H)")
    ax.axhline(2 / lr, color="k", ls="--", lw=1, label="2/η")
    ax.set_xlabel("step")
    ax.set_ylabel("λ_max")
    ax2 = ax.twinx()
    ax2.plot(s, losses, color="tab:red", alpha=0.6, label="training loss")
    ax2.set_ylabel("loss", color="tab:red")
    ax.legend(loc="center right")
    return Finding(
        "edge_of_stability",
        "Cohen et al. 2021",
        "λ_max rises to 2/η and hovers there",
        f"λ_max·η/2: {lams[0] * lr / 2:.2f} at step 0, {late.min():.2f}-{late.max():.2f} "
        f"over the second half (steps {int(s.max()) // 2}-{int(s.max())})",
        fig,
    )


def trained_classifier(quick: bool, seed: int = 0):
    X, y, Xt, yt = digits()
    model = mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    snapshots = {0: [p.detach().clone() for p in model.parameters()]}
    epochs = 6 if quick else 30
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(X), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
        snapshots[epoch] = [p.detach().clone() for p in model.parameters()]
    return model, snapshots, (X, y, Xt, yt)


def outliers(quick: bool) -> Finding:
    """A wide ReLU MLP after a few epochs of plain SGD: the top of the spectrum."""
    X, y, _, _ = digits()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    train_to(model, opt, X, y, 32, 0.0, 5, 0)  # 5 epochs (the target 0 is never reached)
    batches = fixed_batches(X, y)
    op = HessianOperator(ce_loss(model), model, batches, hvp="double_backward")
    k = 14
    result = analyze(op, top_k=k, density=True, density_steps=60 if quick else 120, seed=0)
    eig = result.top.eigenvalues.double()
    gaps = (eig[:-1] / eig[1:]).numpy()
    big = int(np.argmax(gaps)) + 1  # number of eigenvalues above the largest relative gap
    grid = result.density.grid(600)
    dens = result.density.evaluate(grid).clamp(min=1e-10)
    fig, ax = _fig("Hessian eigenvalue density, 10-class ReLU MLP after 5 epochs (SLQ)")
    ax.semilogy(grid.numpy(), dens.numpy(), color="tab:blue")
    for v in eig[:big].tolist():
        ax.axvline(v, color="tab:red", lw=0.8, alpha=0.7)
    ax.set_xlabel("eigenvalue (red: the outliers above the largest gap)")
    ax.set_ylabel("density (log scale)")
    return Finding(
        "outliers",
        "Sagun et al. 2017; Papyan 2019",
        "a bulk near 0 and about C − 1 = 9 outliers",
        f"largest relative gap after eigenvalue {big} (λ_{big}/λ_{big + 1} = {gaps[big - 1]:.2f}); "
        f"top {big}: {eig[0]:.3g} … {eig[big - 1]:.3g}, bulk ≤ {eig[big]:.3g}",
        fig,
    )


def saddles(quick: bool, model, snapshots, data) -> Finding:
    X, y, _, _ = data
    batches = fixed_batches(X, y)
    epochs = sorted(snapshots)
    chosen = [e for e in epochs if e in {0, 1, 2, 3, 5, 10, 20, 30} or e == epochs[-1]]
    saved = [p.detach().clone() for p in model.parameters()]
    ratios = []
    try:
        for e in chosen:
            with torch.no_grad():
                for p, s in zip(model.parameters(), snapshots[e], strict=True):
                    p.copy_(s)
            top = float(lam_max(model, ce_loss(model), batches)[0])
            low = float(lam_max(model, ce_loss(model), batches, which="smallest")[0])
            ratios.append(-low / top)
    finally:
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s)
    fig, ax = _fig("Negative curvature during training")
    ax.plot(chosen, ratios, "o-", color="tab:purple")
    ax.set_xlabel("epoch")
    ax.set_ylabel("−λ_min / λ_max")
    return Finding(
        "saddles",
        "Dauphin et al. 2014",
        "strong negative curvature early, fading with training",
        "−λ_min/λ_max: "
        + ", ".join(f"{r:.3f} (ep {e})" for e, r in zip(chosen, ratios, strict=True)),
        fig,
    )


def interpolation(model, snapshots, data) -> Finding:
    X, y, _, _ = data
    params = list(model.parameters())
    flat = [torch.cat([t.reshape(-1) for t in snapshots[e]]) for e in (0, max(snapshots))]
    saved = [p.detach().clone() for p in params]

    def value(theta: Tensor) -> float:
        with torch.no_grad():
            offset = 0
            for p in params:
                p.copy_(theta[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
            return full_loss(model, X, y)

    try:
        curve = interpolate(value, flat[0], flat[1], interpolation_alphas(41, margin=0.0))
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    fig, ax = _fig("Loss on the line from the initial to the final weights")
    ax.plot(curve.alphas.numpy(), curve.values[:, 0].numpy(), color="tab:green")
    ax.set_xlabel("α (0 = initial, 1 = final)")
    ax.set_ylabel("training loss")
    return Finding(
        "interpolation",
        "Goodfellow, Vinyals, Saxe 2015",
        "the loss falls monotonically along the line",
        f"monotonic: {curve.monotonic}; barrier {curve.barrier:.2e}; "
        f"loss {float(curve.values[0, 0]):.3f} → {float(curve.values[-1, 0]):.4f}",
        fig,
    )


def batch_size(quick: bool) -> Finding:
    X, y, _, _ = digits()
    batches = fixed_batches(X, y)
    small, large, lr = 16, 128, 0.05
    runs = [(f"B={small}, η={lr}", small, lr), (f"B={large}, η={lr}", large, lr)]
    runs.append(
        (f"B={large}, η={lr * large / small:g} (linear scaling)", large, lr * large / small)
    )
    seeds = [0] if quick else [0, 1, 2]
    target = 0.3 if quick else 0.05
    values: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    for seed in seeds:
        for label, b, eta in runs:
            model = mlp(seed)
            opt = torch.optim.SGD(model.parameters(), lr=eta)
            train_to(model, opt, X, y, b, target, 400, seed)
            values[label].append(float(lam_max(model, ce_loss(model), batches)[0]))
    means = {k: float(np.mean(v)) for k, v in values.items()}
    fig, ax = _fig(f"λ_max at training loss {target} (mean over {len(seeds)} seeds)")
    ax.bar(range(len(means)), list(means.values()), color=["tab:blue", "tab:red", "tab:orange"])
    ax.set_xticks(range(len(means)), list(means), fontsize=7)
    ax.set_ylabel("λ_max")
    m = list(means.values())
    return Finding(
        "batch_size",
        "Keskar et al. 2017; Jastrzębski et al. 2018",
        "large batch sharper at fixed η; linear η scaling removes or reverses it",
        f"λ_max at loss {target}: B={small} {m[0]:.3g}, B={large} {m[1]:.3g} "
        f"({m[1] / m[0]:.2f}x), B={large} with η×{large // small} {m[2]:.3g} ({m[2] / m[0]:.2f}x)",
        fig,
    )


def entropy_sgd(quick: bool) -> Finding:
    X, y, Xt, yt = digits()
    batches = fixed_batches(X, y)
    seeds = [0] if quick else [0, 1, 2]
    target = 0.3 if quick else 0.05
    rows: dict[str, list[tuple[float, float, float, int]]] = {"SGD": [], "Entropy-SGD": []}
    for seed in seeds:
        for name in rows:
            model = mlp(seed)
            if name == "SGD":
                opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            else:  # the reference code's outer step (no γ on x − μ), paper's other settings
                opt = EntropySGD(
                    model.parameters(), lr=1.0, momentum=0.9, nesterov=True, L=5, gamma=0.03,
                    scoping=1e-3, sgld_lr=0.1, noise=1e-4, alpha=0.75, outer_gamma=False,
                    seed=seed,
                )  # fmt: skip
            _, grads = train_to(model, opt, X, y, 32, target, 300, seed)
            with anchor_in_parameters([opt]):
                op = HessianOperator(ce_loss(model), model, batches, hvp="double_backward")
                res = analyze(op, top_k=1, trace=True, trace_probes=20, seed=0)
                rows[name].append(
                    (
                        float(res.top.eigenvalues[0]),
                        res.trace.estimate,
                        accuracy(model, Xt, yt),
                        grads,
                    )
                )
    fig, ax = _fig(f"SGD vs Entropy-SGD at training loss {target}")
    names = list(rows)
    lam = [np.mean([r[0] for r in rows[n]]) for n in names]
    ax.bar(names, lam, color=["tab:blue", "tab:green"])
    ax.set_ylabel("λ_max")
    parts = []
    for n in names:
        r = np.array(rows[n])
        parts.append(
            f"{n}: λ_max {r[:, 0].mean():.3g}, trace {r[:, 1].mean():.3g}, "
            f"test acc {r[:, 2].mean():.3f}, {int(r[:, 3].mean())} gradients"
        )
    return Finding(
        "entropy_sgd",
        "Chaudhari et al. 2017",
        "Entropy-SGD finds wider (flatter) minima",
        "; ".join(parts),
        fig,
    )


def adam_edge_of_stability(quick: bool) -> Finding:
    """Full-batch Adam, MSE, tanh MLP, inside a Trainer with a HessianMonitor: the preconditioned
    sharpness over Adam's threshold, ``hessian/eos_ratio``, rises to about 1 and hovers."""
    import pytorch_lightning as pl

    from lightning_landscape import HessianMonitor

    X, y, _, _ = digits(1000)
    batch = (X, F.one_hot(y, 10).float())
    steps, every, lr = (600, 100, 1e-3) if quick else (3000, 100, 1e-3)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(0)

        def training_step(self, b, i):
            return F.mse_loss(self.net(b[0]), b[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=lr, betas=(0.9, 0.999))

    monitor = HessianMonitor(
        every_n_steps=every, dataloader=[batch], num_batches=1, trace=False, min_eigenvalue=False
    )
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=1, callbacks=[monitor], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )  # fmt: skip
    full = torch.utils.data.DataLoader(range(steps), batch_size=None, collate_fn=lambda _: batch)
    trainer.fit(Net(), train_dataloaders=full)  # every step on the full batch
    rows = [h for h in monitor.history if h["step"] > 0]
    s = np.array([h["step"] for h in rows])
    ratio = np.array([h["hessian/eos_ratio"] for h in rows])
    plain = np.array([h["hessian/eigenvalue_1"] * lr / 2 for h in rows])
    fig, ax = _fig(f"Adam at the edge of stability: full batch, η = {lr:g}")
    ax.plot(s, ratio, "o-", color="tab:blue", label="λ_max(P⁻¹H) / (38/η)  (hessian/eos_ratio)")
    ax.plot(s, plain, "s--", color="tab:gray", label="λ_max(H)·η/2 (the SGD reading)")
    ax.axhline(1.0, color="k", lw=1, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("ratio to the stability threshold")
    ax.legend(loc="center right", fontsize=8)
    late_steps = s >= min(800, s.max())
    late, first_late = ratio[late_steps], int(s[late_steps][0])
    if late.size > 1:
        late_text = f"{late.min():.2f}-{late.max():.2f} from step {first_late} to {int(s.max())}"
    else:  # the reduced run ends before step 800: one late point
        late_text = f"{late[0]:.2f} at step {first_late}"
    return Finding(
        "adam_edge_of_stability",
        "Cohen et al. 2022",
        "Adam's preconditioned sharpness rises to (2 + 2β₁)/((1 − β₁)η) and hovers",
        f"eos_ratio {ratio[0]:.2f} at step {int(s[0])}, {late_text}; "
        f"λ_max(H)·η/2 ≤ {plain.max():.3f}",
        fig,
    )


def main(argv: list[str] | None = None) -> list[Finding]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (CI)")
    parser.add_argument("--out", default="landscape_figures", help="folder for the PNGs")
    parser.add_argument("--only", nargs="*", default=None, help="names of findings to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    wanted = set(args.only) if args.only else None
    findings: list[Finding] = []

    def run(name: str, fn: Callable[[], Finding]) -> None:
        if wanted is not None and name not in wanted:
            return
        start = time.perf_counter()
        finding = fn()
        path = os.path.join(args.out, f"findings_{finding.name}.png")
        finding.figure.tight_layout()
        finding.figure.savefig(path, dpi=90)
        findings.append(finding)
        print(f"[{time.perf_counter() - start:5.1f} s] {name}: {finding.measured}", flush=True)

    run("edge_of_stability", lambda: edge_of_stability(args.quick))
    run("outliers", lambda: outliers(args.quick))
    if wanted is None or wanted & {"saddles", "interpolation"}:
        model, snapshots, data = trained_classifier(args.quick)
        run("saddles", lambda: saddles(args.quick, model, snapshots, data))
        run("interpolation", lambda: interpolation(model, snapshots, data))
    run("batch_size", lambda: batch_size(args.quick))
    run("entropy_sgd", lambda: entropy_sgd(args.quick))
    run("adam_edge_of_stability", lambda: adam_edge_of_stability(args.quick))
    print("\n| finding | paper | the paper says | measured here |\n|---|---|---|---|")
    for f in findings:
        print(f"| {f.name} | {f.paper} | {f.claim} | {f.measured} |")
    return findings


if __name__ == "__main__":
    main()
