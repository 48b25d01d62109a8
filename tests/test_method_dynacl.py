"""dynacl (DynACL, PKU-ML/DYNACL): the schedules through the method at epoch boundaries, the per-epoch lr
against the official LambdaLR, one whole training step (attack, swap forwards, EMA update, weighted loss)
against tests/official_dynacl_step.py in float64, the engine on digits with a kill and resume, the CLI
train + eval, and the views on each augmentation backend."""

import copy
import importlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from advfast.cli import train_main
from advfast.config import TrainConfig, apply_overrides, validate
from advfast.data import build_augment
from advfast.data.strength_schedule import dynacl_clean_adv_factors, dynacl_strength, strength_views
from advfast.engine import Trainer, build_config
from advfast.eval.cli import eval_main
from advfast.methods import METHODS
from advfast.models import single_branch_state_dict
from advfast.optim import build_scheduler

HERE = Path(__file__).resolve().parent
pgd_module = importlib.import_module("advfast.attacks.pgd")  # the module (the package exports a function pgd)
_spec = importlib.util.spec_from_file_location("official_dynacl_step", HERE / "official_dynacl_step.py")
official = sys.modules.setdefault("official_dynacl_step", importlib.util.module_from_spec(_spec))
if not hasattr(official, "official_dynacl_step"):
    _spec.loader.exec_module(official)
official_dynacl_step = official.official_dynacl_step
DynACL = METHODS["dynacl"]
# digits at 8 px, batch 512: 2 steps per epoch
RUN = dict(progress=False, log_every=1, ckpt_every=1, deterministic=True, attack=dict(steps=1), keep_last=10,
           image_size=8, batch_size=512, method_options=dict(head_hidden=16))


def make(epochs=1000, **options):
    cfg = TrainConfig(method="dynacl")
    apply_overrides(cfg, DynACL.preset("digits"))
    cfg.epochs, cfg.image_size = epochs, 8
    cfg.method_options.update(head_hidden=16, **{"ema_momentum": 0.99, **options})  # the official momentum
    method = DynACL(cfg, 10, (0.5,), (0.25,))
    method.augment = build_augment(DynACL.augment_for(None), backend="torch", size=8)
    return method


# ---- schedules ------------------------------------------------------------------------------------------

def test_views_and_loss_factors_follow_the_official_schedule_at_epoch_boundaries():
    m = make(step=50)
    # 0-based engine epochs: 49 is epoch 50 (w has stepped, the strength not yet: quirk 1), 50 is epoch 51
    for e0, s, w in [(0, 1.0, 1.0), (48, 1.0, 1.0), (49, 1.0, 1 + 50 / 1000 * 2 / 3), (50, 0.95, 1 + 50 / 1000 * 2 / 3),
                     (99, 0.95, 1 + 100 / 1000 * 2 / 3), (100, 0.9, 1 + 100 / 1000 * 2 / 3), (999, 0.05, 1 + 2 / 3)]:
        m.on_epoch_start(e0)
        assert dynacl_strength(e0 + 1, 1000, 50) == pytest.approx(s, abs=1e-15)
        assert m.augment.views == strength_views(dynacl_strength(e0 + 1, 1000, 50), "bilinear"), e0
        assert (m.clean_factor, m.adv_factor) == pytest.approx(((2 - w) / 2, w / 2), abs=1e-15), e0
        assert type(m.clean_factor) is float and type(m.adv_factor) is float
    crop, _, jitter, gray = m.augment.views[0]
    assert crop.scale == pytest.approx((1 - 0.9 * 0.05, 1.0)) and crop.interpolation == "bilinear"
    assert (jitter.brightness, jitter.hue, jitter.p, gray.p) == pytest.approx((0.02, 0.005, 0.04, 0.01))

    aligned = make(step=50, weight_schedule="aligned")
    for e0, w in [(49, 1.0), (50, 1 + 2 / 3 * 0.05), (999, 1 + 2 / 3 * 0.95)]:
        aligned.on_epoch_start(e0)
        assert (aligned.clean_factor, aligned.adv_factor) == pytest.approx(((2 - w) / 2, w / 2), abs=1e-15)


