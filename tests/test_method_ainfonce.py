"""A-InfoNCE wired into advcl and rocl (method.asymmetric=ip|hn|iphn), against float64 transcriptions of
yqy2001/A-InfoNCE @ b28763e (Asym-AdvCL pretraining_advCL.py: AttackPGD, train; Asym-RoCL rocl_train.py,
attack_lib.py): the loss of every variant through the methods (training and attack criteria, the fused
backend), the adaptive degree over epochs and across a checkpoint, one whole advcl+iphn and rocl+ip step
(attack, loss, gradients, BN statistics), RoCL's coded 0.5 in its attack and regulariser, the presets,
and the CLI on digits followed by advfast-eval.

The loss transcriptions are those of tests/test_asymmetric_infonce.py (loaded from it, not copied)."""

import copy
import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advfast.cli import train_main
from advfast.data import Batch
from advfast.engine import Trainer, build_config
from advfast.eval.cli import eval_main
from advfast.methods import METHODS

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_ainfonce_transcriptions", HERE / "test_asymmetric_infonce.py")
_t = sys.modules.setdefault("_ainfonce_transcriptions", importlib.util.module_from_spec(_spec))
if not hasattr(_t, "official_supcon"):
    _spec.loader.exec_module(_t)
official_supcon, official_rocl, official_degree = _t.official_supcon, _t.official_rocl, _t.official_degree
_spec_advcl = importlib.util.spec_from_file_location("_advcl_transcriptions", HERE / "test_method_advcl.py")
_a = sys.modules.setdefault("_advcl_transcriptions", importlib.util.module_from_spec(_spec_advcl))
if not hasattr(_a, "generate_high_official"):
    _spec_advcl.loader.exec_module(_a)

D64 = torch.float64
N_IMAGES = 1024  # the synthetic dataset
KS = (2, 5)
B = 8


def _labels_file(tmp_path):
    g = np.random.default_rng(1)
    arrays = {f"pseudo_train_{k}": g.integers(0, k, N_IMAGES).astype(np.int32) for k in KS}
    path = tmp_path / "labels.pkl"
    path.write_bytes(pickle.dumps(arrays, protocol=3))
    return path, {k: torch.from_numpy(arrays[f"pseudo_train_{k}"]).long() for k in KS}


def _advcl(tmp_path, steps=2, **options):
    opts = dict(head_hidden=16, cluster_ks=",".join(map(str, KS)), pseudo_labels=str(_labels_file(tmp_path)[0]))
    opts.update(options)
    cfg = build_config("advcl", None, "synthetic", overrides=[{
        "arch": "convnet", "image_size": 8, "batch_size": B, "epochs": 1,
        "attack": {"steps": steps, "random_start": False}, "method_options": opts}])
    torch.manual_seed(0)
    return METHODS["advcl"](cfg, 10, (0.5,) * 3, (0.25,) * 3)


def _rocl(temperature=0.5, steps=2, **options):
    cfg = build_config("rocl", None, "digits", overrides=[{
        "image_size": 8, "batch_size": B, "temperature": temperature,
        "attack": {"steps": steps, "random_start": False}, "method_options": dict(head_hidden=16, **options)}])
    torch.manual_seed(0)
    return METHODS["rocl"](cfg, 10, (0.5,) * 3, (0.25,) * 3)


def _batch(n_views, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = [torch.rand(B, 3, 8, 8, generator=g, dtype=D64) for _ in range(n_views)]
    return Batch(views, torch.zeros(B, dtype=torch.int64), torch.randperm(N_IMAGES, generator=g)[:B])


def _vg(fn, z0):
    z = z0.clone().requires_grad_(True)
    loss = fn(z)
    return loss.detach(), torch.autograd.grad(loss, z)[0]


# ---- the losses through the methods --------------------------------------------------------------------
OFFICIAL_ADVCL = {"ip": dict(hn=False, w=1.2, tau=0.1), "hn": dict(hn=True, w=1.0, tau=0.12),
                  "iphn": dict(hn=True, w=0.7, tau=0.1)}


@pytest.mark.parametrize("variant,backend", [("ip", "torch"), ("ip", "torch-chunked"), ("hn", "auto"),
                                             ("iphn", "auto")])
def test_advcl_losses_are_the_official_criteria(tmp_path, variant, backend):
    """Training criterion (stop-grad for ip*, at a tensor degree) and the attack's (ori_SupConLoss for
    ip and with --attack_ori; HN when attack_plain is off), value and gradient in float64."""
    m = _advcl(tmp_path, asymmetric=variant, loss_backend=backend)
    off = OFFICIAL_ADVCL[variant]
    ip = variant.startswith("ip")
    z0 = F.normalize(torch.randn(4 * 6, 16, dtype=D64), dim=1)
    sd = torch.tensor(0.37, dtype=D64)

    def views(z):
        return list(z.split(6))

    def official(z, hn, stop_grad):
        return official_supcon(torch.stack(z.split(6), 1), hn, stop_grad, sd, off["w"], tau_plus=off["tau"])

    for got_fn, ref_fn in [
        (lambda z: m.contrastive_loss(views(z), degree=sd), lambda z: official(z, off["hn"], ip)),
        (lambda z: m.contrastive_loss(views(z), attack=True), lambda z: official(z, False, False)),
    ]:
        got, ref = _vg(got_fn, z0), _vg(ref_fn, z0)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
    if off["hn"]:  # without --attack_ori the attack uses the training criterion, stop_grad=False
        m2 = _advcl(tmp_path, asymmetric=variant, attack_plain=False)
        got = _vg(lambda z: m2.contrastive_loss(views(z), attack=True), z0)
        ref = _vg(lambda z: official(z, True, False), z0)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)


