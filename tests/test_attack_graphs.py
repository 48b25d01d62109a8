"""CUDA-graph capture of attacks (advfast.attacks.graphs, the engine's cuda_graph_attack).

On the CPU the capture backend is replaced by ``EagerCapture``, which keeps the same contract (static
input buffers, a static output, "replay" re-runs the closure built from the static buffers), so
everything around the capture is checked here: the cache, the static buffers, and, for every
method, that each per-batch tensor its attack loss reads is routed through the context (a closure
that reached a batch tensor directly would replay the captured batch's value and drift from eager
training). The real torch.cuda.CUDAGraph path is tested by the gpu-marked tests.
"""

import dataclasses

import pytest
import torch
from torch import nn

from advfast.attacks import AttackGraphs, ce_loss, from_config, pgd
from advfast.config import AttackConfig, validate
from advfast.data import Batch
from advfast.engine import build_config
from advfast.engine.trainer import check_attack_graphs, method_class


class _Replayable:
    def __init__(self, fn, out):
        self.fn, self.out = fn, out


class EagerCapture:
    """CPU stand-in for CUDAGraphCapture: 'capture' runs the closure once (that call's result) and keeps
    it; 'replay' runs the same closure again and writes into the static output, as a graph would."""

    def __init__(self):
        self.warmups = 0

    def warmup(self, fn):
        self.warmups += 1
        return fn()

    def capture(self, fn):
        out = fn()
        return _Replayable(fn, out), out, True

    def replay(self, graph):
        graph.out.copy_(graph.fn())


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 4)).eval()


PGD = AttackConfig(kind="pgd", eps=8 / 255, alpha=2 / 255, steps=3, random_start=False)


def _make_loss(model):
    return lambda y: ce_loss(model, y)


def test_replays_match_eager_batch_after_batch():
    model = _model()
    backend = EagerCapture()
    graphs = AttackGraphs(warmup_calls=2, capture=backend)
    attack = from_config(PGD)
    for step in range(6):
        x, y = torch.rand(5, 3, 8, 8), torch.randint(0, 4, (5,))
        got = graphs.run("site", attack, _make_loss(model), x, (y,))
        torch.testing.assert_close(got, pgd(ce_loss(model, y), x, PGD.eps, PGD.alpha, PGD.steps, random_start=False),
                                   rtol=0, atol=0)
        assert not got.requires_grad
    assert (backend.warmups, graphs.captures, graphs.replays, len(graphs)) == (2, 1, 3, 1)


def test_the_result_is_the_callers_copy():
    model = _model()
    graphs = AttackGraphs(warmup_calls=1, capture=EagerCapture())
    attack = from_config(PGD)
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,))
    outs = [graphs.run("s", attack, _make_loss(model), x, (y,)) for _ in range(3)]
    kept = outs[1].clone()
    graphs.run("s", attack, _make_loss(model), torch.rand(4, 3, 8, 8), (y,))  # replay overwrites the static output
    torch.testing.assert_close(outs[1], kept, rtol=0, atol=0)


def test_channels_last_inputs_keep_their_layout():
    model = _model()
    graphs = AttackGraphs(warmup_calls=1, capture=EagerCapture())
    x = torch.rand(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (4,))
    for _ in range(3):
        out = graphs.run("s", from_config(PGD), _make_loss(model), x, (y,))
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_each_signature_and_site_gets_its_own_graph_and_old_ones_are_dropped():
    model = _model()
    graphs = AttackGraphs(warmup_calls=1, max_graphs=2, capture=EagerCapture())
    attack = from_config(PGD)

    def call(site, b):
        return graphs.run(site, attack, _make_loss(model), torch.rand(b, 3, 8, 8), (torch.randint(0, 4, (b,)),))

    for _ in range(2):
        call("a", 4)
        call("a", 6)  # another batch size: another graph
    assert (graphs.captures, len(graphs)) == (2, 2)
    call("b", 4)
    call("b", 4)  # a third graph: the least recently used one ("a", 4) goes
    assert (graphs.captures, len(graphs)) == (3, 2)
    call("a", 6)  # still there: replayed, not captured
    assert graphs.captures == 3
    call("a", 4)  # warms up again
    call("a", 4)
    assert graphs.captures == 4
    graphs.clear()
    assert len(graphs) == 0


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="warmup_calls"):
        AttackGraphs(warmup_calls=0)
    with pytest.raises(ValueError, match="max_graphs"):
        AttackGraphs(max_graphs=0)
    graphs = AttackGraphs(warmup_calls=1, capture=EagerCapture())
    with pytest.raises(TypeError, match=r"context\[0\] must be a tensor"):
        graphs.run("s", from_config(PGD), lambda k: None, torch.rand(2, 3, 8, 8), ({"k": 1},))
    with pytest.raises(ValueError, match="pgd, fgsm or none"):
        from_config(AttackConfig(kind="cw"))
    assert from_config(AttackConfig(kind="none")) is None