def test_digits_preset_steps_every_two_epochs():
    cfg = build_config("dynacl", None, "digits", [dict(out="/tmp/unused")])
    assert cfg.method_options["step"] == 2 and cfg.epochs == 10
    m = DynACL(cfg, 10, (0.5,), (0.25,))
    # the EMA view encoder averages over ~one digits epoch (0.9); CIFAR keeps the official 0.99
    assert m.options.ema_momentum == 0.9 and 0.9 ** (10 * (1438 // 128)) < 1e-4
    assert "ema_momentum" not in build_config("dynacl", None, "cifar10", [dict(out="/tmp/u")]).method_options
    assert DynACL.Options().ema_momentum == 0.99
    m.augment = build_augment(DynACL.augment_for(None), backend="torch", size=16)
    strengths = []
    for e0 in range(10):
        m.on_epoch_start(e0)
        strengths.append(m.augment.views[0][0].scale[0])
    assert strengths == pytest.approx([1 - 0.9 * s for s in (1, 1, .8, .8, .6, .6, .4, .4, .2, .2)])
    assert (m.clean_factor, m.adv_factor) == pytest.approx(dynacl_clean_adv_factors(10, 10, 2))
    assert m.adv_factor == pytest.approx((1 + 2 / 3) / 2)  # the official last weight


def _official_cosine_annealing(step, total_steps, lr_max, lr_min, warmup_steps=0):
    """PKU-ML/DYNACL utils.cosine_annealing, transcribed: warmup (step + 1) / warmup."""
    if step < warmup_steps:
        return lr_max * (step + 1) / warmup_steps
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos((step - warmup_steps) / (total_steps - warmup_steps)
                                                            * math.pi))


@pytest.mark.parametrize("dataset", ["cifar10", "digits"])
def test_lr_is_stepped_once_per_epoch_as_the_official_lambda_lr(dataset):
    cfg = build_config("dynacl", None, dataset, [dict(out="/tmp/unused")])
    o = cfg.optim
    assert (o.name, o.step_every, o.warmup_point, o.warmup_start_lr, o.min_lr) == ("lars", "epoch", "end", 0.0, 1e-6)
    if dataset == "cifar10":
        assert (cfg.epochs, cfg.batch_size, o.lr, o.weight_decay, o.warmup_epochs) == (1000, 512, 5.0, 1e-6, 10.0)
        assert (cfg.attack.steps, cfg.attack.eps, cfg.attack.alpha, cfg.temperature) == (5, 8 / 255, 2 / 255, 0.5)
    spe, epochs, warmup = (1 if dataset == "cifar10" else 3), cfg.epochs, int(o.warmup_epochs)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)  # the schedule alone
    sched = build_scheduler(opt, o, steps_per_epoch=spe, epochs=epochs)
    lrs = []
    for i in range(spe * epochs):  # the lr of iteration i (the engine steps it: see the engine test's rows)
        sched.last_epoch = i
        lrs.append(sched.get_lr()[0])
    per_epoch = lrs[::spe]
    assert all(lrs[i] == lrs[i - i % spe] for i in range(len(lrs)))  # constant inside an epoch
    official = [o.lr * _official_cosine_annealing(e, epochs, 1, 1e-6 / o.lr, warmup_steps=warmup) for e in range(epochs)]
    assert per_epoch == pytest.approx(official, rel=1e-12, abs=1e-15)
    if dataset == "cifar10":  # epoch 1 at half the peak, 10 and 11 at the peak, the last just above 1e-6
        assert per_epoch[0] == pytest.approx(0.5) and per_epoch[9] == per_epoch[10] == pytest.approx(5.0)
        assert per_epoch[-1] == pytest.approx(1e-6 + (5 - 1e-6) * 0.5 * (1 + math.cos(989 / 990 * math.pi)), rel=1e-12)
    cfg.optim.warmup_epochs = 2.5
    with pytest.raises(ValueError, match="optim.warmup_epochs must be a whole number of epochs"):
        validate(cfg)


