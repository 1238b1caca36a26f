"""Local entropy estimators against the closed form (REFERENCES.md §8).

On ½(w − w*)ᵀH(w − w*), H = Q diag(linspace(0.1, 4, 20)) Qᵀ, β = 1, F(w; γ) =
−½ Σ log(1 + λᵢ/γ) + ½ gᵀ(γI + H)⁻¹g.

(a) Monte Carlo log-mean-exp (``lightning_landscape.landscape.local_entropy``: antithetic pairs,
    delta-method stderr and bias correction) against plain Monte Carlo, at equal losses.
(b) Thermodynamic integration over γ: F(γ) = F(γ_hi) + ½ ∫ (γ' E‖u‖² − P) d log γ' from γ to
    γ_hi = 32, E under the local Gibbs measure exp(−β ΔL(w+u) − γ'‖u‖²/2) sampled by MALA (8
    Gauss-Legendre nodes, 40 burn-in + 150 steps each, step size adapted to 57 % acceptance),
    F(γ_hi) by (a); against (a) with the same number of forward passes.

    python benchmarks/local_entropy.py            # about 60 s on one CPU thread
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch

from lightning_landscape._core.random import make_generator
from lightning_landscape.landscape.local_entropy import local_entropy
from lightning_landscape.landscape.sharpness import FunctionObjective

D = torch.float64
P = 20
LAM = torch.linspace(0.1, 4.0, P, dtype=D)
Q = torch.linalg.qr(torch.randn(P, P, generator=torch.Generator().manual_seed(0), dtype=D))[0]
H = Q @ torch.diag(LAM) @ Q.T
W_STAR = torch.randn(P, generator=torch.Generator().manual_seed(1), dtype=D)


def loss(w: torch.Tensor) -> torch.Tensor:
    return 0.5 * (w - W_STAR) @ H @ (w - W_STAR) + 0.3


def closed_form(w: torch.Tensor, gamma: float) -> float:
    g = H @ (w - W_STAR)
    quad = g @ torch.linalg.solve(gamma * torch.eye(P, dtype=D) + H, g)
    return float(-0.5 * torch.log1p(LAM / gamma).sum() + 0.5 * quad)


def plain_mc(w: torch.Tensor, gamma: float, n: int, gen: torch.Generator) -> float:
    l0 = float(loss(w))
    a = torch.tensor(
        [
            -(float(loss(w + torch.randn(P, generator=gen, dtype=D) / math.sqrt(gamma))) - l0)
            for _ in range(n)
        ]
    )
    return float(torch.logsumexp(a, 0) - math.log(n))


def mc_table(repeats: int = 40, losses: int = 512) -> None:
    print(
        f"(a) {losses} losses, {repeats} repeats: bias, sd, mean reported stderr, 3-stderr coverage"
    )
    print(
        "| point | γ | F | antithetic bias | sd | stderr | coverage | effective | plain bias | sd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    w_off = W_STAR + 0.2 * torch.randn(P, generator=torch.Generator().manual_seed(2), dtype=D)
    for name, w in (("minimum", W_STAR), ("w* + 0.2 z", w_off)):
        for gamma in (2.0, 4.0, 8.0, 16.0, 32.0):
            truth = closed_form(w, gamma)
            anti, se, ess, plain = [], [], [], []
            for r in range(repeats):
                res = local_entropy(
                    FunctionObjective(loss),
                    w,
                    gamma,
                    samples=losses // 2,
                    generator=make_generator(r, "anti"),
                )
                anti.append(res.estimate - truth)
                se.append(res.stderr)
                ess.append(res.effective_samples)
                plain.append(plain_mc(w, gamma, losses, make_generator(r, "plain")) - truth)
            cover = sum(abs(e) < 3 * s for e, s in zip(anti, se, strict=True)) / repeats
            print(
                f"| {name} | {gamma:g} | {truth:.3f} | {statistics.mean(anti):+.4f} | "
                f"{statistics.pstdev(anti):.4f} | {statistics.mean(se):.4f} | {cover:.2f} | "
                f"{statistics.mean(ess):.0f} / {losses // 2} | {statistics.mean(plain):+.4f} | "
                f"{statistics.pstdev(plain):.4f} |"
            )


def mala_mean_square(obj, w, l0, gamma, burn, steps, gen) -> float:
    """E‖u‖² under exp(−(L(w+u) − L(w)) − γ‖u‖²/2), by MALA (β = 1)."""

    def target(u):
        value, grad = obj.value_and_grad(w + u)
        return -(value - l0) - 0.5 * gamma * float(u @ u), -grad - gamma * u

    u = torch.randn(P, generator=gen, dtype=D) / math.sqrt(gamma)
    logp, grad = target(u)
    log_h, kept = math.log(0.5 / gamma), []
    for k in range(burn + steps):
        h = math.exp(log_h)
        prop = u + h * grad + math.sqrt(2 * h) * torch.randn(P, generator=gen, dtype=D)
        logp2, grad2 = target(prop)
        forward = -float(((prop - u - h * grad) ** 2).sum()) / (4 * h)
        backward = -float(((u - prop - h * grad2) ** 2).sum()) / (4 * h)
        accept = math.exp(min(0.0, logp2 - logp + backward - forward))
        if float(torch.rand(1, generator=gen, dtype=D)) < accept:
            u, logp, grad = prop, logp2, grad2
        if k < burn:
            log_h += 0.2 * (accept - 0.57)
        else:
            kept.append(float(u @ u))
    return statistics.mean(kept)


def ti_table(repeats: int = 10, gamma_hi: float = 32.0, nodes: int = 8) -> None:
    print("\n(b) thermodynamic integration (MALA) against (a) at equal forward passes")
    print("| γ | F | TI bias | sd | forward, backward | MC bias | sd | stderr | effective |")
    print("|---|---|---|---|---|---|---|---|---|")
    x, weights = np.polynomial.legendre.leggauss(nodes)
    for gamma in (0.5, 1.0, 2.0):
        truth = closed_form(W_STAR, gamma)
        ti, mc, se, ess = [], [], [], []
        for r in range(repeats):
            obj = FunctionObjective(loss)
            l0 = obj.value(W_STAR)
            top = local_entropy(
                obj, W_STAR, gamma_hi, samples=64, generator=make_generator(r, "hi"), base_loss=l0
            )
            a, b = math.log(gamma), math.log(gamma_hi)
            total, gen = 0.0, make_generator(r, "mala")
            for xi, wi in zip(x, weights, strict=True):
                g = math.exp((b - a) / 2 * xi + (a + b) / 2)
                total += (
                    wi * (b - a) / 2 * (g * mala_mean_square(obj, W_STAR, l0, g, 40, 150, gen) - P)
                )
            ti.append(top.estimate + 0.5 * total - truth)
            cost = (obj.num_forward, obj.num_backward)
            res = local_entropy(
                FunctionObjective(loss),
                W_STAR,
                gamma,
                samples=cost[0] // 2,
                generator=make_generator(r, "mc"),
            )
            mc.append(res.estimate - truth)
            se.append(res.stderr)
            ess.append(res.effective_samples)
        print(
            f"| {gamma:g} | {truth:.3f} | {statistics.mean(ti):+.3f} | {statistics.pstdev(ti):.3f} | "
            f"{cost[0]}, {cost[1]} | {statistics.mean(mc):+.3f} | {statistics.pstdev(mc):.3f} | "
            f"{statistics.mean(se):.3f} | {statistics.mean(ess):.0f} / {cost[0] // 2} |"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    mc_table()
    ti_table()