def test_a_failed_capture_says_what_to_do():
    class Failing(EagerCapture):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    graphs = AttackGraphs(warmup_calls=1, capture=Failing())
    x, y = torch.rand(2, 3, 8, 8), torch.randint(0, 4, (2,))
    graphs.run("acl.both", from_config(PGD), _make_loss(_model()), x, (y,))
    with pytest.raises(RuntimeError, match="'acl.both' as a CUDA graph failed.*without cuda_graph_attack"):
        graphs.run("acl.both", from_config(PGD), _make_loss(_model()), x, (y,))
    assert len(graphs) == 0


def test_the_engine_refuses_it_without_a_gpu_or_under_torchrun():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        check_attack_graphs(torch.device("cpu"), False)
    with pytest.raises(ValueError, match="single-process"):
        check_attack_graphs(torch.device("cuda", 0), True)
    cfg = build_config("acl", dataset="digits", overrides=[{"device": "cpu", "cuda_graph_attack": True}])
    with pytest.raises(ValueError, match="needs a CUDA device"):
        validate(cfg)
    cfg = build_config("acl", dataset="digits", overrides=[{"compile": True, "cuda_graph_attack": True}])
    with pytest.raises(ValueError, match="not supported together"):
        validate(cfg)


# ---- every method's attack sites route their per-batch tensors through the context ------------------
B, SIZE = 6, 8


def _declared_setups():
    """setup name -> (method, overrides): every registered method's own ``attack_graph_setups``."""
    from advfast.methods import METHODS

    return {setup: (name, over) for name, cls in METHODS.items()
            for setup, over in vars(cls).get("attack_graph_setups", {}).items()}


SETUPS = _declared_setups()


def test_the_methods_declare_the_setups_this_file_covered_before():
    # issue 15 moved this table into the methods; the ten setups it had, nothing lost (later methods add more)
    assert set(SETUPS) >= {"acl", "acl-a2s", "amoc", "amoc-aaa", "moco-adv", "moco-adv-fgsm", "advcl",
                           "advcl-refresh", "advcl-no-ce", "rocl"}
    assert all(SETUPS[s][0] == s for s in ("acl", "amoc", "moco-adv", "advcl", "rocl"))


def _build(setup: str, device: str = "cpu"):
    name, over = SETUPS[setup]
    over = {k: v for k, v in over.items() if k != "views"}
    attack = dict(steps=2, random_start=False, **over.pop("attack", {}))
    if attack.get("kind") == "fgsm":
        attack.pop("steps")
    cfg = build_config(name, over.pop("variant", None), "digits",
                       overrides=[dict(arch="convnet", image_size=SIZE, batch_size=B, device=device, attack=attack,
                                       **over)])
    torch.manual_seed(0)
    return method_class(name)(cfg, 10, (0.5,) * 3, (0.25,) * 3).train().to(device)


def _views(setup: str) -> int:
    return SETUPS[setup][1].get("views", 2)


def _batches(n_views, steps=5, device="cpu"):
    g = torch.Generator().manual_seed(7)
    return [Batch([torch.rand(B, 3, SIZE, SIZE, generator=g).to(device) for _ in range(n_views)],
                  torch.zeros(B, dtype=torch.long, device=device), torch.randperm(1000, generator=g)[:B].to(device))
            for _ in range(steps)]