# ---- one whole step against the official iteration ------------------------------------------------------

def _interleave(a, b):
    return torch.stack([a, b], 1).reshape(-1, *a.shape[1:])


@pytest.mark.parametrize("epoch,epochs,step", [(1, 1000, 50), (50, 1000, 50), (7, 10, 2)])
def test_one_training_step_equals_the_official_iteration(monkeypatch, epoch, epochs, step):
    torch.manual_seed(epoch)
    m = make(epochs=epochs, step=step)
    m.cfg.attack.steps = 2
    with torch.no_grad():  # k away from q, so each half's encoder matters
        for p in m.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.double()
    ref = copy.deepcopy(m)
    b, eps = 6, 8 / 255
    x1, x2 = (eps + (1 - 2 * eps) * torch.rand(b, 1, 8, 8, dtype=torch.float64) for _ in range(2))
    delta0 = (torch.rand(2 * b, 1, 8, 8, dtype=torch.float64) * 2 - 1) * eps  # view-major
    monkeypatch.setattr(pgd_module, "draw_start", lambda x, *a, **k: x + delta0)
    m.on_epoch_start(epoch - 1)
    m.train()
    loss, metrics = m.training_step(types.SimpleNamespace(views=[x1, x2]))
    loss.backward()

    q = lambda x, bn: ref.head(ref.backbone(x, bn), bn)  # noqa: E731
    k = lambda x, bn: ref.ema.head(ref.ema.encoder(x, bn), bn)  # noqa: E731
    expected, _ = official_dynacl_step(_Mode(q, ref.backbone, ref.head), _Mode(k, ref.ema), _interleave(x1, x2),
                                       _interleave(delta0[:b], delta0[b:]), epoch, epochs, step, iters=2)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        if name.startswith("ema."):  # updated before the step from q's pre-step weights
            torch.testing.assert_close(p, p_ref, rtol=0, atol=1e-15)
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12)
    for (name, buf), buf_ref in zip(m.named_buffers(), ref.buffers()):
        torch.testing.assert_close(buf, buf_ref, rtol=1e-12, atol=1e-14, msg=name)
    assert set(metrics) == {"loss_clean", "loss_adv"}


class _Mode:
    """A callable encoder whose .train()/.eval() switch the modules it runs (as the official model's)."""

    def __init__(self, fn, *modules):
        self.fn, self.modules = fn, modules

    def __call__(self, x, bn):
        return self.fn(x, bn)

    def train(self):
        for module in self.modules:
            module.train()

    def eval(self):
        for module in self.modules:
            module.eval()

    def parameters(self):
        for module in self.modules:
            yield from module.parameters()


def test_ema_view_off_is_plain_acl_ds_forwards_and_options_are_checked():
    m = make(ema_view=False)
    assert not hasattr(m, "ema") and m.encoder is m.backbone and m.eval_branch == "pgd"
    assert m.trainable_parameters() == list(m.parameters())
    on = make()
    assert on.encoder is on.ema.encoder and all(not p.requires_grad for p in on.ema.parameters())
    assert not {id(p) for p in on.ema.parameters()} & {id(p) for p in on.trainable_parameters()}
    for options, match in [(dict(loss_weight_adv=2.0), "loss_weight_adv is ACL's"),
                           (dict(weight_schedule="paper"), "weight_schedule must be 'dynacl' or 'aligned'"),
                           (dict(ema_momentum=1.5), "ema_momentum must be in"),
                           (dict(step=0), "step must be >= 1"),
                           (dict(lp_trades_random_start=0.001), "add --variant dynacl\\+\\+"),
                           (dict(post_process="lp-aft", lp_attack_target="pgd"), "lp_attack_target is LP-AFF's"),
                           (dict(post_process="lp-aff", lp_attack_target="both"), "lp_attack_target must be")]:
        cfg = build_config("dynacl", None, "digits", [dict(out="/tmp/unused", method_options=options)])
        with pytest.raises(ValueError, match=match):
            validate(cfg)


