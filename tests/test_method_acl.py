"""ACL (a2a, a2s, ds): training on digits, the attack, dual BN, and the DS loss against the official formula."""

import math

import pytest
import torch

from advfast.data import Batch
from advfast.engine import Trainer, build_config
from advfast.methods import METHODS
from advfast.models import MultiBatchNorm1d, MultiBatchNorm2d
from advfast.optim import LARS

TINY = dict(image_size=8, batch_size=32, epochs=1, max_steps=2, progress=False, log_every=1,
            method_options=dict(head_hidden=32), attack=dict(steps=2))


def tiny_config(tmp_path, variant=None, **extra):
    overrides = dict(TINY, out=str(tmp_path / "run"), **extra)
    return build_config("acl", variant, "digits", [overrides])


def make_method(variant="ds", **cfg_extra):
    cfg = build_config("acl", variant, "digits", [dict(TINY, **cfg_extra)])
    return METHODS["acl"](cfg, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def official_nt_xent(x: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """ACL's utils.nt_xent as written (float64 here): rows 2i and 2i+1 are the two views of image i."""
    x = x.double()
    x_norm = torch.norm(x, dim=1).reshape(-1, 1)
    x_cos = torch.mm(x, x.t()) / torch.clamp(torch.mm(x_norm, x_norm.t()), min=1e-8)
    sim = torch.exp(x_cos / t)
    n = sim.shape[0]
    partner = torch.arange(n)
    partner[0::2] += 1
    partner[1::2] -= 1
    sim_pos = sim[partner].diag()  # row i of the permuted matrix holds x_partner(i), so diag is sim(partner(i), i)
    denom = sim.sum(dim=0) - math.exp(1 / t)
    return -torch.log(sim_pos / denom).mean()


def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack([a, b], dim=1).reshape(-1, a.shape[1])


def params_of(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("variant", ["a2a", "a2s", "ds"])
def test_every_variant_trains_on_digits(tmp_path, variant):
    trainer = Trainer(tiny_config(tmp_path, variant))
    before = params_of(trainer.method.encoder)
    summary = trainer.fit()
    assert summary["step"] == 2
    assert math.isfinite(summary["last"]["loss"])
    after = params_of(trainer.method.encoder)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "most encoder tensors must move in two steps"
    assert (tmp_path / "run" / "encoder.safetensors").is_file()


def test_variant_bn_layout_and_eval_branch():
    ds, a2s, a2a = make_method("ds"), make_method("a2s"), make_method("a2a")
    assert ds.encoder.branches == ("normal", "pgd") and ds.eval_branch == "pgd"
    assert a2s.encoder.branches == ("normal", "pgd") and a2s.eval_branch == "pgd"
    assert a2a.encoder.branches == ("normal",) and a2a.eval_branch == "normal"
    assert ds.head.branches == ("normal", "pgd")  # the ACL head's BNs are dual too, as officially
    single = make_method("ds", method_options=dict(head_hidden=32, dual_bn=False))
    assert single.encoder.branches == ("normal",) and single.eval_branch == "normal"


@pytest.mark.parametrize("variant", ["ds", "a2a", "a2s"])
def test_attack_raises_its_loss_and_stays_in_the_ball(variant):
    method = make_method(variant, attack=dict(steps=5, eps=8 / 255, alpha=2 / 255))
    x1, x2 = torch.rand(2, 32, 3, 8, 8)
    eps = method.cfg.attack.eps
    method.eval()
    if variant == "a2s":
        with torch.no_grad():
            z2 = method.embed(x2, "normal")

        def loss_of(xa):
            return method.contrastive_loss(torch.cat([method.embed(xa, method.adv_branch), z2]))
        x, x_adv = x1, method.attack_first(x1, x2)
    else:
        def loss_of(xa):
            return method.contrastive_loss(method.embed(xa, method.adv_branch))
        x = torch.cat([x1, x2])
        x_adv = method.attack_both(x)
    with torch.no_grad():
        clean, adv = loss_of(x).item(), loss_of(x_adv).item()
    assert adv > clean + 1e-3, (clean, adv)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0 and x_adv.max().item() <= 1


def test_attack_restores_train_mode_and_takes_no_weight_gradients():
    method = make_method("ds")
    method.train()
    x = torch.rand(64, 3, 8, 8)
    method.attack_both(x)
    assert method.training
    assert all(p.grad is None for p in method.parameters())


def bn_stats(module, branch):
    return torch.cat([m.bns[branch].running_mean.clone() for m in module.modules()
                      if isinstance(m, (MultiBatchNorm1d, MultiBatchNorm2d))])


def test_bn_branches_keep_separate_statistics():
    method = make_method("ds")
    method.train()
    normal0, pgd0 = bn_stats(method, "normal"), bn_stats(method, "pgd")
    method.embed(torch.rand(32, 3, 8, 8), "normal")
    normal1, pgd1 = bn_stats(method, "normal"), bn_stats(method, "pgd")
    assert not torch.equal(normal0, normal1) and torch.equal(pgd0, pgd1)
    method.embed(torch.rand(32, 3, 8, 8) * 0.5, "pgd")
    assert torch.equal(normal1, bn_stats(method, "normal")) and not torch.equal(pgd1, bn_stats(method, "pgd"))
    # a DS training step moves both, to different values
    x1, x2 = torch.rand(2, 32, 3, 8, 8)
    method.training_step(Batch([x1, x2], torch.zeros(32, dtype=torch.long), torch.arange(32)))
    assert not torch.allclose(bn_stats(method, "normal"), bn_stats(method, "pgd"))


def test_ds_loss_on_fixed_features_equals_the_official_formula(monkeypatch):
    """Features are a fixed function of (input, BN branch); the attack returns a fixed x_adv. The DS
    loss must be (nt_xent(clean, normal) + nt_xent(adv, pgd)) / 2 with ACL's own nt_xent, and the
    attack must run in eval mode on the pgd branch, the loss forwards in train mode."""
    method = make_method("ds")
    method.train()
    b, d = 16, 12
    x1, x2 = torch.rand(2, b, 3, 8, 8)
    x_adv = torch.rand(2 * b, 3, 8, 8)
    proj = {"normal": torch.randn(3 * 8 * 8, d), "pgd": torch.randn(3 * 8 * 8, d)}
    calls = []

    def fake_embed(x, branch="normal"):
        calls.append((branch, method.training))
        return x.flatten(1) @ proj[branch]

    def fake_attack(site, make_loss, x, context=()):
        make_loss(*context)(x)  # the closure the attack maximises
        return x_adv

    monkeypatch.setattr(method, "embed", fake_embed)
    monkeypatch.setattr(method, "run_attack", fake_attack)
    loss, metrics = method.training_step(Batch([x1, x2], torch.zeros(b, dtype=torch.long), torch.arange(b)))

    feat = {k: (lambda x, k=k: x.double().flatten(1) @ proj[k].double()) for k in proj}
    clean = official_nt_xent(interleave(feat["normal"](x1), feat["normal"](x2)), t=0.5)
    adv = official_nt_xent(interleave(feat["pgd"](x_adv[:b]), feat["pgd"](x_adv[b:])), t=0.5)
    expected = (clean + adv) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert metrics["loss_clean"].item() == pytest.approx(clean.item(), rel=1e-5)
    assert metrics["loss_adv"].item() == pytest.approx(adv.item(), rel=1e-5)
    assert calls[0] == ("pgd", False)  # attack: eval mode, pgd BN
    assert sorted(calls[1:]) == [("normal", True), ("pgd", True)]


def test_a2s_and_a2a_losses_follow_the_paper(monkeypatch):
    b, d = 8, 6
    x1, x2 = torch.rand(2, b, 3, 8, 8)
    for variant in ("a2s", "a2a"):
        method = make_method(variant)
        method.train()
        proj = {"normal": torch.randn(192, d), "pgd": torch.randn(192, d)}
        monkeypatch.setattr(method, "embed", lambda x, branch="normal", p=proj: x.flatten(1) @ p[branch])
        x_adv = torch.rand(b if variant == "a2s" else 2 * b, 3, 8, 8)
        monkeypatch.setattr(method, "run_attack", lambda site, make, x, ctx=(), xa=x_adv: (make(*ctx)(x), xa)[1])
        loss, _ = method.training_step(Batch([x1, x2], torch.zeros(b, dtype=torch.long), torch.arange(b)))
        f = {k: (lambda x, k=k: x.double().flatten(1) @ proj[k].double()) for k in proj}
        if variant == "a2s":  # adversarial view 1 on the pgd BN against clean view 2 on the normal BN
            expected = official_nt_xent(interleave(f["pgd"](x_adv), f["normal"](x2)))
        else:  # both views adversarial, one BN
            expected = official_nt_xent(interleave(f["normal"](x_adv[:b]), f["normal"](x_adv[b:])))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_presets_follow_the_official_code(tmp_path):
    cfg = build_config("acl", None, "cifar10")
    assert cfg.variant is None and (cfg.batch_size, cfg.epochs, cfg.temperature, cfg.arch) == (512, 1000, 0.5, "resnet18")
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, o.momentum, o.lars_eta, o.warmup_epochs, o.min_lr, o.schedule) == \
        ("lars", 5.0, 1e-6, 0.9, 1e-3, 10.0, 1e-6, "cosine")
    assert not o.lars_exclude_bn_bias
    a = cfg.attack
    assert (a.kind, a.norm, a.eps, a.alpha, a.steps, a.random_start) == ("pgd", "linf", 8 / 255, 2 / 255, 5, True)
    trainer = Trainer(tiny_config(tmp_path))
    assert isinstance(trainer.optimizer, LARS)
    assert trainer.method.variant == "ds"


def test_unknown_variant_and_option_are_one_line_errors():
    with pytest.raises(ValueError, match="did you mean 'a2s'"):
        make_method("a2z")
    with pytest.raises(ValueError, match="did you mean 'dual_bn'"):
        make_method("ds", method_options=dict(dual_b=True))


def test_input_is_normalised_with_imagenet_statistics_as_officially():
    method = make_method("ds")
    assert torch.allclose(method.encoder.normalize.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    own = make_method("ds", method_options=dict(head_hidden=32, input_stats="dataset"))
    assert torch.allclose(own.encoder.normalize.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="input_stats must be"):
        make_method("ds", method_options=dict(input_stats="cifar"))
