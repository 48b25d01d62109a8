"""method.air=true on acl (ACL-AIR; DynACL-AIR reuses it through dynacl.py): one whole step against the
float64 transcription of the official iteration (tests/official_air_step.py), both KL forms, the
per-epoch strength, views and weight, the options and presets, the engine (with a resume across an
epoch boundary) and advfast-train / advfast-eval on digits."""

import copy
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import advfast.attacks.pgd  # noqa: F401  (the module, not the function attacks.pgd)
from advfast.cli import train_main
from advfast.config import validate
from advfast.data import Batch, build_augment
from advfast.data.presets import Original, ResizedCrop
from advfast.engine import Trainer, build_config
from advfast.eval.cli import eval_main
from advfast.methods import METHODS, register
from advfast.methods.acl import ACL, air_preset, air_views
from advfast.optim.schedule import lr_at

_spec = importlib.util.spec_from_file_location("official_air_step", Path(__file__).resolve().parent / "official_air_step.py")
official = sys.modules.setdefault("official_air_step", importlib.util.module_from_spec(_spec))
if not hasattr(official, "official_air_step"):
    _spec.loader.exec_module(official)

CODE_AIR_LOSS = official.official_air_loss  # the coded form, before a test patches the module
EPS = 8 / 255
TINY = dict(image_size=8, batch_size=16, epochs=10, progress=False,
            method_options=dict(head_hidden=16, air=True), attack=dict(steps=5))


def make_method(**options):
    cfg = build_config("acl", None, "digits", [dict(TINY, method_options=dict(TINY["method_options"], **options))])
    torch.manual_seed(0)
    return METHODS["acl"](cfg, 10, (0.5,) * 3, (0.25,) * 3)


def interleave(a, b):
    """View-major halves -> the official layout (rows 2i, 2i+1 are image i's two views)."""
    return torch.stack([a, b], 1).reshape(-1, *a.shape[1:])


# ---- the paper's KL (method.air_kl=paper), written from AIR_Loss with log-probabilities as input ----------
def paper_air_loss(zi, zj, z_orig, zi_adv, zj_adv, weight=0.0, temperature=0.5, lambda1=0.5, lambda2=0.5):
    total, nat, adv, _, _ = CODE_AIR_LOSS(zi, zj, z_orig, zi_adv, zj_adv, weight, temperature, 0, 0)
    zi, zj, zo, zia, zja = (F.normalize(z, p=2, dim=-1) for z in (zi, zj, z_orig, zi_adv, zj_adv))
    mask = torch.ones((zi.shape[0],) * 2, dtype=bool).fill_diagonal_(0)

    def log_sm(u, v):
        return F.log_softmax((torch.mm(u, v.t()) / temperature)[~mask], -1)
    sir = F.kl_div(log_sm(zi, zo), log_sm(zj, zo), log_target=True, reduction="sum")  # KL(q || p)
    air = F.kl_div(log_sm(zia, zo) + log_sm(zia, zi), log_sm(zja, zo) + log_sm(zja, zj), log_target=True,
                   reduction="sum")  # KL(Q || P)
    return total + lambda1 * sir + lambda2 * air, nat, adv, sir, air