def test_post_processing_flags_reach_the_stages(monkeypatch):
    import advfast.methods.lp_post_stage as lp

    seen = {}
    monkeypatch.setattr(lp, "lp_aft_stages", lambda m, **kw: seen.setdefault("aft", kw) and [])
    monkeypatch.setattr(lp, "lp_aff_stages", lambda m, **kw: seen.setdefault("aff", kw) and [])
    make(post_process="lp-aft", lp_trades_random_start=0.001).stages()
    make(post_process="lp-aff", lp_attack_target="pgd").stages()
    assert seen["aft"] == {"trades_random_start": 0.001}
    assert seen["aff"] == {"trades_random_start": None, "attack_target_branch": "pgd"}


def test_air_defers_to_acls_air_path_with_dynamic_augmentation():
    cfg = build_config("dynacl", None, "digits", [dict(out="/tmp/unused", method_options=dict(air=True))])
    assert cfg.method_options["air"] is True and cfg.method_options["step"] == 2  # air_preset(digits, dyn_aug=True)
    assert cfg.optim.step_every == "iteration"  # AIR keeps ACL's per-iteration schedule
    cfg.image_size, cfg.attack.steps = 8, 1
    cfg.method_options["head_hidden"] = 16
    m = DynACL(cfg, 10, (0.5,), (0.25,))
    assert not hasattr(m, "ema") and m.encoder is m.backbone  # AIR's DynACL has no EMA view
    assert m.post_process == "none" and make().post_process == "none"
    assert make(post_process="lp-aft").post_process == "lp-aft"
    cfg.variant = "dynacl++"  # DynACL-AIR++: AIR's post-processing, LP-AFF
    assert DynACL(cfg, 10, (0.5,), (0.25,)).post_process == "lp-aff"
    cfg.variant = None
    m.augment = build_augment(DynACL.augment_for(None, cfg.method_options), backend="torch", size=8)
    m.on_epoch_start(2)  # epoch 3 of 10 at K = 2: strength 0.8, AIR's bicubic views and aligned w
    assert m.augment.views[:2] == strength_views(0.8, "bicubic") and m.air_weight == pytest.approx(2 / 3 * 0.2)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    loss, metrics = m.training_step(types.SimpleNamespace(views=m.augment(images)))
    assert torch.isfinite(loss) and {"loss_sir", "loss_air"} <= set(metrics)
    for options, match in [(dict(ema_view=True), "ema_view=true is PKU DynACL's"),
                           (dict(weight_schedule="aligned"), "weight_schedule is PKU DynACL's")]:
        with pytest.raises(ValueError, match=match):
            validate(build_config("dynacl", None, "digits", [dict(out="/tmp/unused",
                                                                  method_options=dict(air=True, **options))]))


# ---- the engine, the CLI, the backends -----------------------------------------------------------------

def config(out, **extra):
    return build_config("dynacl", None, "digits", [dict(RUN, out=str(out), epochs=3,
                                                        method_options=dict(head_hidden=16, step=1)), extra])


