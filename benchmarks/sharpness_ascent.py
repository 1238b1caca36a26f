"""Worst-case sharpness ascents against exact maxima (REFERENCES.md §10), and their cost.

(a) SAM on quadratics ½(w − w*)ᵀH(w − w*), H = Q diag(λ) Qᵀ in random orthonormal bases Q,
    relative underestimate of the exact ball maximum (ρ² max(λ_max, 0)/2 at w*, the dense
    trust-region maximum elsewhere), median (worst) over the bases.
(b) ASAM with T = |w| + η on H = T⁻¹ Q diag(λ) Qᵀ T⁻¹ (so T H T has the spectrum λ).
(c) Keskar's box: a Hadamard construction with a closed form, and random bases by brute force
    over the 2^20 corners.
(d) A digits MLP (sklearn ``load_digits``): values, the first-order share ρ‖g‖ / SAM, and time.

    python benchmarks/sharpness_ascent.py            # about 45 s of CPU on one thread
    python benchmarks/sharpness_ascent.py --quick    # fewer bases, about 20 s
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from lightning_landscape._core.random import make_generator
from lightning_landscape._core.vectors import ParamVector
from lightning_landscape.landscape._ascent import ball_ascent
from lightning_landscape.landscape._trust_region import ball_max_dense
from lightning_landscape.landscape.sharpness import (
    BatchObjective,
    FunctionObjective,
    adaptive_sharpness,
    curvature_model,
    keskar_sharpness,
    sam_sharpness,
)

D = torch.float64
LIN = torch.linspace(0.1, 4.0, 20, dtype=D)


def basis(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=D))[0]


def quadratic(h: torch.Tensor, w_star: torch.Tensor):
    return FunctionObjective(lambda w: 0.5 * (w - w_star) @ h @ (w - w_star))


def power_iteration(obj, w, rho, steps, gen):
    """The pure normalized step δ ← ρ ∇L(w+δ)/‖∇L(w+δ)‖ (a power iteration at a minimum)."""
    loss0, g = obj.value_and_grad(w)
    d = g if g.norm() > 0 else torch.randn(w.shape, generator=gen, dtype=D)
    delta, best = rho * d / d.norm(), -math.inf
    for _ in range(steps - 1):
        loss, g = obj.value_and_grad(w + delta)
        best = max(best, loss)
        delta = rho * g / g.norm()
    return max(best, obj.value(w + delta)) - loss0


def eigenvector_start(obj, w, rho, steps, gen):
    """ρ times the top Ritz vector of ``steps`` Lanczos steps from a random start (the sign along
    g), then the same 10 polish steps as the Krylov default."""
    loss0, g = obj.value_and_grad(w)
    model = curvature_model(obj, w, torch.zeros_like(w), steps=steps, generator=gen)
    delta, _ = model.ball_max(rho)  # no linear term: ρ v_top
    delta = -delta if float(g @ delta) < 0 else delta
    return ball_ascent(obj, w, rho, lambda d: d, delta, 10, gen)[0] - loss0


def summary(errors: list[float]) -> str:
    def fmt(x: float) -> str:
        return f"{100 * x:.2g} %" if abs(x) >= 1e-4 else f"{x:.0e}"

    return f"{fmt(statistics.median(errors))} ({fmt(max(errors))})"


def sam_table(spectra, bases: int, rho: float = 0.1) -> None:
    print("\n(a) SAM, relative underestimate, median (worst) over", bases, "bases")
    methods = [("projected gradient", "gradient", 10), ("projected gradient", "gradient", 20)]
    methods += [("power iteration", "power", 10), ("power iteration", "power", 20)]
    methods += [("top eigenvector", "eigenvector", 20)]
    methods += [("Krylov", "krylov", k) for k in (10, 15, 20)]
    names = [
        f"{a} {k}" + (" + 10 polish" if m in ("krylov", "eigenvector") else "")
        for a, m, k in methods
    ]
    print("| spectrum | point | " + " | ".join(names) + " |")
    print("|---" * (len(methods) + 2) + "|")
    for name, lam, offset in spectra:
        errors: dict[int, list[float]] = {i: [] for i in range(len(methods))}
        for seed in range(bases):
            d = len(lam)
            h = basis(d, seed) @ torch.diag(lam) @ basis(d, seed).T
            g = torch.Generator().manual_seed(1000 + seed)
            w_star = torch.randn(d, generator=g, dtype=D)
            w = w_star + offset * torch.randn(d, generator=g, dtype=D)
            truth = ball_max_dense(h, h @ (w - w_star), rho)[1]
            for i, (_, method, k) in enumerate(methods):
                gen, obj = make_generator(seed, "bench"), quadratic(h, w_star)
                if method == "power":
                    value = power_iteration(obj, w, rho, k, gen)
                elif method == "eigenvector":
                    value = eigenvector_start(obj, w, rho, k, gen)
                else:
                    value = sam_sharpness(obj, w, rho, steps=k, method=method, generator=gen)
                    value = value.sharpness
                errors[i].append((truth - value) / truth)
        cells = " | ".join(summary(errors[i]) for i in range(len(methods)))
        print(f"| {name} | {'minimum' if offset == 0 else f'w* + {offset} z'} | {cells} |")


def asam_table(bases: int, rho: float = 0.5, eta: float = 0.01) -> None:
    print("\n(b) ASAM at the minimum, T H T = Q diag(linspace(0.1, 4, 20)) Qᵀ, T = |w*| + η")
    rows = {("gradient", 10): [], ("krylov", 20): []}
    for seed in range(bases):
        w_star = torch.randn(20, generator=torch.Generator().manual_seed(seed), dtype=D)
        t = w_star.abs() + eta
        q = basis(20, seed)
        h = (q @ torch.diag(LIN) @ q.T) / t[:, None] / t[None, :]
        truth = rho**2 * float(LIN.max()) / 2
        for method, k in rows:
            res = adaptive_sharpness(
                quadratic(h, w_star),
                w_star,
                rho,
                eta=eta,
                steps=k,
                method=method,
                generator=make_generator(seed, "bench"),
            )
            rows[(method, k)].append((truth - res.sharpness) / truth)
    for (method, k), errs in rows.items():
        print(f"| {method} {k} | {summary(errs)} |")


def paley_hadamard() -> torch.Tensor:
    """A 20 x 20 Hadamard matrix (Paley's construction from the residues mod 19)."""
    q = 19
    residues = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if i in residues else -1 for i in range(1, q)]
    jac = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=D)
    core = torch.zeros(q + 1, q + 1, dtype=D)
    core[0, 1:], core[1:, 0], core[1:, 1:] = 1.0, -1.0, jac
    return core + torch.eye(q + 1, dtype=D)


