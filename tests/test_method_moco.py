"""moco (v1, v2): training steps, the key encoder's EMA, the queue, and the loss against a float64
transcription of MoCo's formula (facebookresearch/moco builder.py)."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from advfast.config import TrainConfig, apply_overrides, validate
from advfast.methods import METHODS
import advfast.methods.moco  # noqa: F401  (registers "moco")

B, K = 12, 40  # K not a multiple of B: the queue wraps mid-batch
MEAN, STD = (0.5,), (0.25,)


def make(variant, **options):
    cfg = TrainConfig(method="moco", variant=variant)
    apply_overrides(cfg, METHODS["moco"].preset("digits", variant))
    cfg.method_options.update(queue_size=K, **options)
    return METHODS["moco"](cfg, 10, MEAN, STD)


def batch():
    return types.SimpleNamespace(views=[torch.rand(B, 1, 8, 8), torch.rand(B, 1, 8, 8)],
                                 labels=torch.zeros(B, dtype=torch.long), indices=torch.arange(B))


def step(method, opt, b=None):
    loss, metrics = method.training_step(b or batch())
    opt.zero_grad()
    loss.backward()
    opt.step()
    method.after_optimizer_step()
    return loss, metrics


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_trains_a_few_steps_with_finite_loss(variant):
    method = make(variant)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        loss, metrics = step(method, opt)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(v) for v in metrics.values())
    assert method.encoder is method.encoder_q and method.eval_branch == "normal"
    assert method.head_q.kind == {"v1": "moco_v1", "v2": "moco_v2"}[variant]
    # the key side is never handed to the optimiser
    key_ids = {id(p) for p in method.key.parameters()}
    assert not key_ids & {id(p) for p in method.trainable_parameters()}


def test_key_encoder_starts_as_a_copy_and_follows_the_ema_of_parameters_only():
    method = make("v2", momentum=0.9)
    for (name, pq), pk in zip(list(method.encoder_q.state_dict().items()) + list(method.head_q.state_dict().items()),
                              list(method.key.encoder.state_dict().values()) + list(method.key.head.state_dict().values())):
        torch.testing.assert_close(pk, pq, rtol=0, atol=0, msg=name)
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        key_before = {n: p.detach().double().clone() for n, p in method.key.named_parameters()}
        buffers_before = {n: b.clone() for n, b in method.key.named_buffers()}
        loss, _ = method.training_step(batch())
        buffers_after_forward = {n: b.clone() for n, b in method.key.named_buffers()}
        opt.zero_grad()
        loss.backward()
        opt.step()
        query_now = dict(method.encoder_q.named_parameters(prefix="encoder"))
        query_now.update(method.head_q.named_parameters(prefix="head"))
        method.after_optimizer_step()
        for name, p in method.key.named_parameters():
            expected = 0.9 * key_before[name] + 0.1 * query_now[name].detach().double()
            torch.testing.assert_close(p.double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        # BN running stats: the key encoder's own (moved by its train-mode forward), never averaged
        for name, b in method.key.named_buffers():
            torch.testing.assert_close(b, buffers_after_forward[name], rtol=0, atol=0, msg=name)
        assert any(not torch.equal(buffers_before[n], buffers_after_forward[n]) for n in buffers_before)


def test_queue_receives_the_normalised_keys_after_the_step_and_wraps():
    method = make("v1")
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.05)
    initial = method.queue.queue.clone()
    expected_rows = initial.clone()
    slot = 0
    for _ in range(4):  # 48 keys into 40 slots
        b = batch()
        key = copy.deepcopy(method.key).double()
        expected_keys = F.normalize(key(b.views[1].double()), dim=1).float()
        queue_before = method.queue.queue.clone()
        loss, _ = method.training_step(b)
        torch.testing.assert_close(method.queue.queue, queue_before, rtol=0, atol=0)  # MoCo: after the loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step()
        for row in expected_keys:
            expected_rows[slot] = row
            slot = (slot + 1) % K
        torch.testing.assert_close(method.queue.queue, expected_rows, rtol=1e-5, atol=1e-6)
    assert int(method.queue.ptr) == (4 * B) % K


@pytest.mark.parametrize("variant,temperature", [("v1", 0.07), ("v2", 0.2)])
def test_loss_equals_float64_transcription_of_moco(variant, temperature):
    method = make(variant)
    method.temperature = temperature
    b = batch()
    m64 = copy.deepcopy(method).double()
    loss, _ = method.training_step(b)

    # features of the float64 copy, then MoCo's formula written out
    q = F.normalize(m64.head_q(m64.encoder_q(b.views[0].double())), dim=1)
    k = F.normalize(m64.key.head(m64.key.encoder(b.views[1].double())), dim=1)
    queue = m64.queue.queue  # (K, D) rows; the official stores its transpose
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,kc->nk", q, queue)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    expected = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)


def test_presets_validate_and_follow_the_official_defaults():
    cls = METHODS["moco"]
    assert cls.default_variant == "v2"
    for dataset in ("cifar10", "digits"):
        for variant in cls.variants:
            cfg = TrainConfig(method="moco", variant=variant)
            validate(apply_overrides(cfg, cls.preset(dataset, variant)))
    v1, v2 = cls.preset("cifar10", "v1"), cls.preset("cifar10", "v2")
    assert (v1["temperature"], v2["temperature"]) == (0.07, 0.2)
    assert v1["method_options"] == dict(queue_size=65536, momentum=0.999)
    assert v1["optim"]["lr"] == 0.03 and v1["optim"]["weight_decay"] == 1e-4 and v1["batch_size"] == 256
    assert cls.augment_for("v2") == "mocov2" and len(cls.augment_for("v1")) == 2
    with pytest.raises(ValueError, match="variant"):
        cls.preset("cifar10", "v3")
    with pytest.raises(ValueError, match="queue_sise"):
        make("v2", queue_sise=4)


def test_momentum_encoder_rejects_bad_momentum_and_foreign_modules():
    from advfast.methods.momentum import MomentumEncoder
    from advfast.models import build_encoder, build_head

    enc = build_encoder("convnet", widths=(4, 8), strides=(1, 2), mean=MEAN, std=STD)
    head = build_head("moco_v1", enc.feat_dim)
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(enc, head, 1.5)
    key = MomentumEncoder(enc, head, 0.5)
    with pytest.raises(ValueError, match="same query encoder"):
        key.update_(enc, build_head("moco_v2", enc.feat_dim))