def _train(method, batches):
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9)
    losses = []
    for batch in batches:
        loss, _ = method.training_step(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step()
        losses.append(loss.detach())
    return torch.stack(losses), {k: v.detach().clone() for k, v in method.state_dict().items()}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_graphed_training_matches_eager_training(setup):
    eager, graphed = _build(setup), _build(setup)
    graphed.attack_graphs = AttackGraphs(warmup_calls=1, capture=EagerCapture())
    batches = _batches(_views(setup))
    loss_e, state_e = _train(eager, batches)
    loss_g, state_g = _train(graphed, batches)
    assert graphed.attack_graphs.replays >= 3  # steps 3, 4, 5 replayed the graph captured at step 2
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-5, atol=1e-6)
    for k in state_e:
        torch.testing.assert_close(state_g[k], state_e[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_a_closure_that_bypasses_the_context_is_caught():
    """The check above has teeth: reading a per-batch tensor directly replays a stale value."""
    model = _model()
    graphs = AttackGraphs(warmup_calls=1, capture=EagerCapture())
    results = []
    for _ in range(3):
        x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 4, (4,))
        got = graphs.run("s", from_config(PGD), lambda y_live=y: ce_loss(model, y_live), x)  # y not in context
        results.append(torch.equal(got, pgd(ce_loss(model, y), x, PGD.eps, PGD.alpha, PGD.steps,
                                            random_start=False)))
    assert results[:2] == [True, True] and results[2] is False


# ---- the real capture (GPU) -------------------------------------------------------------------------
def _bn_model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4)).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("train_mode", [False, True])
def test_cuda_graph_replays_match_eager_and_follow_weight_updates(train_mode):
    dev = torch.device("cuda")
    model, twin = _bn_model(dev), _bn_model(dev)
    model.train(train_mode)
    twin.train(train_mode)
    graphs = AttackGraphs(warmup_calls=2)
    attack = from_config(PGD)
    opt, opt_twin = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, twin))
    for step in range(6):
        x, y = torch.rand(8, 3, 16, 16, device=dev), torch.randint(0, 4, (8,), device=dev)
        got = graphs.run("s", attack, _make_loss(model), x, (y,))
        want = attack(ce_loss(twin, y), x)
        # same kernels on the same inputs; a reduction whose order differs in the graph may flip the sign of a
        # near-zero gradient entry (one step of alpha there), so a handful of pixels may differ, no more
        assert ((got - want).abs() > 1e-6).float().mean() < 1e-3
        for m, o in ((model, opt), (twin, opt_twin)):  # weights change in place between attacks
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    torch.cuda.synchronize()
    assert graphs.captures == 1 and graphs.replays == 4
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):  # BN statistics too
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_graph_random_starts_are_fresh_and_in_the_ball_under_autocast():
    dev = torch.device("cuda")
    model = _bn_model(dev).eval()
    graphs = AttackGraphs(warmup_calls=1)
    attack = from_config(dataclasses.replace(PGD, random_start=True, steps=2))
    x, y = torch.rand(8, 3, 16, 16, device=dev), torch.randint(0, 4, (8,), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = [graphs.run("s", attack, _make_loss(model), x, (y,)) for _ in range(4)]
    assert graphs.replays == 3
    assert not torch.equal(outs[2], outs[3])  # fresh noise on every replay
    for out in outs:
        assert out.dtype == torch.float32
        assert (out - x).abs().max() <= PGD.eps + 1e-6 and out.min() >= 0 and out.max() <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("setup", [s for s, (name, _) in SETUPS.items() if s == name])  # each method's own
def test_cuda_graphed_training_follows_eager_training(setup):
    eager, graphed = _build(setup, "cuda"), _build(setup, "cuda")
    graphed.attack_graphs = AttackGraphs(warmup_calls=1)
    batches = _batches(_views(setup), device="cuda")
    loss_e, _ = _train(eager, batches)
    loss_g, _ = _train(graphed, batches)
    assert graphed.attack_graphs.replays >= 3
    # the same kernels; a few sign flips of near-zero attack gradients may move the losses slightly
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
def test_training_with_cuda_graph_attack(tmp_path):
    from advfast.engine import Trainer

    cfg = build_config("acl", dataset="digits", overrides=[dict(
        arch="convnet", image_size=16, batch_size=64, epochs=1, max_steps=6, device="cuda",
        cuda_graph_attack=True, out=str(tmp_path / "run"), progress=False)])
    trainer = Trainer(cfg)
    trainer.fit()
    assert trainer.method.attack_graphs.replays >= 3