class OfficialModel(torch.nn.Module):
    """The official ``model(x, bn_name)``: dual-BN encoder + projection head (no cast)."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, x, bn_name):
        return self.method.head(self.method.backbone(x, bn_name), bn_name)


@pytest.mark.parametrize("kl,dyn_aug,epoch0", [("code", False, 0), ("paper", False, 0), ("code", True, 5),
                                               ("paper", True, 9)])
def test_one_step_matches_the_official_iteration_in_float64(monkeypatch, kl, dyn_aug, epoch0):
    """Same weights, same images, same attack start: loss, every parameter gradient, the adversarial
    images and both BN branches' statistics equal the official train() iteration."""
    method = make_method(air_kl=kl).double().train()
    model64 = copy.deepcopy(method)
    method._air_epoch_start(epoch0, dyn_aug=dyn_aug, step=2)  # E = 10, K = 2
    strength = 1 - int(epoch0 / 2) * 2 / 10 if dyn_aug else 1.0
    assert method.air_strength == pytest.approx(strength, abs=1e-15)

    b = 8
    g = torch.Generator().manual_seed(3)
    x1, x2, xo = (EPS + (1 - 2 * EPS) * torch.rand(b, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    delta0 = (torch.rand(2 * b, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1) * EPS  # view-major
    starts = []

    def start(x_nat, eps, **kw):
        starts.append(x_nat.shape)
        return x_nat + delta0  # inside [0, 1]: the official unclamped start is the same point
    monkeypatch.setattr(sys.modules["advfast.attacks.pgd"], "draw_start", start)
    attacked = []
    attack_both = method.attack_both
    monkeypatch.setattr(method, "attack_both", lambda x: attacked.append(attack_both(x)) or attacked[-1])
    loss, metrics = method.training_step(Batch([x1, x2, xo], torch.zeros(b, dtype=torch.long), torch.arange(b)))
    loss.backward()
    assert starts == [(2 * b, 3, 8, 8)]

    if kl == "paper":
        monkeypatch.setattr(official, "official_air_loss", paper_air_loss)
    x_off = interleave(x1, x2)
    loss_o, x_adv_o = official.official_air_step(OfficialModel(model64), x_off, xo, interleave(delta0[:b], delta0[b:]),
                                                 strength, dyn_aug)
    loss_o.backward()
    torch.testing.assert_close(loss, loss_o, rtol=0, atol=1e-12)
    ours, theirs = dict(method.named_parameters()), dict(model64.named_parameters())
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k].grad, theirs[k].grad, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{k}: {m}")
    for k, v in model64.state_dict().items():  # BN running statistics of "normal" and "pgd"
        if "running" in k:
            torch.testing.assert_close(method.state_dict()[k], v, rtol=0, atol=1e-13, msg=lambda m, k=k: f"{k}: {m}")
    w = 2 / 3 * (1 - strength)
    nat, adv, sir, air = (metrics[k] for k in ("loss_nat", "loss_adv", "loss_sir", "loss_air"))
    torch.testing.assert_close((1 - w) * nat + (1 + w) * adv + 0.5 * sir + 0.5 * air, loss.detach(), rtol=0, atol=1e-12)
    if kl == "paper":
        assert sir >= 0 and air >= 0  # true KLs
    # the attack ran on "pgd" in eval mode against plain NT-Xent: its output is the official x_adv
    (x_adv,) = attacked
    assert not torch.equal(x_adv, torch.cat([x1, x2]) + delta0)  # it moved
    torch.testing.assert_close(interleave(x_adv[:b], x_adv[b:]), x_adv_o, rtol=0, atol=1e-12)


def test_lambdas_scale_the_regularisers(monkeypatch):
    method = make_method(air_lambda_sir=0.0, air_lambda_air=2.0)
    batch = Batch([torch.rand(8, 3, 8, 8) for _ in range(3)], torch.zeros(8, dtype=torch.long), torch.arange(8))
    loss, m = method.training_step(batch)
    torch.testing.assert_close(loss.detach(), m["loss_nat"] + m["loss_adv"] + 2.0 * m["loss_air"], rtol=1e-5, atol=1e-5)


def test_epoch_start_sets_airs_strength_views_and_weight():
    """The official per-epoch loop (pretraining.main: K = 50 hard-coded, rebuilt every epoch) at E = 10
    with K = 2, and ACL-AIR (strength 1: AIR's bicubic (0.1, 1) crop, not ACL's (0.08, 1))."""
    method = make_method()
    method.augment = build_augment(ACL.augment_for("ds", {"air": "true"}), backend="torch", size=8)
    assert method.augment.num_views == 3 and method.augment.views[2] == (Original(),)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(method.augment(images, torch.Generator().manual_seed(0))[2], images.float() / 255)  # ToTensor
    first = method.augment.views
    for epoch0 in range(10):
        method.on_epoch_start(epoch0)  # ACL-AIR
        assert (method.air_strength, method.air_weight) == (1.0, 0.0)
        assert method.augment.views is first  # unchanged views are not set again (no DALI rebuild)
    crop = first[0][0]
    assert isinstance(crop, ResizedCrop) and crop.interpolation == "bicubic"
    assert crop.scale == pytest.approx((0.1, 1.0))
    for epoch in range(1, 11):  # DynACL-AIR
        method._air_epoch_start(epoch - 1, dyn_aug=True, step=2)
        strength = 1 - int((epoch - 1) / 2) * 2 / 10
        assert method.air_strength == strength and method.air_weight == 2 / 3 * (1 - strength)
        assert method.augment.views == air_views(strength)
        assert method.augment.views[0][0].scale == pytest.approx((1 - 0.9 * strength, 1.0))
    two = make_method()
    two.augment = build_augment("simclr", backend="torch", size=8)
    with pytest.raises(RuntimeError, match="needs AIR's 3 views.*augment_for"):
        two.on_epoch_start(0)
    with pytest.raises(ValueError, match="needs 3 views"):
        two.training_step(Batch([torch.rand(4, 3, 8, 8)] * 2, torch.zeros(4, dtype=torch.long), torch.arange(4)))


def test_options_presets_and_views():
    for variant in ("a2a", "a2s"):
        with pytest.raises(ValueError, match="method.air=true needs variant ds"):
            validate(build_config("acl", variant, "digits", [dict(method_options=dict(air=True))]))
    with pytest.raises(ValueError, match="air_kl applies only with method.air=true"):
        make_method(air=False, air_kl="paper")
    with pytest.raises(ValueError, match="air_kl must be 'code' or 'paper'"):
        make_method(air_kl="true-kl")
    with pytest.raises(ValueError, match="air_lambda_sir must be >= 0"):
        make_method(air_lambda_sir=-1)
    with pytest.raises(ValueError, match="loss_weight_adv does not apply"):
        make_method(loss_weight_adv=2.0)
    assert ACL.augment_for("ds") == "simclr" and ACL.augment_for("ds", {"air": "false"}) == "simclr"
    assert ACL.augment_for("ds", {"air": True}) == air_views(1.0)
    # pretraining.py E --ACL_DS: ACL's code settings, seed 1; --list shows the option's preset
    cfg = build_config("acl", None, "cifar10", [dict(method_options=dict(air="true"))])
    plain = build_config("acl", None, "cifar10")
    assert cfg.seed == 1 and cfg.method_options["air"] == "true"
    assert (cfg.attack, cfg.epochs, cfg.batch_size, cfg.arch) == (plain.attack, plain.epochs, plain.batch_size, plain.arch)
    assert dataclasses.replace(cfg.optim, warmup_point=plain.optim.warmup_point) == plain.optim
    o = cfg.optim
    assert (o.name, o.lr, o.weight_decay, o.schedule, o.step_every, o.warmup_epochs, o.warmup_start_lr, o.min_lr) == \
        ("lars", 5.0, 1e-6, "cosine", "iteration", 10.0, 0.0, 1e-6)
    # the official LambdaLR is stepped before each optimizer step: iteration i at cosine_annealing(i + 1)
    total, warm = 1000 * 97, 10 * 97
    for i in (0, 1, warm - 2, warm - 1):
        assert lr_at(i, o.lr, total, warm, o.warmup_start_lr, o.min_lr, o.schedule, o.warmup_point) == \
            pytest.approx(o.lr * (i + 1) / warm, rel=1e-12)
    assert air_preset("digits", True)["method_options"]["step"] == 2  # 5 strength levels in 10 epochs
    assert ACL.preset_options == {"air": (True,)}


# ---- the engine and the command line ---------------------------------------------------------------------
RUN = dict(image_size=8, batch_size=512, epochs=2, progress=False, log_every=1, ckpt_every=1, deterministic=True,
           keep_last=10, attack=dict(steps=1), method_options=dict(head_hidden=16, air=True))


class DynAIR(ACL):
    """ACL-AIR with --DynAug, as dynacl + air=true uses it (dyn_aug, K from method.step)."""
    name = "acl-dynair-test"
    dyn_aug = True

    @dataclasses.dataclass
    class Options(ACL.Options):
        step: int = 50


@pytest.fixture
def dynair():
    register(DynAIR)
    yield DynAIR
    METHODS.pop(DynAIR.name, None)


def test_engine_trains_and_resumes_across_a_strength_change(dynair, tmp_path):
    """digits 8 px, 2 steps per epoch, 2 epochs: the run stopped after step 3 (inside the second epoch,
    strength 0.5) and resumed equals the run never stopped; the views and w follow the strength."""
    def config(out, **extra):  # K = 1: a new strength every epoch
        run = dict(RUN, out=str(out), method_options=dict(RUN["method_options"], step=1))
        return build_config(dynair.name, None, "digits", [run, extra])

    straight = Trainer(config(tmp_path / "a"))
    assert straight.augment.num_views == 3 and straight.total_steps == 4
    straight.fit()
    assert straight.method.augment.views == air_views(0.5)  # epoch 2 of 2, K = 1
    assert straight.method.air_weight == pytest.approx(2 / 3 * 0.5)
    Trainer(config(tmp_path / "b", max_steps=3)).fit()
    resumed = Trainer(config(tmp_path / "b"), resume=True)
    assert resumed.step == 3
    resumed.fit()
    sa, sb = straight.method.state_dict(), resumed.method.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all({"loss_nat", "loss_adv", "loss_sir", "loss_air"} <= set(r) for r in rows if "loss" in r)


def test_cli_trains_acl_air_and_advfast_eval_reads_it(tmp_path):
    out = tmp_path / "acl-air"
    rc = train_main(["--method", "acl", "--dataset", "digits", "--out", str(out), "--no-progress",
                     "--batch-size", "64", "--set", "method.air=true", "--set", "method.air_kl=paper",
                     "--set", "max_steps=2", "--set", "attack.steps=1", "--set", "image_size=8"])
    assert rc == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method_options"]["air"] in (True, "true")
    assert eval_main(["--checkpoint", str(out), "--protocol", "slf", "--attacks", "pgd20", "--epochs", "1",
                      "--n-eval", "16", "--out", str(tmp_path / "eval"), "--no-plots", "--no-progress"]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["bn_branch"] == "pgd"  # the adversarial branch, as ACL-DS and AIR's finetuning.py