def test_advcl_plain_loss_unchanged_and_corrected_forms_reach_the_loss(tmp_path):
    z = [F.normalize(torch.randn(5, 8, dtype=D64), dim=1) for _ in range(4)]
    plain = _advcl(tmp_path)
    assert plain.asym is None and plain.asym_degree is None
    from advfast.ops.contrastive import nt_xent_reference
    torch.testing.assert_close(plain.contrastive_loss(z), nt_xent_reference(torch.cat(z), 4, 0.5, normalize=False)
                               * (0.5 / 0.07))
    coded = _advcl(tmp_path, asymmetric="ip").contrastive_loss(z, attack=True)  # w = 1.2 -> w² aliasing
    fixed = _advcl(tmp_path, asymmetric="ip", fix_aliasing=True).contrastive_loss(z, attack=True)
    assert not torch.allclose(coded, fixed)
    row = _advcl(tmp_path, asymmetric="hn", hn_rowwise=True).contrastive_loss(z)
    assert not torch.allclose(row, _advcl(tmp_path, asymmetric="hn").contrastive_loss(z))


@pytest.mark.parametrize("variant", ["ip", "hn", "iphn"])
def test_rocl_rep_loss_is_asym_rocl_and_pairs_stay_plain_at_0_5(variant):
    m = _rocl(temperature=0.3, asymmetric=variant)
    hn, ip = "hn" in variant, variant.startswith("ip")
    z0 = torch.randn(3 * 6, 8, dtype=D64)
    got = _vg(m.rep_loss, z0)
    ref = _vg(lambda z: official_rocl(z, "Rep", hn, ip, 0.2, 1.0, tau=0.12, temperature=0.3), z0)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-10, atol=1e-12)
    # attack_lib.py: the attack's and the regulariser's NT_xent 'None' at a literal 0.5
    a, b = torch.randn(6, 8, dtype=D64), torch.randn(6, 8, dtype=D64)
    ref_pair = official_rocl(torch.cat([a, b]), "None", False, False, 0.2, 1.0, temperature=0.5)
    torch.testing.assert_close(m.pair_loss(a, b), ref_pair, rtol=1e-12, atol=1e-12)


def test_rocl_uniform_temperature_flag():
    a, b = torch.randn(6, 8, dtype=D64), torch.randn(6, 8, dtype=D64)
    coded, uniform = _rocl(temperature=0.3), _rocl(temperature=0.3, uniform_temperature=True)
    assert (coded.pair_temperature, uniform.pair_temperature) == (0.5, 0.3)
    torch.testing.assert_close(uniform.pair_loss(a, b), official_rocl(torch.cat([a, b]), "None", False, False, 0.2,
                                                                     1.0, temperature=0.3), rtol=1e-12, atol=1e-12)
    z = torch.randn(18, 8, dtype=D64)  # the 'Rep' loss reads the configured temperature either way
    torch.testing.assert_close(coded.rep_loss(z), uniform.rep_loss(z))
    rocl = METHODS["rocl"]
    with pytest.raises(ValueError, match="loss_form=paper"):
        rocl.check_options(rocl.parse_options({"asymmetric": "ip", "loss_form": "paper"}), None)


