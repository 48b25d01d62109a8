"""LARS against a float64 transcription of ACL's formula; the per-iteration schedules."""

import copy
import math

import pytest
import torch
from torch import nn

from advfast.config import OptimConfig
from advfast.optim import LARS, WarmupCosineLR, build_optimizer, build_scheduler, lr_at

SHAPES = [(8, 3, 3, 3), (5, 7), (7,), (8,), (1,), (3, 4)]


def _reference_lars(ws, grads_per_step, lrs, momentum, wd, eta, exclude):
    """ACL optimizer/lars.py, transcribed in float64: buf = m*buf + lr*trust*(g + wd*w); w -= buf."""
    ws = [w.double().clone() for w in ws]
    bufs = [torch.zeros_like(w) for w in ws]
    for grads, lr in zip(grads_per_step, lrs):
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.double()
            if exclude and w.dim() <= 1:
                bufs[i] = momentum * bufs[i] + lr * g
            else:
                w_norm, g_norm = float(w.norm()), float(g.norm())
                if w_norm < 1e-15 or g_norm < 1e-15:
                    trust = 1.0
                else:
                    trust = eta * w_norm / (g_norm + wd * w_norm)
                bufs[i] = momentum * bufs[i] + lr * trust * (g + wd * w)
            ws[i] = w - bufs[i]
    return ws


def _problem(dtype):
    ws = [torch.randn(s, dtype=dtype) for s in SHAPES]
    ws[4].zero_()  # ||w|| = 0: trust ratio 1
    grads = [[torch.randn(s, dtype=dtype) for s in SHAPES] for _ in range(4)]
    grads[1][5].zero_()  # ||g|| = 0 once: trust ratio 1
    return ws, grads


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_lars_matches_acl_formula(exclude, dtype, tol):
    ws, grads = _problem(dtype)
    lrs = [5.0, 4.0, 2.5, 0.5]  # the lr changes between steps: it lives inside the momentum buffer
    momentum, wd, eta = 0.9, 1e-2, 1e-3
    params = [nn.Parameter(w.clone()) for w in ws]
    opt = LARS(params, lr=lrs[0], momentum=momentum, weight_decay=wd, eta=eta, exclude_bn_bias=exclude)
    for step_grads, lr in zip(grads, lrs):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        for p, g in zip(params, step_grads):
            assert torch.equal(p.grad, g), "LARS must not modify the gradients"
    expected = _reference_lars(ws, grads, lrs, momentum, wd, eta, exclude)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=tol, atol=tol)


def test_lars_exclusion_changes_only_1d_params():
    ws, grads = _problem(torch.float64)
    results = {}
    for exclude in (False, True):
        params = [nn.Parameter(w.clone()) for w in ws]
        opt = LARS(params, lr=1.0, weight_decay=1e-3, exclude_bn_bias=exclude)
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        opt.step()
        results[exclude] = [p.detach() for p in params]
    for shape, w, a, b in zip(SHAPES, ws, results[False], results[True]):
        # a zero weight has trust 1 and no decay either way
        assert torch.equal(a, b) == (len(shape) > 1 or not w.any()), shape


def test_lars_skips_params_without_grad_and_resumes_exactly():
    ws, grads = _problem(torch.float64)
    params = [nn.Parameter(w.clone()) for w in ws]
    opt = LARS(params, lr=1.0, weight_decay=1e-4)
    for p, g in zip(params[:-1], grads[0]):
        p.grad = g.clone()
    opt.step()
    assert params[-1] not in opt.state and torch.equal(params[-1].detach(), ws[-1])
    # resume: a fresh optimizer loaded from the state dict continues like the original
    clone = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = LARS(clone, lr=1.0, weight_decay=1e-4)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from disk
    for o, ps in ((opt, params), (opt2, clone)):
        for p, g in zip(ps, grads[1]):
            p.grad = g.clone()
        o.step()
    for a, b in zip(params, clone):
        assert torch.equal(a, b)


def test_lars_bad_arguments():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="lr"):
        LARS(p, lr=-1.0)
    with pytest.raises(ValueError, match="eta"):
        LARS(p, lr=1.0, eta=-1e-3)


