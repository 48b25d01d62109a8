"""DeACL's stage-2 step against a float64 transcription of the official one (pantheon5100/DeACL @ 3fb81e3,
solo/methods/mocov2_distillation_AT.py: training_step, generate_training_AE; projectors are Identity)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advfast.attacks import pgd
from advfast.losses.deacl import attack_loss, deacl_step, distillation_loss, freeze_teacher, teacher_targets

D64 = torch.float64
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 5


def official_step(student, teacher, image_weak, start, trades_k=2.0, steps=STEPS):
    """The official step (generate_training_AE + training_step) with its teacher graph (loss.backward() reaches
    the teacher too); ``start`` is the U(-eps, eps) draw of generate_training_AE. Also used by
    tests/test_method_deacl.py."""
    teacher.eval()
    away_target = teacher(image_weak)
    x_cl = image_weak.clone().detach() + start
    student.eval()
    for _ in range(steps):
        x_cl.requires_grad_()
        with torch.enable_grad():
            loss = -F.cosine_similarity(student(x_cl), away_target, dim=1).sum() * 256
        grad = torch.autograd.grad(loss, x_cl)[0]
        x_cl = x_cl.detach() + ALPHA * torch.sign(grad.detach())
        x_cl = torch.min(torch.max(x_cl, image_weak - EPS), image_weak + EPS)
        x_cl = torch.clamp(x_cl, 0, 1)
    student.train()
    logits_all = student(torch.cat([image_weak, x_cl]))
    bs = image_weak.size(0)
    adv_loss = -F.cosine_similarity(logits_all[:bs], away_target).mean()
    adv_loss += -trades_k * F.cosine_similarity(logits_all[bs:], logits_all[:bs]).mean()
    return adv_loss, x_cl


def _net():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 6)).to(D64)


def _pair():
    teacher = _net()
    student = copy.deepcopy(teacher)  # initialised from the teacher, as the official student_scratch=False
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # after some training: they differ
    return student, teacher


def test_whole_step_matches_official():
    student, teacher = _pair()
    x = EPS + (1 - 2 * EPS) * torch.rand(5, 3, 8, 8, dtype=D64)  # the start never leaves [0, 1]
    seed = int(torch.randint(0, 2**31, ()).item())
    start = torch.empty_like(x).uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(seed)) * EPS
    st_o, te_o = copy.deepcopy(student), copy.deepcopy(teacher)
    lo, x_o = official_step(st_o, te_o, x, start)
    lo.backward()
    st_m, te_m = copy.deepcopy(student), freeze_teacher(copy.deepcopy(teacher))
    lm, parts = deacl_step(st_m, te_m, x, generator=torch.Generator().manual_seed(seed))
    lm.backward()
    torch.testing.assert_close(parts["x_adv"], x_o, rtol=0, atol=1e-12)
    torch.testing.assert_close(lm, lo, rtol=1e-12, atol=1e-12)
    for a, b in zip(st_m.parameters(), st_o.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    for a, b in zip(st_m.buffers(), st_o.buffers()):  # one train-mode forward of cat[x, x']: same BN statistics
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in te_m.parameters())  # frozen: no work through the teacher
    assert any(p.grad is not None for p in te_o.parameters())  # the official backward ran through it
    assert (parts["x_adv"] - x).abs().max() > EPS / 2
    assert st_m.training


def test_attack_objective_and_loss_terms():
    student, teacher = _pair()
    freeze_teacher(teacher)
    x = torch.rand(4, 3, 8, 8, dtype=D64)
    t = teacher_targets(teacher, x)
    assert not t.requires_grad and not teacher.training
    student.eval()
    fn = attack_loss(student, t)
    torch.testing.assert_close(fn(x), -F.cosine_similarity(student(x), t).sum() * 256)
    torch.testing.assert_close(attack_loss(student, t, scale=1.0)(x) * 256, fn(x))
    s_clean, s_adv = torch.randn(4, 6, dtype=D64, requires_grad=True), torch.randn(4, 6, dtype=D64, requires_grad=True)
    loss, parts = distillation_loss(s_clean, s_adv, t, trades_k=2.0)
    torch.testing.assert_close(loss, parts["loss_distill"] + 2.0 * parts["loss_adv_consistency"])
    g_clean, g_adv = torch.autograd.grad(loss, (s_clean, s_adv))
    assert g_clean.abs().sum() > 0 and g_adv.abs().sum() > 0  # nothing detached on the student side
    # the attack closure plugs into advfast's PGD
    x_adv = pgd(fn, x, EPS, ALPHA, 2, generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= EPS + 1e-12


def test_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        freeze_teacher(lambda x: x)
    with pytest.raises(ValueError, match="teacher's"):
        attack_loss(lambda x: x, torch.zeros(3))
    with pytest.raises(ValueError, match="one shape"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3))