def brute_box(m: torch.Tensor, b: torch.Tensor) -> float:
    d, best = m.shape[0], -math.inf
    for lo in range(0, 2**d, 2**16):
        idx = torch.arange(lo, min(lo + 2**16, 2**d))
        s = ((idx[:, None] >> torch.arange(d)) & 1).to(D) * 2 - 1
        best = max(best, float((s @ b + 0.5 * ((s @ m) * s).sum(1)).max()))
    return best


def keskar_table(bases: int, eps: float = 1e-3) -> None:
    print("\n(c) Keskar, relative underestimate of the box maximum, median (worst)")
    had = paley_hadamard() / math.sqrt(20)
    rows: dict[tuple[str, str], list[float]] = {}
    for seed in range(bases):
        g = torch.Generator().manual_seed(seed)
        w_star = torch.randn(20, generator=g, dtype=D)
        k = w_star.abs() + 1
        perm = torch.randperm(20, generator=g)
        signs = torch.randint(0, 2, (20,), generator=g).to(D) * 2 - 1
        q_had = had[:, perm] * signs[:, None]
        cases = {
            "Hadamard (closed form)": q_had @ torch.diag(LIN) @ q_had.T,
            "random basis (brute force)": basis(20, seed) @ torch.diag(LIN) @ basis(20, seed).T,
        }
        for case, m in cases.items():
            h = m / k[:, None] / k[None, :]  # K H K = m
            if case.startswith("Hadamard"):
                truth = 0.5 * eps**2 * 20 * float(LIN.max())
            else:
                truth = eps**2 * brute_box(m, torch.zeros(20, dtype=D))
            truth = 100 * truth  # L(w*) = 0
            for method in ("gradient", "krylov"):
                res = keskar_sharpness(
                    quadratic(h, w_star),
                    w_star,
                    eps,
                    method=method,
                    generator=make_generator(seed, "bench"),
                )
                rows.setdefault((case, method), []).append((truth - res.sharpness) / truth)
    for (case, method), errs in rows.items():
        print(f"| {case} | {method} (defaults) | {summary(errs)} |")


