"""DynACL++'s LP-AFT and DynACL-AIR++'s LP-AFF stages (advfast.methods.lp_post_stage) on a small ACL-family
method defined here (``lpdemo``: ACL-DS, convnet, digits at 8 px, registered for the tests only).

- the pseudo labels: advfast's k-means from given initial centres against a float64 transcription of
  kmeans_pytorch 0.3's loop from the same centres (equal labels, equal clustering objective), on blobs and on
  the method's own digits features; the stage's labels are that k-means of the un-augmented, un-normalised
  "normal"-branch eval features;
- one probe step and one AFT step (LP-AFT and LP-AFF) against float64 transcriptions of the official
  ``train_head`` and ``trades_loss`` / AIR's ``trades_loss_dual`` with their SGD step;
- pre-training + LP-AFT through the engine: stages, learning rates, exports, and a SIGKILL inside the AFT
  then --resume (labels read from the checkpoint, never reclustered), bit-identical to the uninterrupted run;
  a resume from the end of pre-training (labels not yet computed) too.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from advfast.data.loader import Batch
from advfast.engine import Trainer, build_config
from advfast.engine.checkpoint import KILL_HOOK_ENV, list_checkpoints, load_checkpoint
from advfast.methods import METHODS, register
from advfast.methods.acl import ACL
from advfast.methods.lp_post_settings import LP_AFF, LP_AFT, for_dataset, lr_segments
from advfast.methods import lp_post_stage
from advfast.methods.lp_post_stage import add_lp_modules, lp_aff_stages, lp_aft_stages, lp_features
from advfast.methods.lp_pseudo_labels import cluster_pseudo_labels, within_cluster_ss
from advfast.models.export import load_encoder
from advfast.optim import build_optimizer

HERE = Path(__file__).resolve()


def _load(name: str):
    """A module of this test directory (--import-mode=importlib: not importable by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_lp_{name}", HERE.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

# the engine test's stages: probe 1 epoch, AFT 2 epochs with the lr step after epoch 1, 2 TRADES steps
SMALL = dataclasses.replace(LP_AFT, probe=dataclasses.replace(LP_AFT.probe, epochs=1),
                            aft=dataclasses.replace(LP_AFT.aft, epochs=2, milestones=(1,), attack_steps=2))


class LPDemo(ACL):
    """ACL-DS with the LP-AFT stages after pre-training (digits 8 px, batch 512: 2 steps per epoch)."""

    name = "lpdemo"
    post = "lp-aft"

    @classmethod
    def preset(cls, dataset, variant=None):
        return dict(arch="convnet", image_size=8, epochs=1, batch_size=512, temperature=0.5,
                    optim=dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="constant",
                               warmup_epochs=0.0),
                    attack=dict(kind="pgd", norm="linf", eps=8 / 255, alpha=2 / 255, steps=1, random_start=True),
                    method_options=dict(head_hidden=16))

    def __init__(self, cfg, num_classes, mean, std):
        super().__init__(cfg, num_classes, mean, std)
        add_lp_modules(self, self.post)

    def stages(self):
        return [self.main_stage(export=True)] + lp_aft_stages(self, SMALL)


class LPDemoAFF(LPDemo):
    post = "lp-aff"

    def stages(self):
        return [self.main_stage(export=True)] + lp_aff_stages(self)


RUN = dict(progress=False, log_every=1, ckpt_every=1, deterministic=True, keep_last=20)


@pytest.fixture
def lpdemo():
    register(LPDemo)
    yield LPDemo
    METHODS.pop(LPDemo.name, None)


def _method(cls=LPDemo, dtype=torch.float64):
    cfg = build_config("acl", None, "digits", [dict(LPDemo.preset("digits"))])
    torch.manual_seed(0)
    return cls(cfg, 10, (0.305,) * 3, (0.3,) * 3).to(dtype)


# ---- transcription: kmeans_pytorch 0.3 (assign_label.py, LP-AFF.py) --------------------------------------


def _official_kmeans_from(x, initial_state, tol):
    """kmeans_pytorch.kmeans after ``initialize`` (tests/test_dynacl_air_parts.py's transcription): the labels."""
    return _load("test_dynacl_air_parts")._official_kmeans_from(x, initial_state, tol)[0]