# ---- the adaptive degree ---------------------------------------------------------------------------------
def test_adaptive_degree_follows_the_official_meter_over_epochs_and_a_reload(tmp_path):
    m = _advcl(tmp_path, asymmetric="ip", adaptive_warmup_epochs=3, d_min=0.4)
    epochs = [e for e in range(6) for _ in range(3)]
    # warm-up (epochs 1-3) mean 0.75; then above the mean (base), below d_min (cap 0.5) and between (ramp)
    values = [0.8, 0.7, 0.9, 0.6, 0.75, 0.85, 0.65, 0.7, 0.8, 1.0, 0.3, 0.55, 0.6, 0.9, 0.45, 0.35, 1.1, 0.5]
    dist = [torch.tensor(x, dtype=D64) for x in values]
    ref = official_degree(dist, epochs, batch=B, adaptive=3)
    got, reloaded = [], None
    for i, (d, e) in enumerate(zip(dist, epochs)):
        if i == 10:  # a resume mid-epoch: a new method loading the state dict, on_epoch_start again
            state = copy.deepcopy(m.state_dict())
            assert {"asym_degree.sum", "asym_degree.count"} <= set(state)
            reloaded = _advcl(tmp_path, asymmetric="ip", adaptive_warmup_epochs=3, d_min=0.4)
            reloaded.load_state_dict(state)
            m = reloaded
        m.on_epoch_start(e)
        got.append(float(m.asym_degree(d, B, m._epoch)))
    assert got == pytest.approx(ref, rel=1e-12)
    assert len({round(x, 9) for x in got[9:]}) > 2  # base, the ramp and the cap all occur
    assert _advcl(tmp_path, asymmetric="ip", adaptive_warmup_epochs=None).asym_degree is None  # fixed degree
    assert _advcl(tmp_path, asymmetric="hn").asym_degree is None


# ---- one whole official step in float64 ---------------------------------------------------------------------
EPS, ALPHA = 8 / 255, 2 / 255


def official_advcl_iphn_step(m, x1, x2, org, hfc, targets, meter, epoch, w=0.7, tau_plus=0.1, adaptive=1):
    """pretraining_advCL.py (IPHN shell: --attack_ori, no random start here) on advfast's modules as the
    official model: AttackPGD.forward, then train(): forwards, the adaptive degree, the HN+IP loss, backward.
    Returns (loss, x_cl, x_ce, sd). The CE divides by the number of heads (the code's 5 heads: 5)."""
    def proj(x, bn):
        return F.normalize(m.head(m.backbone(x, bn), bn), dim=1)

    def logits_ce(x):
        h = m.backbone(x, "pgd_ce")
        return [m.cluster_heads[f"fc_{k:03d}"](h) for k in KS]

    n = len(KS)
    x_cl, x_ce = org.clone(), org.clone()
    for _ in range(2):
        x_cl.requires_grad_()
        x_ce.requires_grad_()
        with torch.enable_grad():
            f = torch.stack([proj(x_cl, "pgd"), proj(x1, "normal"), proj(x2, "normal"), proj(hfc, "normal")], 1)
            lgs = logits_ce(x_ce)
            loss = official_supcon(f, False, False, None, w)  # ori_SupConLoss, stop_grad=False
            loss = loss + 0.2 * sum(F.cross_entropy(lg, targets[k], reduction="sum") / n for lg, k in zip(lgs, KS))
        g_cl, g_ce = torch.autograd.grad(loss, [x_cl, x_ce])
        x_cl = torch.clamp(torch.min(torch.max(x_cl.detach() + ALPHA * torch.sign(g_cl), org - EPS), org + EPS), 0, 1)
        x_ce = torch.clamp(torch.min(torch.max(x_ce.detach() + ALPHA * torch.sign(g_ce), org - EPS), org + EPS), 0, 1)
    f_proj = proj(x_cl, "pgd")
    lgs = logits_ce(x_ce)
    f = torch.stack([f_proj, proj(x1, "normal"), proj(x2, "normal"), proj(hfc, "normal")], 1)
    sd = 0.2
    with torch.no_grad():
        f_ori, f_cl = m.backbone(org, "normal"), m.backbone(x_cl, "normal")
    d = F.pairwise_distance(f_ori, f_cl).mean()
    if epoch + 1 > adaptive:
        if d > meter.avg:
            pass
        elif d < 0.4:
            sd = 0.5
        else:
            sd = (meter.avg - d) / (meter.avg - 0.4) * (0.5 - 0.2) + 0.2
    else:
        meter.update(d, org.shape[0])
    loss = official_supcon(f, True, True, sd, w, tau_plus=tau_plus)
    loss = loss + 0.2 * sum(F.cross_entropy(lg, targets[k]) / n for lg, k in zip(lgs, KS))
    return loss, x_cl, x_ce, sd


