"""amoc (acc, aca, aac, aaa): steps, the two queues, the attack, and the loss against a float64
transcription of the official Coach (MTandHJ/amoc src/base.py, models/builder.py)."""

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

from advfast.config import TrainConfig, apply_overrides, validate
from advfast.methods import METHODS
import advfast.methods.amoc  # noqa: F401  (registers "amoc")

B, K1, K2 = 10, 36, 24  # neither queue a multiple of B
MEAN, STD = (0.5,), (0.25,)
EPS = 8 / 255


def make(variant="aca", steps=2, **options):
    cfg = TrainConfig(method="amoc", variant=variant)
    apply_overrides(cfg, METHODS["amoc"].preset("digits", variant))
    cfg.attack.steps = steps
    cfg.method_options.update(queue_size_clean=K1, queue_size_adv=K2, **options)
    return METHODS["amoc"](cfg, 10, MEAN, STD)


def batch():
    return types.SimpleNamespace(views=[torch.rand(B, 1, 8, 8), torch.rand(B, 1, 8, 8)],
                                 labels=torch.zeros(B, dtype=torch.long), indices=torch.arange(B))


def fixed_attack(method):
    """Replace the attack by fixed perturbations in the eps-ball, so a step is deterministic."""
    d_q, d_k = (torch.rand(B, 1, 8, 8) * 2 - 1) * EPS, (torch.rand(B, 1, 8, 8) * 2 - 1) * EPS
    method.attack = lambda x_q, x_k: ((x_q + d_q).clamp(0, 1), (x_k + d_k).clamp(0, 1))
    return d_q, d_k


def ring_write(queue, ptr, keys):
    queue = queue.clone()
    for row in keys:
        queue[ptr] = row
        ptr = (ptr + 1) % queue.shape[0]
    return queue


def key64(m64, x, branch):
    return F.normalize(m64.key.head(m64.key.encoder(x.double(), branch), branch), dim=1)


def query64(m64, x, branch):
    return F.normalize(m64.head_q(m64.encoder_q(x.double(), branch), branch), dim=1)


@pytest.mark.parametrize("variant", ["acc", "aca", "aac", "aaa"])
def test_every_variant_trains_a_few_steps_with_finite_loss(variant, train_a_few_steps):
    method = make(variant)
    train_a_few_steps(method, batch)
    assert method.eval_branch == "adv" and method.encoder.branches == ("clean", "adv")


def official_loss(m64, x_q, x_k, x_q_adv, x_k_adv, variant, T, leverage, aca_plus=True):
    """The official Coach, written out in float64 with its sqrt(T) scaling and enqueue-before-read."""
    t = math.sqrt(T)
    qc, qa = m64.queue_clean.queue.clone(), m64.queue_adv.queue.clone()
    pc, pa = int(m64.queue_clean.ptr), int(m64.queue_adv.ptr)
    labels = torch.zeros(B, dtype=torch.long)

    q = query64(m64, x_q, "clean") / t
    k = key64(m64, x_k, "clean")
    qc = ring_write(qc, pc, k)
    k = k / t
    loss_c = F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ (qc / t).T], 1), labels)

    q_a = query64(m64, x_q_adv, "adv") / t
    if variant in ("aac", "aaa"):
        k_a = key64(m64, x_k_adv, "adv")
        qa = ring_write(qa, pa, k_a)
        k_a = k_a / t
    else:
        k_a = k
        if variant == "aca" and aca_plus:
            qa = ring_write(qa, pa, key64(m64, x_q_adv, "adv"))
    bank = qa if variant in ("aca", "aaa") else qc
    loss_a = F.cross_entropy(torch.cat([(q_a * k_a).sum(1, keepdim=True), q_a @ (bank / t).T], 1), labels)
    return leverage * loss_c + (1 - leverage) * loss_a, qc, qa


@pytest.mark.parametrize("variant,official_aca_queue", [("acc", False), ("aca", False), ("aca", True),
                                                        ("aac", False), ("aaa", False)])
