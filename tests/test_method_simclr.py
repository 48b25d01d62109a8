"""SimCLR baseline: trains on digits, ACL's head and LARS preset, loss equal to the official NT-Xent."""

import math

import pytest
import torch

from advfast.data import Batch
from advfast.engine import Trainer, build_config
from advfast.methods import METHODS
from advfast.optim import LARS

TINY = dict(image_size=8, batch_size=32, epochs=1, max_steps=2, progress=False, log_every=1,
            method_options=dict(head_hidden=32))


def official_nt_xent(x: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """ACL's utils.nt_xent (float64): views of image i in rows 2i, 2i+1; self term removed as e^(1/t)."""
    x = x.double()
    norm = torch.norm(x, dim=1).reshape(-1, 1)
    sim = torch.exp(torch.mm(x, x.t()) / torch.clamp(torch.mm(norm, norm.t()), min=1e-8) / t)
    partner = torch.arange(sim.shape[0])
    partner[0::2] += 1
    partner[1::2] -= 1
    return -torch.log(sim[partner].diag() / (sim.sum(dim=0) - math.exp(1 / t))).mean()


def test_trains_a_few_steps_on_digits(tmp_path):
    cfg = build_config("simclr", None, "digits", [dict(TINY, out=str(tmp_path / "run"))])
    trainer = Trainer(cfg)
    assert isinstance(trainer.optimizer, LARS)
    before = {k: v.clone() for k, v in trainer.method.encoder.state_dict().items()}
    summary = trainer.fit()
    assert math.isfinite(summary["last"]["loss"])
    after = trainer.method.encoder.state_dict()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2


def test_preset_is_acl_code_without_attack():
    cfg = build_config("simclr", None, "cifar10")
    assert cfg.attack.kind == "none"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.batch_size, cfg.epochs, cfg.temperature) == \
        ("lars", 5.0, 1e-6, 512, 1000, 0.5)
    digits = build_config("simclr", None, "digits")
    assert digits.arch == "convnet" and digits.optim.name == "lars"


def test_head_is_acls_proj_head_with_one_bn():
    cfg = build_config("simclr", None, "digits", [TINY])
    method = METHODS["simclr"](cfg, 10, (0.5,) * 3, (0.25,) * 3)
    assert method.head.kind == "acl" and method.encoder.branches == ("normal",)
    assert method.eval_branch == "normal"
    assert [n for n, _ in method.head.named_children() if n.startswith("fc")] == ["fc1", "fc2", "fc3"]
    two = METHODS["simclr"](build_config("simclr", None, "digits",
                                         [dict(TINY, method_options=dict(head_hidden=32, two_layer_proj=True))]),
                            10, (0.5,) * 3, (0.25,) * 3)
    assert [n for n, _ in two.head.named_children() if n.startswith("fc")] == ["fc1", "fc2"]


@pytest.mark.parametrize("b,d", [(4, 3), (17, 8)])
def test_loss_on_fixed_features_equals_the_official_formula(monkeypatch, b, d):
    cfg = build_config("simclr", None, "digits", [TINY])
    method = METHODS["simclr"](cfg, 10, (0.5,) * 3, (0.25,) * 3)
    proj = torch.randn(3 * 8 * 8, d)
    monkeypatch.setattr(method, "embed", lambda x, branch="normal": x.flatten(1) @ proj)
    x1, x2 = torch.rand(2, b, 3, 8, 8)
    loss, metrics = method.training_step(Batch([x1, x2], torch.zeros(b, dtype=torch.long), torch.arange(b)))
    f1, f2 = (x.double().flatten(1) @ proj.double() for x in (x1, x2))
    expected = official_nt_xent(torch.stack([f1, f2], 1).reshape(2 * b, d))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss_nt_xent"].item() == pytest.approx(expected.item(), rel=1e-5)
