"""Evaluation: protocols, attacks at test time, frozen encoders, reports and plots."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advfast.attacks.trades import trades_examples
from advfast.eval.finetune import Classifier, finetune
from advfast.eval.protocols import protocol_preset
from advfast.eval.report import plot_eps_curve, plot_training_curves, plot_tsne, write_report
from advfast.eval.robustness import (AttackSpec, clean_accuracy, corruption_accuracy, l1_attack, parse_attacks,
                                     project_l1, robust_accuracy, smoothed_logits)
from advfast.models import build_encoder


class _Batch:
    def __init__(self, x, y):
        self.views, self.labels = [x], y


class _ListLoader:
    def __init__(self, x, y, bs):
        self.batches = [_Batch(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]

    def __iter__(self):
        return iter(self.batches)


def _blobs(n=192, size=8, classes=4, seed=0):
    """Images whose class is a brightness pattern: learnable in a few steps, attackable at small eps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    base = torch.rand(classes, 3, size, size, generator=g)
    x = (base[y] * 0.6 + 0.2 + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return x, y


def _trained_classifier(frozen=False, epochs=15):
    x, y = _blobs()
    enc = build_encoder("convnet", bn_branches=("normal",))
    model = Classifier(enc, 4, frozen=frozen, zero_init_head=False)
    cfg = protocol_preset("slf", "digits", epochs=epochs, lr=0.05, batch_size=64, milestones=())
    finetune(model, _ListLoader(x, y, 64), cfg)
    return model, x, y


def _as_uint8(x):
    return (x * 255).round().to(torch.uint8)


def test_project_l1_matches_a_float64_reference():
    torch.manual_seed(0)
    for shape, eps in [((5, 3, 4, 4), 1.0), ((3, 7), 0.3), ((2, 1, 5, 5), 50.0)]:
        v = torch.randn(shape, dtype=torch.float64)
        got = project_l1(v, eps)
        for i in range(shape[0]):
            flat = v[i].flatten().numpy()
            if np.abs(flat).sum() <= eps:
                ref = flat
            else:  # bisection on the soft threshold: independent of the sort-based formula
                lo, hi = 0.0, np.abs(flat).max()
                for _ in range(200):
                    mid = (lo + hi) / 2
                    if np.clip(np.abs(flat) - mid, 0, None).sum() > eps:
                        lo = mid
                    else:
                        hi = mid
                ref = np.sign(flat) * np.clip(np.abs(flat) - hi, 0, None)
            np.testing.assert_allclose(got[i].flatten().numpy(), ref, atol=1e-9)
            assert got[i].abs().sum() <= eps + 1e-9


def test_pgd20_breaks_an_undefended_model_and_never_beats_clean():
    model, x, y = _trained_classifier()
    images = _as_uint8(x)
    clean = clean_accuracy(model, images, y)
    assert clean > 0.9
    robust = robust_accuracy(model, images, y, AttackSpec("pgd20", "linf", 0.25, 0.25 / 4, 20))
    assert robust <= clean
    assert robust < 0.1
    weak = robust_accuracy(model, images, y, AttackSpec("pgd20", "linf", 1 / 255, 0.25 / 255, 20))
    assert robust <= weak <= clean


@pytest.mark.parametrize("norm,eps", [("l2", 1.0), ("l1", 6.0)])
def test_unseen_attacks_stay_in_their_ball_and_hurt(norm, eps):
    model, x, y = _trained_classifier()
    x, y = x[:64], y[:64]
    if norm == "l1":
        x_adv = l1_attack(model, x, y, eps, 2.5 * eps / 20, 20)
        dist = (x_adv - x).flatten(1).abs().sum(1)
    else:
        from advfast.eval.finetune import ce_attack
        x_adv = ce_attack(model, x, y, eps, 2.5 * eps / 20, 20, norm="l2")
        dist = (x_adv - x).flatten(1).norm(dim=1)
    assert (dist <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        loss_clean = F.cross_entropy(model(x), y)
        loss_adv = F.cross_entropy(model(x_adv), y)
    assert loss_adv > loss_clean


def test_frozen_encoder_stays_frozen_through_slf_and_alf():
    x, y = _blobs(n=64)
    for protocol in ("slf", "alf"):
        enc = build_encoder("convnet", bn_branches=("normal",))
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        model = Classifier(enc, 4, frozen=True)
        cfg = protocol_preset(protocol, "digits", epochs=2, batch_size=32, train_steps=2)
        finetune(model, _ListLoader(x, y, 32), cfg)
        for key, value in enc.state_dict().items():  # weights and BN running statistics
            assert torch.equal(value, before[key]), f"{protocol} changed the frozen encoder's {key}"
        assert any(p.abs().sum() > 0 for p in model.head.parameters()), "the head did not train"


def test_aff_trains_the_whole_network_with_trades():
    x, y = _blobs(n=64)
    enc = build_encoder("convnet", bn_branches=("normal",))
    before = [p.clone() for p in enc.parameters()]
    model = Classifier(enc, 4, frozen=False)
    assert all(p.abs().sum() == 0 for p in model.head.parameters())  # zero-initialised head
    cfg = protocol_preset("aff", "digits", epochs=1, batch_size=32, train_steps=2)
    log = finetune(model, _ListLoader(x, y, 32), cfg)
    assert np.isfinite(log.epochs[0]["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, enc.parameters()))
    x_adv = trades_examples(model, x[:8], 8 / 255, 2 / 255, 3)
    assert (x_adv - x[:8]).abs().max() <= 8 / 255 + 1e-6


def test_autoattack_adapter_runs_on_a_tiny_model():
    pytest.importorskip("torchattacks", reason="torchattacks (the eval extra) is not installed")
    model, x, y = _trained_classifier(epochs=8)
    images = _as_uint8(x[:16])
    aa = robust_accuracy(model, images, y[:16], parse_attacks("autoattack", eps=0.25)[0], num_classes=4)
    assert 0.0 <= aa <= clean_accuracy(model, images, y[:16])


def test_parse_attacks_rejects_unknown_names():
    with pytest.raises(ValueError, match="did you mean 'pgd20'"):
        parse_attacks("pgd2O")


def test_corruption_accuracy_reads_a_cifar10c_layout(tmp_path):
    model, x, y = _trained_classifier(epochs=8)
    n = 10
    labels = np.concatenate([y[:n].numpy()] * 5).astype(np.int64)
    images = np.concatenate([_as_uint8(x[:n]).permute(0, 2, 3, 1).numpy()] * 5)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "noise.npy", 255 - images)
    res = corruption_accuracy(model, str(tmp_path))
    assert set(res) >= {"fog", "noise", "mean", "fog/1", "noise/5"}
    assert res["fog"] == pytest.approx(clean_accuracy(model, _as_uint8(x[:n]), y[:n]))
    assert res["mean"] == pytest.approx((res["fog"] + res["noise"]) / 2)
    os.remove(tmp_path / "labels.npy")
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        corruption_accuracy(model, str(tmp_path))


def test_smoothed_logits_average_features_over_transformations():
    model, x, y = _trained_classifier(epochs=4)

    def identity_augment(images, generator):
        return [images.float() / 255]

    with torch.no_grad():
        got = smoothed_logits(model, x[:8], identity_augment, samples=3)
        ref = model(_as_uint8(x[:8]).float() / 255)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_reports_and_plots_are_written_and_readable(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    result = {"checkpoint": "run", "protocol": "slf", "dataset": "digits", "bn_branch": "pgd", "n_eval": 10,
              "clean_accuracy": 0.9, "robust_accuracy": {"pgd20": 0.4, "autoattack": 0.35},
              "corruptions": {"fog": 0.5, "fog/1": 0.6, "mean": 0.5}}
    paths = write_report(str(tmp_path), result)
    loaded = json.loads(open(paths["json"]).read())
    assert loaded == result
    table = open(paths["markdown"]).read()
    assert "| RA (pgd20) | 40.00 |" in table and "| AA (autoattack) | 35.00 |" in table

    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(c, 0.1, size=(20, 8)) for c in range(3)])
    labels = np.repeat(np.arange(3), 20)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1), "lr": 0.1}) + "\n" for s in range(5))
                       + '{"step": 5, "loss"')  # a line cut short by a crash is skipped
    pngs = [plot_tsne(feats, labels, str(tmp_path / "tsne.png"), "t"),
            plot_eps_curve({0.0: 0.9, 4 / 255: 0.5, 8 / 255: 0.2}, str(tmp_path / "eps.png"), "e"),
            plot_training_curves(str(metrics), str(tmp_path / "curves.png"), "c")]
    for png in pngs:
        with Image.open(png) as im:
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100