@pytest.mark.gpu
def test_lars_step_has_no_host_sync():
    params = [nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    opt = LARS(params, lr=1.0, weight_decay=1e-6, exclude_bn_bias=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state allocation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_build_optimizer():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    sgd = build_optimizer(model.parameters(), OptimConfig(name="sgd", lr=0.3, weight_decay=1e-4, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD)
    g = sgd.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.3, 0.9, 1e-4, True)
    lars = build_optimizer(model.parameters(), OptimConfig(name="lars", lr=5.0, weight_decay=1e-6, lars_eta=1e-3,
                                                           lars_exclude_bn_bias=True))
    assert isinstance(lars, LARS)
    g = lars.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["eta"], g["exclude_bn_bias"]) == (5.0, 1e-6, 1e-3, True)
    assert len(g["params"]) == 4
    with pytest.raises(ValueError, match="nesterov"):
        build_optimizer(model.parameters(), OptimConfig(name="lars", nesterov=True))
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(model.parameters(), OptimConfig(name="adam"))
    with pytest.raises(ValueError, match="empty"):
        build_optimizer([], OptimConfig())


def _acl_cosine_annealing(step, total_steps, lr_max, lr_min, warmup_steps):
    """ACL's train_simCLR.py schedule factor, transcribed."""
    if step < warmup_steps:
        return lr_max * step / warmup_steps
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos((step - warmup_steps) / (total_steps - warmup_steps) * math.pi))


def test_lr_at_matches_acl_schedule():
    base, spe, epochs = 5.0, 7, 20
    total, warmup = spe * epochs, 10 * spe // 4
    for step in range(total):
        expected = base * _acl_cosine_annealing(step, total, 1.0, 1e-6 / base, warmup)
        assert lr_at(step, base, total, warmup, 0.0, 1e-6) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_schedule_shape():
    base, total, warmup, start, floor = 0.5, 200, 30, 0.01, 5e-4
    lrs = [lr_at(s, base, total, warmup, start, floor) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(start)
    assert lrs[warmup] == pytest.approx(base)  # the warmup ends at the base lr
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # rising linearly
    assert all(b <= a for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # cosine never rises
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx((base + floor) / 2, rel=1e-2)
    assert lrs[total - 1] > floor and lrs[total - 1] == pytest.approx(floor, abs=1e-4)
    assert lrs[total] == lrs[-1] == pytest.approx(floor)  # past the end it stays at min_lr
    const = [lr_at(s, base, total, warmup, start, floor, "constant") for s in range(total)]
    assert const[:warmup] == lrs[:warmup] and set(const[warmup:]) == {base}
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, base, total, schedule="linear")  # not a schedule advfast has


def test_scheduler_follows_lr_at_per_group_and_resumes():
    model = nn.Linear(3, 3)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.05}], lr=0.1)
    cfg = OptimConfig(lr=0.1, warmup_epochs=2, warmup_start_lr=0.01, min_lr=1e-3)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, epochs=6)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for step, (lr0, lr1) in enumerate(seen):
        assert lr0 == pytest.approx(lr_at(step, 0.1, 30, 10, 0.01, 1e-3))
        assert lr1 == pytest.approx(lr0 / 2)  # the second group keeps its ratio
    # resume from the state dict: the next lrs continue the same sequence
    opt2 = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.05}], lr=0.1)
    sched2 = build_scheduler(opt2, cfg, steps_per_epoch=5, epochs=6)
    sched2.load_state_dict(sched.state_dict())
    for g2, g in zip(opt2.param_groups, opt.param_groups):
        g2["lr"] = g["lr"]
    for step in range(20, 30):
        assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(step, 0.1, 30, 10, 0.01, 1e-3))
        opt2.step()
        sched2.step()


def test_build_scheduler_edges():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_epochs=10), steps_per_epoch=3, epochs=2)
    assert isinstance(sched, WarmupCosineLR) and sched.warmup_steps == 6 and sched.total_steps == 6
    with pytest.raises(ValueError, match="optim.schedule"):
        build_scheduler(opt, OptimConfig(schedule="linear"), 3, 2)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(opt, OptimConfig(), 0, 2)