def test_advcl_iphn_step_is_the_official_step(tmp_path, monkeypatch):
    # refresh_clean_views: the official attack re-embeds x1, x2, x_hfc at every step, so the BN statistics match
    m = _advcl(tmp_path, asymmetric="iphn", adaptive_warmup_epochs=1, refresh_clean_views=True).double().train()
    ref = copy.deepcopy(m)
    _, labels = _labels_file(tmp_path)
    # advfast.data.high_frequency computes in float32; the step is compared on one float64 HFC view
    monkeypatch.setattr(m, "hfc_view", lambda org: _t_hfc(org))
    meter = _t._OfficialAverageMeter()
    opt, opt_ref = (torch.optim.SGD(x.parameters(), lr=0.5, momentum=0.9) for x in (m, ref))
    real_attack = m.attack
    for step, epoch in enumerate([0, 1]):  # epoch 1 accumulates the mean, epoch 2 adapts
        batch = _batch(3, seed=step)
        x1, x2, org = batch.views
        targets = {k: labels[k][batch.indices] for k in KS}
        m.on_epoch_start(epoch)
        attacked = {}
        monkeypatch.setattr(m, "attack", lambda *a: attacked.setdefault("x", real_attack(*a)))
        loss, metrics = m.training_step(batch)
        opt.zero_grad()
        loss.backward()
        ref_loss, x_cl, x_ce, sd = official_advcl_iphn_step(ref, x1, x2, org, _t_hfc(org), targets, meter, epoch)
        opt_ref.zero_grad()
        ref_loss.backward()
        torch.testing.assert_close(attacked["x"][0], x_cl, rtol=0, atol=1e-12)
        torch.testing.assert_close(attacked["x"][1], x_ce, rtol=0, atol=1e-12)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(metrics["stop_grad_degree"], torch.as_tensor(sd, dtype=D64), rtol=1e-11, atol=0)
        for (k, p), q in zip(m.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda s, k=k: f"{k}: {s}")
        for k, b in m.backbone.named_buffers():  # the adaptive degree's train-mode forwards update 'normal'
            torch.testing.assert_close(b, dict(ref.backbone.named_buffers())[k], rtol=1e-11, atol=1e-12)
        opt.step()
        opt_ref.step()
    assert float(m.asym_degree.count) == B  # epoch 1 accumulated, epoch 2 adapted from the frozen mean
    torch.testing.assert_close(m.asym_degree.sum / m.asym_degree.count, torch.as_tensor(meter.avg, dtype=D64))


def _t_hfc(org):
    """fr_util.generate_high in float64 (tests/test_method_advcl.py's transcription), r = 8 x 8/32."""
    return _a.generate_high_official(org, 8 * 8 / 32)


def test_rocl_ip_step_is_the_official_step():
    """rocl_train.py with the IP shell (--stop_grad --stpg_degree 0.2), --temperature 0.3: the attack
    (eval mode, NT_xent 'None' at the literal 0.5), the regulariser forward first, then 'Rep'."""
    m = _rocl(temperature=0.3, asymmetric="ip").double().train()
    ref = copy.deepcopy(m)
    batch = _batch(2, seed=3)
    x1, x2 = batch.views
    loss, metrics = m.training_step(batch)
    loss.backward()

    def out(x):
        return ref.head(ref.backbone(x))

    ref.eval()  # the official attack: model and projector in eval mode, gradients to the input only
    x = x1.clone()
    for _ in range(2):
        x.requires_grad_()
        with torch.enable_grad():
            att = official_rocl(out(torch.cat([x, x2])), "None", False, False, 0.2, 1.0, temperature=0.5)
        (g,) = torch.autograd.grad(att, x)
        x = torch.clamp(torch.min(torch.max(x.detach() + 0.007 * torch.sign(g), x1 - 0.0314), x1 + 0.0314), 0, 1)
    ref.train()
    reg = official_rocl(out(torch.cat([x, x2])), "None", False, False, 0.2, 1.0, temperature=0.5)
    rep = official_rocl(out(torch.cat([x1, x2, x])), "Rep", False, True, 0.2, 1.0, temperature=0.3)
    ref_loss = rep + reg / 256
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(metrics["loss_adv_reg"], reg.detach(), rtol=1e-11, atol=1e-12)
    for (k, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda s, k=k: f"{k}: {s}")
    for (k, b), c in zip(m.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-11, atol=1e-12, msg=lambda s, k=k: f"{k}: {s}")