def test_loss_and_both_queues_match_the_official_coach(variant, official_aca_queue):
    method = make(variant, official_aca_queue=official_aca_queue, leverage=0.3)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.05)
    for _ in range(3):  # 30 keys into 36 and 24 slots: the second queue wraps
        b = batch()
        d_q, d_k = fixed_attack(method)
        x_q, x_k = b.views
        x_q_adv, x_k_adv = (x_q + d_q).clamp(0, 1), (x_k + d_k).clamp(0, 1)
        m64 = copy.deepcopy(method).double()
        expected, qc, qa = official_loss(m64, x_q, x_k, x_q_adv, x_k_adv, variant, method.temperature, 0.3,
                                         aca_plus=not official_aca_queue)
        queue_adv_before = method.queue_adv.queue.clone()
        loss, _ = method.training_step(b)
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
        # queue_clean: the clean keys; queue_adv: the adversarial keys where the variant writes them
        torch.testing.assert_close(method.queue_clean.queue.double(), qc, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.queue_adv.queue.double(), qa, rtol=1e-5, atol=1e-6)
        if variant == "acc" or official_aca_queue:
            torch.testing.assert_close(method.queue_adv.queue, queue_adv_before, rtol=0, atol=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step()
    assert int(method.queue_clean.ptr) == 30 % K1
    assert int(method.queue_adv.ptr) == (0 if variant == "acc" or official_aca_queue else 30 % K2)


def test_moco_order_enqueues_after_the_step():
    method = make("aca", enqueue_before_loss=False)
    fixed_attack(method)
    before_c, before_a = method.queue_clean.queue.clone(), method.queue_adv.queue.clone()
    loss, _ = method.training_step(batch())
    assert torch.equal(method.queue_clean.queue, before_c) and torch.equal(method.queue_adv.queue, before_a)
    loss.backward()
    method.after_optimizer_step()
    assert int(method.queue_clean.ptr) == B and int(method.queue_adv.ptr) == B


@pytest.mark.parametrize("variant", ["aca", "aaa"])
def test_attack_raises_its_loss_stays_in_the_ball_and_leaves_bn_stats_alone(variant):
    method = make(variant, steps=3)
    method.train()
    x_q, x_k = batch().views
    stats = {n: b.clone() for n, b in method.named_buffers() if "running" in n}
    x_q_adv, x_k_adv = method.attack(x_q, x_k)
    assert method.training
    for n, b in method.named_buffers():
        if n in stats:
            assert torch.equal(b, stats[n]), f"the attack (eval mode) moved {n}"
    for adv, nat in ((x_q_adv, x_q), (x_k_adv, x_k)):
        assert (adv - nat).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    method.eval()
    with torch.no_grad():
        before = method.attack_objective(torch.cat([x_q, x_k]))
        after = method.attack_objective(torch.cat([x_q_adv, x_k_adv]))
    assert after > before
    # acc/aca: the key half takes no gradient (official no_grad forward_k); aac/aaa: both halves do
    x = torch.cat([x_q, x_k]).requires_grad_(True)
    (grad,) = torch.autograd.grad(method.attack_objective(x), x)
    assert grad[:B].abs().sum() > 0
    assert (grad[B:].abs().sum() > 0) == (variant == "aaa")


def test_options_and_presets():
    cls = METHODS["amoc"]
    assert cls.default_variant == "aca" and cls.augment_preset == "mocov2"
    for dataset in ("cifar10", "digits"):
        for variant in cls.variants:
            validate(apply_overrides(TrainConfig(method="amoc", variant=variant), cls.preset(dataset, variant)))
    p = cls.preset("cifar10")
    assert p["method_options"] == dict(queue_size_clean=32768, queue_size_adv=32768, momentum=0.999)
    assert p["temperature"] == 0.2 and p["batch_size"] == 256 and p["epochs"] == 200
    assert p["attack"]["steps"] == 5 and p["attack"]["alpha"] == 2 / 255
    assert (p["optim"]["lr"], p["optim"]["weight_decay"], p["optim"]["warmup_epochs"]) == (0.1, 5e-4, 10.0)
    with pytest.raises(ValueError, match="official_aca_queue"):
        make("acc", official_aca_queue=True)
    with pytest.raises(ValueError, match="leverage"):
        make("aca", leverage=1.5)
    state = make("aca").state_dict()
    assert {"queue_clean.queue", "queue_clean.ptr", "queue_adv.queue", "queue_adv.ptr"} <= set(state)