def _random_points(x, k, seed):
    """kmeans_pytorch's ``initialize``: k distinct data points (np.random.choice without replacement)."""
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]].clone()


def _blobs(k=5, dim=6, n_per=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(k, dim, generator=g, dtype=torch.float64)
    return centres.repeat_interleave(n_per, 0) + torch.randn(k * n_per, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("official_tol", [LP_AFT.labels.official_tol, LP_AFF.labels.official_tol])
def test_kmeans_from_given_centres_matches_kmeans_pytorch(seed, official_tol):
    x, k = _blobs(seed=seed), 5
    init = _random_points(x, k, seed)
    ours = cluster_pseudo_labels(x, k, init=init)
    labels = _official_kmeans_from(x, init, official_tol)
    assert torch.equal(ours.labels, labels)
    assert ours.objective == pytest.approx(within_cluster_ss(x, labels, k), rel=1e-12)
    assert ours.iterations >= 2


def test_kmeans_init_is_checked():
    from advfast.pseudo_labels.kmeans import kmeans

    x = _blobs()
    with pytest.raises(ValueError, match=r"init must be a floating \(k, D\) = \(5, 6\)"):
        kmeans(x, 5, init=x[:4])
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans(x, 5, init=torch.full((5, 6), float("nan"), dtype=torch.float64))
    # given centres: the seed no longer matters
    init = _random_points(x, 5, 3)
    assert torch.equal(kmeans(x, 5, seed=1, init=init).labels, kmeans(x, 5, seed=2, init=init).labels)


def test_stage_labels_are_kmeans_of_plain_normal_branch_features():
    """The labels the stage computes: the seeded k-means of the un-augmented training images' pooled
    'normal'-branch features in eval mode, not normalised; the same objective as kmeans_pytorch's loop from
    the same start on those features."""
    m = _method(dtype=torch.float32)
    m.train()
    lp = lp_post_stage.LPPostProcess(m, for_dataset(LP_AFT, "digits"))
    feats = lp_features(m)
    from advfast.data.build import build_dataset

    data = build_dataset(m.cfg)
    m.eval()
    with torch.no_grad():
        direct = m.backbone(data.images[:64].float() / 255, "normal")
    m.train()
    assert feats.shape == (len(data), m.backbone.feat_dim) and torch.equal(feats[:64], direct)
    assert not torch.allclose(feats.norm(dim=1), torch.ones(len(data)))  # not L2-normalised
    lp.compute_labels()
    assert m.training  # eval only inside
    expected = cluster_pseudo_labels(feats, 10, seed=m.cfg.seed)
    assert torch.equal(m.lp_labels.labels, expected.labels)
    # the objective buffer follows the module's dtype (float32 here)
    assert float(m.lp_labels.objective) == pytest.approx(expected.objective, rel=1e-6)
    x = feats.double()
    init = _random_points(x, 10, 0)
    ours = cluster_pseudo_labels(x, 10, init=init)
    official = _official_kmeans_from(x, init, LP_AFT.labels.official_tol)
    assert ours.objective == pytest.approx(within_cluster_ss(x, official, 10), rel=1e-9)


# ---- transcription: the official probe and AFT steps --------------------------------------------------------


def _official_trades_loss(model, x_natural, y, target_mode, natural_mode, start=None, step_size=2 / 255,
                          epsilon=8 / 255, perturb_steps=10, beta=6.0):
    """PKU-ML/DYNACL utils.trades_loss on the single-BN 'pgd' network (target_mode = natural_mode = 'pgd',
    start None: x itself) and AIR finetuning_utils.trades_loss_dual(natural_mode='pgd') (target 'normal',
    start 0.001 * randn), as coded; ``model(x, bn)``."""
    batch_size = len(x_natural)
    model.eval()
    x_adv = x_natural.detach() if start is None else x_natural.detach() + start
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            model.eval()
            loss_kl = F.kl_div(F.log_softmax(model(x_adv, "pgd"), dim=1), F.softmax(model(x_natural, target_mode), dim=1),
                               reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    logits = model(x_natural, natural_mode)
    loss = F.cross_entropy(logits, y)
    logits_adv = model(x_adv, "pgd")
    loss_robust = (1.0 / batch_size) * F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits, dim=1), reduction="sum")
    return loss + beta * loss_robust


def _official_sgd_first_step(params, lr, weight_decay):
    """torch.optim.SGD(momentum 0.9, weight_decay) first step: the momentum buffer is d_p itself."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p -= lr * (p.grad + weight_decay * p)


def _setup(cls, n=12, seed=0):
    m = _method(cls)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking head (zero init would make the KL trivially flat)
        m.lp_head.weight.copy_(0.5 * torch.randn(m.lp_head.weight.shape, generator=g, dtype=torch.float64))
        m.lp_head.bias.copy_(0.1 * torch.randn(m.lp_head.bias.shape, generator=g, dtype=torch.float64))
    m.lp_labels.set(torch.randint(10, (40,), generator=g), 0.0)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    idx = torch.randperm(40, generator=g)[:n]
    batch = Batch([x, torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)], torch.zeros(n, dtype=torch.long), idx)
    return m, batch, m.lp_labels.labels[idx]


class _Official(torch.nn.Module):
    """The official model: the encoder with the zero-initialised fc, ``model(x, bn)``."""

    def __init__(self, m):
        super().__init__()
        self.encoder, self.fc = copy.deepcopy(m.backbone), copy.deepcopy(m.lp_head)

    def forward(self, x, bn):
        return self.fc(self.encoder(x, bn))


def _engine_step(m, stage, batch):
    m.train()
    stage.on_start()
    opt = build_optimizer(stage.parameters(), stage.optim)
    loss, metrics = stage.training_step(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss, metrics


def test_probe_step_matches_official_train_head():
    m, batch, y = _setup(LPDemo)
    official = _Official(m)
    stage = lp_aft_stages(m)[0]
    assert stage.name == "lp-aft-probe" and (stage.optim.lr, stage.optim.weight_decay) == (0.01, 1e-4)
    loss, _ = _engine_step(m, stage, batch)
    official.requires_grad_(False)
    official.fc.requires_grad_(True)
    official.eval()
    ref = F.cross_entropy(official(batch.views[0], "pgd"), y)
    ref.backward()
    _official_sgd_first_step(official.parameters(), 0.01, 1e-4)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-13)
    torch.testing.assert_close(m.lp_head.weight, official.fc.weight, rtol=0, atol=1e-14)
    torch.testing.assert_close(m.lp_head.bias, official.fc.bias, rtol=0, atol=1e-14)
    assert torch.equal(m.backbone.conv1.weight, official.encoder.conv1.weight)  # frozen
    bn = dict(m.backbone.bn1.bns.named_buffers())
    assert all(torch.equal(v, dict(official.encoder.bn1.bns.named_buffers())[k]) for k, v in bn.items())  # eval


@pytest.mark.parametrize("cls", [LPDemo, LPDemoAFF])
def test_aft_step_matches_official_trades_step(cls):
    """One AFT step (attack, loss, SGD lr 0.1 wd 1e-4) against the float64 transcription of the official
    TRADES step: LP-AFT from x itself (the step-1 direction is the KL's rounding noise, the same ops here and
    in the transcription), LP-AFF from the same 0.001 N(0, 1) start (global RNG seeded identically)."""
    m, batch, y = _setup(cls)
    official = _Official(m)
    lp_stages = lp_aft_stages(m) if cls is LPDemo else lp_aff_stages(m)
    stage = lp_stages[1]
    post = LP_AFT if cls is LPDemo else LP_AFF
    assert stage.name == post.name and stage.optim.lr == 0.1 and stage.optim.momentum == 0.9
    torch.manual_seed(5)
    loss, _ = _engine_step(m, stage, batch)
    x = batch.views[0]
    torch.manual_seed(5)
    start = None if cls is LPDemo else 0.001 * torch.randn(x.shape, dtype=x.dtype)
    target = "pgd" if cls is LPDemo else "normal"
    official.requires_grad_(True)  # the scripts: every parameter trains in the AFT
    ref = _official_trades_loss(official, x, y, target, "pgd", start)
    official.zero_grad()
    ref.backward()
    if cls is LPDemo:  # the single-BN network has no 'normal' BN to update
        assert all(p.grad is None for n, p in official.named_parameters() if ".bns.normal." in n)
    _official_sgd_first_step(official.parameters(), 0.1, 1e-4)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    ours = dict(m.backbone.named_parameters()) | {f"fc.{k}": v for k, v in m.lp_head.named_parameters()}
    theirs = dict(official.encoder.named_parameters()) | {f"fc.{k}": v for k, v in official.fc.named_parameters()}
    before = dict(_Official(_setup(cls)[0]).named_parameters())
    for k, v in theirs.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-12, msg=k)
    assert not torch.equal(theirs["fc.weight"], before["fc.weight"])
    assert not torch.equal(theirs["conv1.weight"], before["encoder.conv1.weight"])
    for k, v in official.encoder.named_buffers():  # BN statistics: pgd updated twice (natural, adversarial)
        torch.testing.assert_close(dict(m.backbone.named_buffers())[k], v, rtol=0, atol=1e-13, msg=k)
    assert not m.backbone.bn1.bns.normal.weight.requires_grad and m.backbone.bn1.bns.pgd.weight.requires_grad
    assert not any(p.requires_grad for p in m.head.parameters())


def test_settings_and_interface():
    assert lr_segments(LP_AFT.aft) == [(10, 0.1), (10, 0.1 * 0.1), (5, 0.1 * 0.1 ** 2)]
    digits = for_dataset(LP_AFT, "digits")
    assert (digits.probe.epochs, digits.aft.epochs, digits.aft.milestones) == (10, 5, (2, 4))
    assert for_dataset(LP_AFT, "cifar10") is LP_AFT
    m = _method(LPDemo, torch.float32)
    names = [(s.name, s.epochs, s.optim.lr, s.export) for s in lp_aft_stages(m)]
    assert names == [("lp-aft-probe", 10, 0.01, False), ("lp-aft", 5, 0.1, True)]
    assert m.lp_head.out_features == 10 and not m.lp_head.weight.any() and not m.lp_head.weight.requires_grad
    assert [s.training_step.__self__.post.aft.trades_random_start for s in lp_aft_stages(m)[1:]] == [0.0]
    other = lp_aft_stages(m, trades_random_start=0.001)[1].training_step.__self__.post.aft
    assert (other.trades_random_start, other.epochs) == (0.001, 5)
    aff = _method(LPDemoAFF, torch.float32)
    assert lp_aff_stages(aff)[1].training_step.__self__.branches.attack_target == "normal"
    assert lp_aff_stages(aff, attack_target_branch="pgd")[1].training_step.__self__.branches.attack_target == "pgd"
    with pytest.raises(ValueError, match=r"trades_random_start must be a number in \[0, 1\)"):
        lp_aft_stages(m, trades_random_start=-1.0)
    with pytest.raises(ValueError, match="add_lp_modules was called for 'lp-aft', the stages are 'lp-aff'"):
        lp_aff_stages(m)
    with pytest.raises(ValueError, match=r"call add_lp_modules\(self, 'lp-aft'\)"):
        lp_aft_stages(_plain_acl())
    # no random numbers drawn: the same weights and RNG state as the method without the LP modules
    torch.manual_seed(0)
    plain = _plain_acl(seeded=False)
    after_plain = torch.get_rng_state()
    torch.manual_seed(0)
    withlp = LPDemo(plain.cfg, 10, (0.305,) * 3, (0.3,) * 3)
    assert torch.equal(after_plain, torch.get_rng_state())
    lp_state = withlp.state_dict()
    assert all(torch.equal(v, lp_state[k]) for k, v in plain.state_dict().items())


def _plain_acl(seeded=True):
    cfg = build_config("acl", None, "digits", [dict(LPDemo.preset("digits"))])
    if seeded:
        torch.manual_seed(0)
    return ACL(cfg, 10, (0.305,) * 3, (0.3,) * 3)


def test_label_buffer_resizes_on_load():
    a, b = _method(LPDemo, torch.float32), _method(LPDemo, torch.float32)
    a.lp_labels.set(torch.arange(7) % 3, 1.5)
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(b.lp_labels.labels, torch.arange(7) % 3) and float(b.lp_labels.objective) == 1.5


# ---- through the engine ----------------------------------------------------------------------------------------


def _config(out, **extra):
    return build_config("lpdemo", None, "digits", [dict(RUN, out=str(out)), extra])


_same_run = _load("same_run")
_rows, _assert_same_run = _same_run.metric_rows, _same_run.assert_same_run


def _count_features(monkeypatch):
    calls = []
    real = lp_post_stage.lp_features

    def counted(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(lp_post_stage, "lp_features", counted)
    return calls


@pytest.mark.slow  # about 30 s on 2 cores (three 8-step runs, one in a subprocess)
def test_pretrain_and_lp_aft_through_the_engine_kill_and_resume(lpdemo, tmp_path, monkeypatch):
    straight = Trainer(_config(tmp_path / "a"))
    assert [s.name for s in straight.plan.stages] == ["pretrain", "lp-aft-probe", "lp-aft"]
    assert straight.steps_per_epoch == 2 and straight.total_steps == 8
    straight.fit()
    rows = _rows(tmp_path / "a")
    assert [r["stage"] for r in rows] == ["pretrain"] * 2 + ["lp-aft-probe"] * 2 + ["lp-aft"] * 4
    assert [r["lr"] for r in rows[2:]] == [0.01] * 2 + [0.1] * 2 + [0.1 * 0.1] * 2
    assert all("lp_probe_acc" in r for r in rows[2:4]) and all("lp_aft_adv_acc" in r for r in rows[4:])
    m = straight.method
    assert m.lp_labels.labels.shape == (1438,) and m.lp_head.weight.any()
    # the labels: k-means of the encoder as pre-training left it (checkpoint 2, written before they existed)
    meta, parts = load_checkpoint(tmp_path / "a" / "checkpoints" / "ckpt-000000002.json")
    assert meta["stage"] == "lp-aft-probe" and parts["model"]["lp_labels.labels"].numel() == 0
    fresh = _method(LPDemo, torch.float32)
    fresh.load_state_dict(parts["model"])
    expected = cluster_pseudo_labels(lp_features(fresh), 10, seed=0)
    assert torch.equal(m.lp_labels.labels, expected.labels)
    # exports: pre-training's, the AFT's, and the run's encoder = the AFT's
    out = tmp_path / "a"
    final, _ = load_encoder(out)
    aft, _ = load_encoder(out / "stages" / "lp-aft")
    pre, _ = load_encoder(out / "stages" / "pretrain")
    fs, as_, ps = final.state_dict(), aft.state_dict(), pre.state_dict()
    assert all(torch.equal(v, as_[k]) for k, v in fs.items())
    assert not all(torch.equal(v, ps[k]) for k, v in fs.items() if v.is_floating_point())

    # SIGKILL while writing checkpoint 6: 5 (inside lp-aft) is the newest whole one
    killed = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{KILL_HOOK_ENV: "6:tensors"})
    args = ["--method", "lpdemo", "--dataset", "digits", "--out", str(killed), "--no-progress",
            "--set", "deterministic=true", "--set", "log_every=1", "--set", "ckpt_every=1", "--set", "keep_last=20"]
    r = subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert list_checkpoints(killed / "checkpoints")[-1].name == "ckpt-000000005.json"
    calls = _count_features(monkeypatch)
    resumed = Trainer(_config(killed), resume=True)
    assert resumed.step == 5 and resumed.stage.name == "lp-aft"
    resumed.fit()
    assert calls == []  # the labels came with the checkpoint
    _assert_same_run(straight, resumed, tmp_path / "a", killed)

    # stopped at the end of pre-training (labels not computed yet): the resumed run computes them from the
    # loaded weights, once, and ends where the uninterrupted run did
    Trainer(_config(tmp_path / "c", max_steps=2)).fit()
    resumed = Trainer(_config(tmp_path / "c"), resume=True)
    assert resumed.stage.name == "lp-aft-probe"
    resumed.fit()
    assert len(calls) == 1
    _assert_same_run(straight, resumed, tmp_path / "a", tmp_path / "c")


if __name__ == "__main__":  # advfast-train with lpdemo registered (the kill test's subprocess)
    from advfast.cli import train_main

    register(LPDemo)
    sys.exit(train_main(sys.argv[1:]))
