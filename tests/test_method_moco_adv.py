"""moco-adv (MoCo-PGD / MoCo-FGSM): steps, the attack on the query view, and the loss against a
float64 transcription of the paper's recipe (MoCo InfoNCE of the adversarial query)."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from advfast.config import TrainConfig, apply_overrides, validate
from advfast.methods import METHODS
import advfast.methods.moco_adv  # noqa: F401  (registers "moco-adv")

B, K = 10, 32
MEAN, STD = (0.5,), (0.25,)
EPS = 8 / 255


def make(variant="v1", attack=None, **options):
    cfg = TrainConfig(method="moco-adv", variant=variant)
    apply_overrides(cfg, METHODS["moco-adv"].preset("digits", variant))
    apply_overrides(cfg.attack, {"steps": 2, **(attack or {})})
    cfg.method_options.update(queue_size=K, **options)
    return METHODS["moco-adv"](cfg, 10, MEAN, STD)


def batch():
    return types.SimpleNamespace(views=[torch.rand(B, 1, 8, 8), torch.rand(B, 1, 8, 8)],
                                 labels=torch.zeros(B, dtype=torch.long), indices=torch.arange(B))


@pytest.mark.parametrize("variant,kind", [("v1", "pgd"), ("v2", "pgd"), ("v1", "fgsm"), ("v2", "fgsm")])
def test_trains_a_few_steps_with_finite_loss(variant, kind, train_a_few_steps):
    method = make(variant, attack=dict(kind=kind, random_start=kind == "pgd"), clean_weight=0.5 if kind == "pgd" else 0.0)
    train_a_few_steps(method, batch)
    assert int(method.queue.ptr) == 2 * B
    assert method.eval_branch == "normal"


@pytest.mark.parametrize("kind", ["pgd", "fgsm"])
def test_attack_raises_the_moco_loss_and_stays_in_the_ball(kind):
    method = make(attack=dict(kind=kind, steps=3, random_start=kind == "pgd"))
    method.train()
    x_q, x_k = batch().views
    k = F.normalize(method.key(x_k), dim=1).detach()
    stats = {n: b.clone() for n, b in method.named_buffers() if "running" in n}
    x_adv = method.attack(x_q, k)
    assert method.training
    assert all(torch.equal(b, stats[n]) for n, b in method.named_buffers() if n in stats)  # eval-mode attack
    assert (x_adv - x_q).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    if kind == "fgsm":  # one full step: every unclipped pixel moves by exactly eps
        moved = (x_adv - x_q).abs()
        inside = (x_q > EPS) & (x_q < 1 - EPS)
        assert torch.allclose(moved[inside], torch.full_like(moved[inside], EPS), atol=1e-6)
    method.eval()
    with torch.no_grad():
        assert method.attack_objective(x_adv, k) > method.attack_objective(x_q, k)


def test_attack_train_mode_option_moves_the_bn_statistics():
    method = make(attack_train_mode=True)
    method.train()
    x_q, x_k = batch().views
    k = F.normalize(method.key(x_k), dim=1).detach()
    before = method.encoder_q.bn1.running_mean.clone()
    method.attack(x_q, k)
    assert not torch.equal(method.encoder_q.bn1.running_mean, before)


@pytest.mark.parametrize("variant,clean_weight", [("v1", 0.0), ("v2", 0.0), ("v1", 0.25)])
def test_loss_equals_float64_transcription(variant, clean_weight):
    method = make(variant, clean_weight=clean_weight)
    b = batch()
    x_q, x_k = b.views
    delta = (torch.rand_like(x_q) * 2 - 1) * EPS
    x_adv = (x_q + delta).clamp(0, 1)
    method.attack = lambda x, k: x_adv  # fixed adversarial query: the loss is deterministic
    m64 = copy.deepcopy(method).double()
    loss, _ = method.training_step(b)

    T = method.temperature
    k = F.normalize(m64.key.head(m64.key.encoder(x_k.double())), dim=1)
    queue = m64.queue.queue

    def moco(q):  # -log( e^{q.k/T} / (e^{q.k/T} + sum_queue e^{q.n/T}) ), mean over the batch
        pos = torch.exp((q * k).sum(1) / T)
        neg = torch.exp(q @ queue.T / T).sum(1)
        return -torch.log(pos / (pos + neg)).mean()

    q_adv = F.normalize(m64.head_q(m64.encoder_q(x_adv.double())), dim=1)
    q_clean = F.normalize(m64.head_q(m64.encoder_q(x_q.double())), dim=1)
    expected = (1 - clean_weight) * moco(q_adv) + clean_weight * moco(q_clean)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_presets_follow_the_paper():
    cls = METHODS["moco-adv"]
    assert cls.default_variant == "v1"
    for dataset in ("cifar10", "digits"):
        for variant in cls.variants:
            validate(apply_overrides(TrainConfig(method="moco-adv", variant=variant), cls.preset(dataset, variant)))
    p = cls.preset("cifar10")
    assert p["arch"] == "resnet50" and p["batch_size"] == 128 and p["epochs"] == 200
    assert (p["optim"]["lr"], p["optim"]["weight_decay"], p["optim"]["momentum"]) == (0.06, 5e-4, 0.9)
    assert p["attack"]["steps"] == 10 and p["attack"]["eps"] == 8 / 255
    with pytest.raises(ValueError, match="attack"):
        make(attack=dict(kind="none"))
    with pytest.raises(ValueError, match="clean_weight"):
        make(clean_weight=2.0)
