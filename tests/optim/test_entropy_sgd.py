"""EntropySGD without Lightning: arguments, the two oracles of REFERENCES.md section 5, state."""

import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lightning_landscape import EntropySGD
from lightning_landscape.optim.entropy_sgd import EntropySGD as DirectEntropySGD

ROOT = Path(__file__).resolve().parents[2]


def _param(n=3, value=1.0):
    return torch.nn.Parameter(torch.full((n,), value, dtype=torch.float64))


# ---------------------------------------------------------------------------- arguments
def test_exported_from_the_top_level_and_the_subpackage():
    assert EntropySGD is DirectEntropySGD
    from lightning_landscape.optim import EntropySGD as FromOptim

    assert FromOptim is EntropySGD


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": -0.1}, ValueError, r"`lr` must be >= 0.0, got -0.1"),
        ({"lr": "1"}, TypeError, r"`lr` must be a real number, got '1'"),
        ({"momentum": 1.5}, ValueError, r"`momentum` must be <= 1.0, got 1.5"),
        ({"dampening": -1}, ValueError, r"`dampening` must be >= 0.0, got -1"),
        ({"weight_decay": -1e-4}, ValueError, r"`weight_decay` must be >= 0.0"),
        ({"nesterov": 1}, TypeError, r"`nesterov` must be a bool, got 1"),
        ({"nesterov": True}, ValueError, r"`nesterov=True` needs `momentum` > 0"),
        ({"L": 0}, ValueError, r"`L` must be a positive int, got 0"),
        ({"L": 2.5}, TypeError, r"`L` must be an int, got 2.5"),
        ({"gamma": 0.0}, ValueError, r"`gamma` must be positive, got 0.0"),
        ({"scoping": -1e-3}, ValueError, r"`scoping` must be >= 0.0"),
        ({"sgld_lr": 0}, ValueError, r"`sgld_lr` must be positive, got 0"),
        ({"noise": float("inf")}, ValueError, r"`noise` must be finite, got inf"),
        ({"alpha": 1.5}, ValueError, r"`alpha` must be <= 1.0, got 1.5"),
        ({"alpha": 0.0}, ValueError, r"`alpha=0.0` with `alpha_weights='new'`"),
        ({"alpha": 1.0, "alpha_weights": "old"}, ValueError, r"gives the new sample weight 0"),
        ({"noise_scale": "sqrt2"}, ValueError, r"`noise_scale` must be one of"),
        ({"alpha_weights": "mean"}, ValueError, r"`alpha_weights` must be one of"),
        ({"outer_gamma": "yes"}, TypeError, r"`outer_gamma` must be a bool, got 'yes'"),
        ({"mode": "inner"}, ValueError, r"`mode` must be one of \['batches', 'closure'\]"),
        ({"seed": None}, TypeError, r"`seed` must be an int, got None"),
        ({"gamma_max": 0.0}, ValueError, r"`gamma_max` must be positive, got 0.0"),
        ({"gamma": 0.5, "gamma_max": 0.1}, ValueError, r"`gamma`=0.5 exceeds `gamma_max`=0.1"),
        ({"gamma": 20.0}, ValueError, r"`gamma`=20.0 exceeds `gamma_max`=10.0 \(default"),
        (
            {"langevin_momentum": 1.0},
            ValueError,
            r"`langevin_momentum` must be in \[0, 1\), got 1.0",
        ),
        ({"langevin_nesterov": 1}, TypeError, r"`langevin_nesterov` must be a bool, got 1"),
        ({"langevin_nesterov": True}, ValueError, r"`langevin_nesterov=True` needs"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        EntropySGD([_param()], **kwargs)


def test_entropy_sgd_settings_in_a_parameter_group_are_refused():
    """They are one for all parameters: a group's sgld_lr was silently ignored."""
    a, b = _param(), _param()
    with pytest.raises(ValueError, match=r"takes L, sgld_lr for all .* sets L=5, sgld_lr=0.01"):
        EntropySGD([{"params": [a], "sgld_lr": 0.01, "L": 5}, {"params": [b]}])
    opt = EntropySGD([{"params": [a], "lr": 0.5, "weight_decay": 1e-4}], lr=1.0)  # SGD's: fine
    with pytest.raises(ValueError, match="takes gamma for all"):
        opt.add_param_group({"params": [b], "gamma": 1.0})


def test_closure_mode_refuses_a_missing_closure():
    opt = EntropySGD([_param()], mode="closure")
    with pytest.raises(RuntimeError, match=r"mode='closure'\) needs a closure"):
        opt.step()


def test_step_refuses_while_the_anchor_is_swapped_in():
    p = _param()
    opt = EntropySGD([p], L=3)
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.swap_in_anchor()
    with pytest.raises(RuntimeError, match=r"call `swap_out_anchor\(\)` before `step\(\)`"):
        opt.step()


def test_sparse_gradients_are_refused():
    p = _param()
    opt = EntropySGD([p])
    p.grad = torch.ones_like(p).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_load_state_dict_refuses_a_cycle_position_beyond_L():
    p = _param()
    opt = EntropySGD([p], L=5)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    state = opt.state_dict()
    with pytest.raises(ValueError, match=r"saved 3 Langevin steps into an outer step.*`L=2`"):
        EntropySGD([_param()], L=2).load_state_dict(state)


# ---------------------------------------------------------------------------- oracles
def test_quadratic_oracle_mean_and_variance():
    """f = h/2 x'^2, h=4, gamma=1, x=1, T=0.25, eta'=0.01: mean gamma x/(h+gamma) = 0.2 and
    variance T/((h+gamma)(1 - eta'(h+gamma)/2)) = 0.0513, both noise conventions at equal T."""
    h, gamma, temp, sgld_lr, L, chains = 4.0, 1.0, 0.25, 0.01, 600, 4000
    mean_true = gamma / (h + gamma)
    var_true = temp / ((h + gamma) * (1 - sgld_lr * (h + gamma) / 2))
    for noise_scale, noise in [("sqrt_lr", math.sqrt(2 * temp)), ("sqrt_2lr", math.sqrt(temp))]:
        x = torch.ones(chains, dtype=torch.float64, requires_grad=True)
        opt = EntropySGD(
            [x], lr=1.0, L=L, gamma=gamma, scoping=0.0, sgld_lr=sgld_lr, noise=noise,
            noise_scale=noise_scale, seed=0,
        )  # fmt: skip

        def closure(x=x):
            x.grad = h * x.detach()

        samples = []
        for _ in range(L - 1):
            opt.step(closure)
            samples.append(x.detach().clone())
        chain = torch.stack(samples[200:])  # (steps, chains), burn-in 200 >> 1/(eta'(h+gamma)) = 20
        # the chains are independent: per-chain averages give honest standard errors
        per_chain_mean = chain.mean(0)
        per_chain_var = ((chain - mean_true) ** 2).mean(0)
        mean_err = per_chain_mean.std() / chains**0.5
        var_err = per_chain_var.std() / chains**0.5
        assert abs(per_chain_mean.mean() - mean_true) < 4 * mean_err, per_chain_mean.mean()
        assert abs(per_chain_var.mean() - var_true) < 4 * var_err, per_chain_var.mean()
        assert abs(per_chain_var.mean() / var_true - 1) < 0.02
        opt.step(closure)  # the outer step: lr * gamma = 1 moves x to mu
        assert opt.outer_step == 1 and opt.inner_step == 0
        assert x.detach().mean().item() == pytest.approx(mean_true, abs=0.015)


def test_quadratic_oracle_without_noise_is_exact():
    h, gamma = 4.0, 1.0
    x = torch.ones(1, dtype=torch.float64, requires_grad=True)
    opt = EntropySGD([x], lr=1.0, L=600, gamma=gamma, scoping=0.0, sgld_lr=0.01, noise=0.0)

    def closure():
        x.grad = h * x.detach()

    for _ in range(600):
        opt.step(closure)
    # x <- x - lr * gamma * (x - <x'>) = gamma x / (h + gamma) with lr * gamma = 1
    assert x.item() == pytest.approx(gamma / (h + gamma), abs=1e-12)
    assert opt.anchor_distance.item() == pytest.approx(h / (h + gamma), abs=1e-12)


def _double_well_grad(x):
    s1, s2 = 0.08, 0.5
    sharp = (x / s1**2) * torch.exp(-(x**2) / (2 * s1**2))
    wide = 0.8 * ((x - 1.5) / s2**2) * torch.exp(-((x - 1.5) ** 2) / (2 * s2**2))
    return sharp + wide + 0.5 * (x - 0.75)


def _double_well_runs(make_optimizer, steps, runs=100, seed=1):
    """`runs` independent scalar chains from x0 = 0 as one (runs,) tensor; N(0, 1) noise on
    every gradient stands for mini-batch noise."""
    x = torch.zeros(runs, dtype=torch.float64, requires_grad=True)
    opt = make_optimizer([x])
    gen = torch.Generator().manual_seed(seed)

    def closure():
        x.grad = _double_well_grad(x.detach()) + torch.randn(runs, generator=gen, dtype=x.dtype)

    for _ in range(steps):
        opt.step(closure)
    return x.detach()


def test_double_well_oracle_entropy_sgd_ends_wide_sgd_does_not():
    """Sharp minimum x~0.003 (f''~156), wide x~1.397 (f''~3.5), barrier x~0.239. 300 outer steps
    of L=50, gamma 0.3 -> 9, eta'=0.01, T=0.5, alpha=0.25 on the new sample, lr 0.25 on x - mu."""
    barrier = 0.239
    final = _double_well_runs(
        lambda params: EntropySGD(
            params, lr=0.25, L=50, gamma=0.3, scoping=30 ** (1 / 300) - 1, sgld_lr=0.01,
            noise=1.0, noise_scale="sqrt_lr", alpha=0.25, outer_gamma=False, seed=0,
        ),
        steps=300 * 50,
    )  # fmt: skip
    assert (final > barrier).sum().item() >= 95
    assert final[final > barrier].mean().item() == pytest.approx(1.37, abs=0.1)
    sgd = _double_well_runs(lambda params: torch.optim.SGD(params, lr=0.01), steps=300 * 50)
    assert (sgd > barrier).sum().item() == 0


# ---------------------------------------------------------------------------- mechanics
def _quadratic_run(opt, p, steps, target):
    for _ in range(steps):

        def closure():
            p.grad = (p.detach() - target) * 2.0
            return ((p.detach() - target) ** 2).sum()

        opt.step(closure)


def test_mid_cycle_state_dict_resumes_bit_identically_and_restores_the_sample():
    kwargs = dict(lr=0.5, momentum=0.9, nesterov=True, L=4, gamma=0.5, sgld_lr=0.1, noise=0.1)
    target = torch.linspace(-1, 1, 5, dtype=torch.float64)
    p = _param(5, 0.0)
    opt = EntropySGD([p], **kwargs)
    _quadratic_run(opt, p, 10, target)  # 2 outer steps + 2 Langevin steps
    assert (opt.outer_step, opt.inner_step) == (2, 2)
    saved_p, saved_state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    _quadratic_run(opt, p, 9, target)

    q = _param(5, 123.0)  # the sample x' comes from the optimizer state
    resumed = EntropySGD([q], **kwargs)
    resumed.load_state_dict(saved_state)
    assert torch.equal(q.detach(), saved_p)
    assert "sample" not in resumed.state[q]
    _quadratic_run(resumed, q, 9, target)
    assert torch.equal(q.detach(), p.detach())
    assert (resumed.outer_step, resumed.inner_step) == (opt.outer_step, opt.inner_step)


def test_swap_in_and_out_and_state_dict_while_swapped():
    target = torch.zeros(4, dtype=torch.float64)
    p = _param(4, 1.0)
    opt = EntropySGD([p], L=3, noise=0.1, sgld_lr=0.1)
    assert opt.holds_anchor and not opt.swap_in_anchor()  # nothing to swap at a boundary
    _quadratic_run(opt, p, 2, target)
    sample, anchor = p.detach().clone(), opt.state[p]["anchor"].clone()
    assert torch.equal(anchor, torch.ones(4, dtype=torch.float64))
    assert torch.equal(opt.anchors()[0], anchor)
    assert opt.swap_in_anchor() and opt.holds_anchor
    assert torch.equal(p.detach(), anchor) and torch.equal(opt.anchors()[0], anchor)
    state = opt.state_dict()  # canonical even while swapped
    assert torch.equal(state["state"][0]["anchor"], anchor)
    assert torch.equal(state["state"][0]["sample"], sample)
    assert not opt.swap_in_anchor()
    assert opt.swap_out_anchor() and not opt.swap_out_anchor()
    assert torch.equal(p.detach(), sample)


def test_scheduler_reaches_the_outer_step_through_shared_param_groups():
    p = _param(2, 1.0)
    opt = EntropySGD([p], lr=1.0, L=2, noise=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    assert opt.base_optimizer.param_groups is opt.param_groups
    target = torch.zeros(2, dtype=torch.float64)
    for _ in range(3):
        _quadratic_run(opt, p, 1, target)
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.125
    resumed = EntropySGD([_param(2)], lr=1.0, L=2, noise=0.0)
    resumed.load_state_dict(opt.state_dict())
    assert resumed.base_optimizer.param_groups is resumed.param_groups
    assert resumed.base_optimizer.state is resumed.state
    assert resumed.param_groups[0]["lr"] == 0.125


def test_lr_zero_freezes_the_anchor():
    p = _param(3, 1.0)
    opt = EntropySGD([p], lr=0.0, L=2, noise=0.5)
    _quadratic_run(opt, p, 6, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))
    assert opt.outer_step == 3


def test_closure_mode_equals_batch_mode_fed_one_batch_L_times():
    target = torch.tensor([0.3, -0.7], dtype=torch.float64)
    kwargs = dict(lr=0.7, momentum=0.5, L=5, gamma=0.2, scoping=0.1, sgld_lr=0.05, noise=0.3)
    p, q = _param(2, 1.0), _param(2, 1.0)
    closure_opt = EntropySGD([p], mode="closure", **kwargs)
    batch_opt = EntropySGD([q], **kwargs)
    calls = []

    def closure():
        calls.append(1)
        p.grad = 2 * (p.detach() - target)
        return ((p.detach() - target) ** 2).sum()

    first_loss = ((p.detach() - target) ** 2).sum()
    loss = closure_opt.step(closure)
    closure_opt.step(closure)
    assert len(calls) == 10 and loss == first_loss
    _quadratic_run(batch_opt, q, 10, target)
    assert torch.equal(p.detach(), q.detach())
    assert closure_opt.outer_step == 2 and closure_opt.inner_step == 0


def test_parameters_without_gradients_stay_put_and_counters_are_plain_ints():
    used, unused = _param(2, 1.0), _param(2, 5.0)
    opt = EntropySGD([used, unused], L=2, noise=0.1)
    for _ in range(4):
        used.grad = torch.ones_like(used)
        opt.step()
    assert torch.equal(unused.detach(), torch.full((2,), 5.0, dtype=torch.float64))
    extra = opt.state_dict()["entropy_sgd"]
    assert type(extra["inner_step"]) is int and type(extra["outer_step"]) is int
    assert extra["generator_state"].dtype == torch.uint8


def test_frozen_parameters_get_no_weight_decay_or_momentum_as_with_sgd():
    """They were lent x − μ = 0 as a gradient, so the inner SGD decayed them (a frozen layer's
    norm fell from 1.67 to 0.52 in 20 steps) and kept moving one whose gradients had stopped."""
    used, frozen, stopped, late = _param(2, 1.0), _param(2, 5.0), _param(2, 3.0), _param(2, 7.0)
    frozen.requires_grad_(False)
    opt = EntropySGD([used, frozen, stopped], L=3, lr=1.0, momentum=0.9, weight_decay=5e-2)
    for step in range(12):
        used.grad = torch.ones_like(used)
        stopped.grad = torch.ones_like(stopped) if step < 4 else None
        opt.step()
        if step == 7:  # mid-cycle: a group that never gets a gradient
            opt.add_param_group({"params": [late]})
    assert torch.equal(frozen.detach(), torch.full((2,), 5.0, dtype=torch.float64))
    assert torch.equal(late.detach(), torch.full((2,), 7.0, dtype=torch.float64))
    assert "momentum_buffer" not in opt.state[late] and "momentum_buffer" not in opt.state[frozen]
    after_stop = stopped.detach().clone()
    assert not torch.equal(after_stop, torch.full((2,), 3.0, dtype=torch.float64))
    for _ in range(6):
        used.grad = torch.ones_like(used)
        opt.step()
    assert torch.equal(stopped.detach(), after_stop)


@pytest.mark.parametrize("mode", ["batches", "closure"])
def test_a_step_without_any_gradient_is_skipped(mode):
    """A skipped batch (training_step returned None: every .grad is None) counted as a Langevin
    step and folded x' into μ once more; in closure mode it made a whole outer step."""
    p = _param(3, 1.0)
    opt = EntropySGD([p], L=3, noise=0.0, momentum=0.9, mode=mode)
    ref = copy.deepcopy(opt)  # the same run without the skipped steps
    q = ref.param_groups[0]["params"][0]

    def step(o, x, grad):
        x.grad = grad
        o.step((lambda: None) if mode == "closure" else None)

    for i in range(5):
        step(opt, p, None)  # skipped
        step(opt, p, (p.detach() - i).clone())
        step(ref, q, (q.detach() - i).clone())
    assert (opt.outer_step, opt.inner_step) == (ref.outer_step, ref.inner_step)
    assert torch.equal(p.detach(), q.detach())


def test_closure_mode_ends_the_cycle_when_a_later_call_has_no_gradient():
    """It broke off mid-cycle: the parameters held x' after `step()` (the callback's promise in
    closure mode is x), and later cycles straddled calls."""
    p = _param(3, 1.0)
    opt = EntropySGD([p], L=4, noise=0.0, mode="closure")
    calls = []

    def closure():
        calls.append(1)
        p.grad = None if len(calls) == 3 else p.detach().clone()  # a skipped third call
        return len(calls)

    assert opt.step(closure) == 1 and len(calls) == 4
    assert (opt.outer_step, opt.inner_step) == (1, 0) and opt.holds_anchor


def test_closure_mode_refuses_lightnings_closure_that_does_nothing():
    """Manual optimization's `opt.step()` hands Lightning's do_nothing_closure (in partials):
    every Langevin step reused one gradient (weights 0.12 off after 2 epochs)."""
    import functools

    from pytorch_lightning.core.optimizer import do_nothing_closure

    p = _param()
    p.grad = torch.ones_like(p)
    opt = EntropySGD([p], L=2, mode="closure")
    with pytest.raises(RuntimeError, match="closure that does nothing"):
        opt.step(functools.partial(lambda model, closure: closure(), None, do_nothing_closure))
    xla = functools.partial(lambda opt, closure: closure(), opt, do_nothing_closure)
    with pytest.raises(RuntimeError, match="closure that does nothing"):  # XLA's: nested
        opt.step(functools.partial(lambda model, closure: closure(), None, xla))
    assert opt.inner_step == 0 and opt.outer_step == 0


def test_deep_copies_and_pickles_step_like_the_original():
    """torch's __getstate__ kept only defaults, state and param_groups: the copy had no L."""
    import pickle

    p = _param()
    opt = EntropySGD([p], L=2, noise=0.1)
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()  # mid-cycle, the generator drawn
    runs = [opt, copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for o in runs:
        for _ in range(3):  # through an outer step and into the next cycle, with noise
            x = o.param_groups[0]["params"][0]
            x.grad = torch.ones_like(x)
            o.step()
    weights = [o.param_groups[0]["params"][0].detach() for o in runs]
    assert torch.equal(weights[1], weights[0]) and torch.equal(weights[2], weights[0])
    assert [o.outer_step for o in runs] == [opt.outer_step] * 3


def test_generator_state_from_another_device_kind_warns_and_reseeds():
    p = _param(2)
    opt = EntropySGD([p], L=3, noise=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    state["entropy_sgd"]["generator_device"] = "cuda"
    q = _param(2)
    resumed = EntropySGD([q], L=3, noise=0.1)
    resumed.load_state_dict(state)
    q.grad = torch.ones_like(q)
    with pytest.warns(UserWarning, match=r"saved on 'cuda' and cannot be restored on 'cpu'"):
        resumed.step()


def test_anchor_in_parameters_swaps_entropy_sgd_only_and_restores_on_error():
    from lightning_landscape.optim import anchor_in_parameters

    p, q = _param(3, 1.0), _param(3, 2.0)
    opt = EntropySGD([p], L=3, noise=0.1)
    other = torch.optim.SGD([q], lr=0.1)
    _quadratic_run(opt, p, 1, torch.zeros(3, dtype=torch.float64))
    sample = p.detach().clone()
    with pytest.raises(KeyError):
        with anchor_in_parameters([other, opt]):
            assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))
            raise KeyError("boom")
    assert torch.equal(p.detach(), sample) and not opt.holds_anchor


def test_a_parameter_group_added_mid_cycle_joins_at_its_current_value():
    p, q = _param(2, 1.0), _param(2, 3.0)
    opt = EntropySGD([p], L=3, noise=0.0, sgld_lr=0.1)
    target = torch.zeros(2, dtype=torch.float64)
    _quadratic_run(opt, p, 1, target)
    opt.add_param_group({"params": [q], "lr": 0.5})
    assert opt.base_optimizer.param_groups[1]["lr"] == 0.5
    assert opt.swap_in_anchor() and torch.equal(q.detach(), torch.full((2,), 3.0).double())
    state = opt.state_dict()
    assert opt.swap_out_anchor()
    assert "sample" not in state["state"].get(1, {})
    for _ in range(2):
        p.grad, q.grad = 2 * p.detach(), 2 * q.detach()
        opt.step()
    assert opt.outer_step == 1 and q.detach().max() < 3.0


def test_the_optimizer_package_imports_no_lightning():
    code = (
        "import sys, lightning_landscape.optim\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'lightning_fabric', 'torchmetrics'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------------------- Langevin momentum
def _reference_with_langevin_momentum(x, grad_at, *, outer_steps, inner_tail, kw):
    """The reference code's Langevin momentum written out plainly: per outer step a fresh
    buffer b = 0; per Langevin step b <- beta b + grad, d = grad + beta b (Nesterov) or b, then
    x' <- x' - eta' (d - gamma (x - x')) + sqrt(2 eta') eps N(0, I); mu <- alpha mu + (1 - alpha) x'
    (alpha_weights="old"); outer x <- x - lr (x - mu) with Nesterov momentum. Returns (x, x')
    after ``outer_steps`` outer steps and ``inner_tail`` more Langevin steps."""
    gen = torch.Generator().manual_seed(kw["seed"])
    beta, nesterov = kw["langevin_momentum"], kw["langevin_nesterov"]
    std = math.sqrt(2 * kw["sgld_lr"]) * kw["noise"]
    x = [t.clone() for t in x]
    velocity = [None] * len(x)
    xp = x
    for k in range(outer_steps + 1):
        g = kw["gamma"] * (1 + kw["scoping"]) ** k
        xp, mu = [t.clone() for t in x], [t.clone() for t in x]
        buf = [torch.zeros_like(t) for t in x]
        for _ in range(kw["L"] if k < outer_steps else inner_tail):
            grads = grad_at(xp)
            for i in range(len(x)):
                buf[i] = beta * buf[i] + grads[i]
                d = grads[i] + beta * buf[i] if nesterov else buf[i]
                eps = torch.randn(xp[i].shape, generator=gen, dtype=xp[i].dtype)
                xp[i] = xp[i] - kw["sgld_lr"] * (d - g * (x[i] - xp[i])) + std * eps
                mu[i] = kw["alpha"] * mu[i] + (1 - kw["alpha"]) * xp[i]
        if k == outer_steps:
            break
        for i in range(len(x)):
            d = x[i] - mu[i]
            velocity[i] = d.clone() if velocity[i] is None else kw["momentum"] * velocity[i] + d
            x[i] = x[i] - kw["lr"] * (d + kw["momentum"] * velocity[i])
    return x, xp


@pytest.mark.parametrize("nesterov", [True, False])
def test_langevin_momentum_matches_a_hand_written_reference_step(nesterov):
    kw = dict(
        lr=0.7, momentum=0.9, nesterov=True, L=4, gamma=0.3, scoping=0.05, sgld_lr=0.05,
        noise=0.1, alpha=0.75, alpha_weights="old", noise_scale="sqrt_2lr",
        langevin_momentum=0.8, langevin_nesterov=nesterov, seed=5,
    )  # fmt: skip
    target = [
        torch.tensor([0.3, -0.7], dtype=torch.float64),
        torch.tensor([1.5], dtype=torch.float64),
    ]

    def grad_at(xs):  # a non-quadratic loss: sum (x - t)^4 / 4 + (x - t)^2
        return [(t - c) ** 3 + 2 * (t - c) for t, c in zip(xs, target, strict=True)]

    params = [_param(2, 1.0), _param(1, -1.0)]
    init = [p.detach().clone() for p in params]
    opt = EntropySGD(params, **kw)
    for _ in range(3 * kw["L"] + 2):  # 3 outer steps and 2 Langevin steps of the 4th
        for p, grad in zip(params, grad_at([p.detach() for p in params]), strict=True):
            p.grad = grad
        opt.step()
    anchor, sample = _reference_with_langevin_momentum(
        init, grad_at, outer_steps=3, inner_tail=2, kw=kw
    )
    for p, x in zip(params, sample, strict=True):
        torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-13)
    for a, ref in zip(opt.anchors(), anchor, strict=True):
        torch.testing.assert_close(a, ref, rtol=1e-12, atol=1e-13)
    assert all("langevin_buffer" in opt.state[p] for p in params)  # mid-cycle: kept for resume


def test_langevin_momentum_resumes_mid_cycle_bit_identically():
    kwargs = dict(
        L=4, gamma=0.5, sgld_lr=0.1, noise=0.1, langevin_momentum=0.9, langevin_nesterov=True
    )
    target = torch.linspace(-1, 1, 5, dtype=torch.float64)
    p = _param(5, 0.0)
    opt = EntropySGD([p], **kwargs)
    _quadratic_run(opt, p, 6, target)
    saved = copy.deepcopy(opt.state_dict())
    _quadratic_run(opt, p, 5, target)
    q = _param(5, 0.0)
    resumed = EntropySGD([q], **kwargs)
    resumed.load_state_dict(saved)
    _quadratic_run(resumed, q, 5, target)
    assert torch.equal(q.detach(), p.detach())
    assert "langevin_buffer" in resumed.state[q]
    _quadratic_run(resumed, q, 1, target)  # the outer step frees the buffer
    assert resumed.inner_step == 0 and "langevin_buffer" not in resumed.state[q]


# ---------------------------------------------------------------------------- the scoping cap
def test_scoping_cap_holds_and_warns_once():
    p = _param(2, 1.0)
    opt = EntropySGD([p], L=1, gamma=0.5, scoping=0.5, sgld_lr=0.1, noise=0.01)
    assert opt.gamma_max == pytest.approx(10.0)  # default 1/sgld_lr
    gammas = []
    with pytest.warns(UserWarning, match=r"reached `gamma_max`=10 at outer step k=8") as record:
        for _ in range(40):
            gammas.append(opt.current_gamma)
            _quadratic_run(opt, p, 1, torch.zeros(2, dtype=torch.float64))
    assert len([w for w in record if "gamma_max" in str(w.message)]) == 1
    assert max(gammas) == opt.gamma_max and gammas[-1] == opt.gamma_max
    assert gammas[:8] == [0.5 * 1.5**k for k in range(8)]
    assert torch.isfinite(p).all()

    explicit = EntropySGD([_param()], gamma=0.03, scoping=1e-3, gamma_max=0.05)
    explicit._outer_step = 10**9  # no overflow, however long the run
    assert explicit.current_gamma == 0.05


def test_the_cap_keeps_the_langevin_chain_bounded_where_unbounded_scoping_diverges():
    """REFERENCES.md section 9: once eta' gamma passes 2 the Langevin step diverges."""
    ends = {}
    for cap in (None, 1e6):
        p = _param(1, 1.0)
        opt = EntropySGD([p], L=5, gamma=0.5, scoping=0.5, sgld_lr=0.1, noise=0.0, gamma_max=cap)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _quadratic_run(opt, p, 5 * 30 + 3, torch.zeros(1, dtype=torch.float64))  # mid-cycle
        ends[cap] = p.detach().abs().max().item()
    assert ends[None] <= 1.0
    assert not ends[1e6] < 1e6  # inf, NaN or huge