def digits_table(seeds: int) -> None:
    from sklearn.datasets import load_digits
    from torch import nn

    print("\n(d) digits MLP 64-32-10 (tanh, 2,410 parameters), full-batch Adam lr 1e-2 for 100 or")
    print(
        "600 steps; SAM on 4 batches of 256 at ρ = 0.05, 0.1, 0.2, 0.5; underestimate of the best"
    )
    print("found (Krylov 60 + 100 polish, or 100 gradient steps), median (worst) over seeds x ρ")
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=D), torch.tensor(y)
    methods = [("gradient", 10, 0), ("gradient", 20, 0)]
    methods += [("krylov", 20, p) for p in (0, 5, 10)]
    for iters in (100, 600):
        errors: dict[int, list[float]] = {i: [] for i in range(len(methods))}
        costs: dict[int, tuple[int, int, int, float]] = {}
        shares = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            for _ in range(iters):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
            batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 1024, 256)]
            pv = ParamVector(list(net.parameters()))

            def loss_fn(batch, net=net):
                return nn.functional.cross_entropy(net(batch[0]), batch[1])

            w = pv.get()
            for rho in (0.05, 0.1, 0.2, 0.5):
                obj = BatchObjective(loss_fn, pv, batches, distributed=False)
                best = sam_sharpness(obj, w, rho, steps=60, polish=100)
                ref = max(
                    best.sharpness,
                    sam_sharpness(obj, w, rho, steps=100, method="gradient").sharpness,
                )
                shares.append(best.first_order / ref)
                for i, (method, steps, polish) in enumerate(methods):
                    obj = BatchObjective(loss_fn, pv, batches, distributed=False)
                    start = time.perf_counter()
                    res = sam_sharpness(obj, w, rho, steps=steps, method=method, polish=polish)
                    sec = time.perf_counter() - start
                    errors[i].append((ref - res.sharpness) / ref)
                    costs[i] = (res.num_forward, res.num_backward, res.num_hvp, sec)
        print(f"\nafter {iters} steps: ρ‖g‖ / SAM median {statistics.median(shares):.2f}")
        print("| ascent | underestimate | passes per call (fwd, bwd, hvp) | time per call |")
        print("|---|---|---|---|")
        for i, (method, steps, polish) in enumerate(methods):
            fwd, bwd, hvp, sec = costs[i]
            name = f"{method} {steps}" + (f" + {polish} polish" if method == "krylov" else "")
            print(f"| {name} | {summary(errors[i])} | {fwd}, {bwd}, {hvp} | {1000 * sec:.0f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bases = 5 if args.quick else 20
    g = torch.Generator().manual_seed(0)
    bulk = (torch.rand(180, generator=g, dtype=D) * 0.1).tolist()
    spectra = [
        ("linspace(0.1, 4, 20)", LIN, 0.0),
        ("linspace(0.1, 4, 20)", LIN, 0.01),
        ("linspace(0.1, 4, 20)", LIN, 0.1),
        ("−6 and linspace(0.1, 4, 19)", torch.tensor([-6.0, *LIN[1:].tolist()], dtype=D), 0.0),
        (
            "linspace(0.1, 4, 20) + 180 in [0, 0.1]",
            torch.tensor([*LIN.tolist(), *bulk], dtype=D),
            0.0,
        ),
    ]
    sam_table(spectra, bases)
    asam_table(bases)
    keskar_table(bases)
    digits_table(1 if args.quick else 3)


if __name__ == "__main__":
    main()