def test_engine_trains_exports_the_ema_encoder_and_resumes(tmp_path):
    straight = Trainer(config(tmp_path / "a", max_steps=4))
    straight.fit()
    m = straight.method
    assert m.augment.views == strength_views(dynacl_strength(2, 3, 1), "bilinear")  # epoch 2 of 3 at K = 1
    assert (m.clean_factor, m.adv_factor) == dynacl_clean_adv_factors(2, 3, 1)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.625, 0.625, 1.25, 1.25])  # per-epoch, warmup (e+1)/2
    exported = load_file(tmp_path / "a" / "encoder.safetensors")  # the EMA encoder, not the trained one
    ema, trained = single_branch_state_dict(m.ema.encoder, "pgd"), single_branch_state_dict(m.backbone, "pgd")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k].cpu()) for k in ema)
    assert any(not torch.equal(ema[k], trained[k]) for k in ema)

    # stopped after step 3 (inside epoch 1, a checkpoint per step) and resumed: on_epoch_start(1) runs again
    # before the epoch is replayed (its views and weights), the EMA copy and its BN statistics come back
    Trainer(config(tmp_path / "b", max_steps=3)).fit()
    resumed = Trainer(config(tmp_path / "b", max_steps=4), resume=True)
    assert resumed.step == 3
    resumed.fit()
    assert resumed.augment.views == m.augment.views
    sa, sb = straight.method.state_dict(), resumed.method.state_dict()
    assert sa.keys() == sb.keys() and any(k.startswith("ema.") for k in sa)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_dynacl_plus_plus_runs_lp_aft_after_the_exported_pretraining(tmp_path):
    cfg = build_config("dynacl", "dynacl++", "digits", [dict(RUN, out=str(tmp_path), epochs=1, max_steps=3,
                                                             method_options=dict(head_hidden=16, step=1))])
    trainer = Trainer(cfg)
    assert [s.name for s in trainer.plan.stages] == ["pretrain", "lp-aft-probe", "lp-aft"]  # AFT: one stage, step lr
    trainer.fit()  # pre-training (2 steps), then the first probe step (pseudo labels from the EMA encoder)
    m = trainer.method
    assert trainer.stage.name == "lp-aft-probe" and m.lp_labels.ready
    exported = load_file(tmp_path / "stages" / "pretrain" / "encoder.safetensors")
    assert exported.keys() == single_branch_state_dict(m.ema.encoder, "pgd").keys()


def test_cli_trains_and_advfast_eval_reads_the_export(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--method", "dynacl", "--dataset", "digits", "--out", str(out), "--no-progress",
                       "--image-size", "8", "--batch-size", "512", "--set", "epochs=2", "--set", "attack.steps=1",
                       "--set", "method.head_hidden=16"]) == 0
    assert (out / "encoder.safetensors").is_file()
    info = json.loads((out / "encoder.json").read_text())
    assert (info["method"], info["variant"], info["bn_branch"]) == ("dynacl", "dynacl", "pgd")
    ev = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(out), "--protocol", "slf", "--attacks", "pgd20", "--epochs", "1",
                      "--n-eval", "16", "--out", str(ev), "--no-plots", "--no-progress"]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert res["bn_branch"] == "pgd" and 0 <= res["robust_accuracy"]["pgd20"] <= 1


@pytest.mark.parametrize("backend", ["torch", "torchvision"])
def test_strength_views_reach_the_backend(backend):
    m = make(step=50)
    m.augment = build_augment(DynACL.augment_for(None), backend=backend, size=8)
    ramp = torch.linspace(0, 1, 8)
    x = ramp[:, None].expand(64, 1, 8, 8)  # smooth and flip-symmetric: a small crop moves pixels a little
    images = (x * 255).round().to(torch.uint8)
    x = images.float() / 255
    m.on_epoch_start(999)  # strength 0.05: crops of 95.5-100 % of the image, nearly no jitter
    assert m.augment.views == strength_views(dynacl_strength(1000, 1000, 50), "bilinear")
    late = m.augment(images, generator=torch.Generator().manual_seed(0))
    m.on_epoch_start(0)
    assert m.augment.views == strength_views(1.0, "bilinear")
    early = m.augment(images, generator=torch.Generator().manual_seed(0))
    # the batches themselves: weak views stay close to the image, strong ones do not
    gap = lambda views: (views[0].float() - x).abs().mean().item()  # noqa: E731
    assert gap(late) < 0.5 * gap(early), (gap(late), gap(early))


def test_compile_covers_the_trained_encoder_and_its_ema_copy(tmp_path):
    # the step runs view 1 through the trained encoder and view 2 through the EMA copy: compile=true compiles both
    cfg = build_config("dynacl", None, "digits", [dict(RUN, out=str(tmp_path / "c"), compile=True,
                                                       compile_backend="eager")])
    trainer = Trainer(cfg)
    m = trainer.method
    assert [t is x for t, x in zip(m.compile_targets(), (m.backbone, m.ema.encoder))] == [True, True]
    assert all(getattr(t, "_compiled_call_impl", None) is not None for t in m.compile_targets())
    plain = make(ema_view=False)
    assert len(plain.compile_targets()) == 1 and plain.compile_targets()[0] is plain.backbone