# ---- presets, options ----------------------------------------------------------------------------------
def test_presets_follow_the_official_shells():
    from advfast.methods.advcl import advcl_preset
    for variant, lr in [("ip", 1.0), ("hn", 1.2), ("iphn", 2.0)]:
        cfg = build_config("advcl", None, "cifar10", [{"method_options": {"asymmetric": variant}}])
        assert (cfg.epochs, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.min_lr) == (400, lr, 1e-4,
                                                                                          pytest.approx(lr * 1e-3))
        assert cfg.method_options["attack_plain"] == (variant != "ip")
        digits = build_config("advcl", None, "digits", [{"method_options": {"asymmetric": variant}}])
        assert digits.optim.lr == pytest.approx(lr * 128 / 512) and digits.epochs == advcl_preset("digits")["epochs"]
    for variant, lr in [("ip", 0.1), ("hn", 0.2), ("iphn", 0.3)]:
        cfg = build_config("rocl", None, "cifar10", [{"method_options": {"asymmetric": variant}}])
        assert (cfg.optim.lr, cfg.optim.warmup_start_lr, cfg.epochs) == (pytest.approx(15 * lr), lr, 1000)
    plain = build_config("advcl", None, "cifar10")
    assert (plain.epochs, plain.optim.lr) == (1000, 0.5)
    # a user's value wins over the variant's preset
    cfg = build_config("advcl", None, "cifar10", [{"method_options": {"asymmetric": "ip", "adv_weight": 1.0}}])
    assert cfg.method_options["adv_weight"] == 1.0


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="method.asymmetric must be ip, hn or iphn"):
        _advcl(tmp_path, asymmetric="ipn")
    with pytest.raises(ValueError, match="method.stop_grad_degree must be in"):
        _advcl(tmp_path, asymmetric="ip", stop_grad_degree=1.5)
    with pytest.raises(ValueError, match="loss_backend='triton' cannot compute A-InfoNCE's HN"):
        m = METHODS["advcl"]
        m.check_options(m.parse_options({"asymmetric": "hn", "loss_backend": "triton", "ce_weight": 0}), None)


# ---- the engine and the CLI ----------------------------------------------------------------------------------
def _run_cfg(out, **extra):
    return build_config("advcl", None, "digits", [dict(
        out=str(out), progress=False, log_every=1, ckpt_every=1, deterministic=True, keep_last=10, image_size=8,
        batch_size=512, epochs=3, attack=dict(steps=1),
        method_options=dict(asymmetric="ip", adaptive_warmup_epochs=1, head_hidden=16, ce_weight=0.0)), extra])


def test_engine_resume_continues_the_adaptive_degree_exactly(tmp_path):
    straight = Trainer(_run_cfg(tmp_path / "a", max_steps=4))
    straight.fit()
    Trainer(_run_cfg(tmp_path / "b", max_steps=2)).fit()  # stops inside the adaptive epochs
    resumed = Trainer(_run_cfg(tmp_path / "b", max_steps=4), resume=True)
    assert resumed.step == 2
    resumed.fit()
    sa, sb = straight.method.state_dict(), resumed.method.state_dict()
    assert float(sa["asym_degree.count"]) > 0
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=0, msg=lambda s, k=k: f"{k}: {s}")
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("stop_grad_degree" in r for r in rows)


def test_cli_trains_advcl_iphn_on_digits_and_advfast_eval_reads_it(tmp_path):
    out = tmp_path / "run"
    assert train_main(["--method", "advcl", "--dataset", "digits", "--out", str(out), "--no-progress",
                       "--image-size", "8", "--batch-size", "256", "--set", "epochs=2", "--set", "attack.steps=1",
                       "--set", "method.asymmetric=iphn", "--set", "method.adaptive_warmup_epochs=1",
                       "--set", "method.head_hidden=16", "--set", "method.cluster_ks=2,10"]) == 0
    cfg = json.loads((out / "run.json").read_text())["config"]  # the variant's own preset (lr 2.0 x 128/512)
    assert cfg["optim"]["lr"] == pytest.approx(0.5) and cfg["method_options"]["asymmetric"] == "iphn"
    ev = tmp_path / "eval"
    assert eval_main(["--checkpoint", str(out), "--protocol", "slf", "--attacks", "pgd20", "--epochs", "1",
                      "--n-eval", "16", "--out", str(ev), "--no-plots", "--no-progress"]) == 0
    res = json.loads((ev / "results.json").read_text())
    assert res["bn_branch"] == "pgd" and 0 <= res["robust_accuracy"]["pgd20"] <= 1

