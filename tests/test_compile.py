"""torch.compile'd encoders: attacks take input-only gradients (no weight gradient in the compiled
backward), and every method trains with one compilation per call variant, none falling back to eager.

On CPU with aot_eager-style backends (AOTAutograd's joint graph and partitioning, no code generation):
the same graphs, guards and recompiles as inductor on a GPU.
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters

from advfast import attacks
from advfast.data import Batch
from advfast.engine import build_config
from advfast.methods import METHODS
from advfast.models import build_encoder, compile_encoder

B, SIZE, WIDTHS = 8, 16, (8, 16, 16, 16)


class RecordingBackend:
    """aot_eager that keeps every backward graph and counts how often compiled forwards run."""

    def __init__(self):
        self.backward_graphs = []
        self.forward_runs = 0

    def _forward(self, gm, example_inputs):
        run = make_boxed_func(gm.forward)

        def counted(args):
            self.forward_runs += 1
            return run(args)

        counted._boxed_call = True
        return counted

    def _backward(self, gm, example_inputs):
        self.backward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    def __call__(self, gm, example_inputs):
        return aot_autograd(fw_compiler=self._forward, bw_compiler=self._backward)(gm, example_inputs)

    def conv_grad_masks(self):
        """output_mask (input, weight, bias) of every convolution_backward in the recorded backward graphs."""
        return [tuple(node.args[-1]) for gm in self.backward_graphs for node in gm.graph.nodes
                if node.target is torch.ops.aten.convolution_backward.default]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _encoder():
    return build_encoder("convnet", ("normal", "pgd"), widths=WIDTHS).train().double()


def _attack(encoder, x, gradients):
    loss_fn = lambda x: encoder(x, "pgd").pow(2).sum()  # noqa: E731
    with attacks.input_only_gradients(encoder, gradients):
        return attacks.pgd(loss_fn, x, 8 / 255, 2 / 255, 2, random_start=False, gradients=gradients)


def test_the_compiled_attack_computes_the_input_gradient_only():
    x = torch.rand(B, 3, SIZE, SIZE, dtype=torch.float64)
    eager = _encoder()
    compiled = _encoder()
    compiled.load_state_dict(eager.state_dict())
    backend = RecordingBackend()
    compile_encoder(compiled, backend=backend)

    x_adv = _attack(compiled, x, "input")
    masks = backend.conv_grad_masks()
    assert len(masks) == len(WIDTHS), "one convolution_backward per conv layer in the attack's backward graph"
    assert all(m == (True, False, False) for m in masks), f"weight gradients computed inside the attack: {masks}"
    assert all(p.requires_grad for p in compiled.parameters()), "parameters are trainable again after the attack"
    torch.testing.assert_close(x_adv, _attack(eager, x, "input"), rtol=0, atol=1e-12)

    # the counter sees weight gradients when they are there: "full" mode (the official loss.backward(),
    # and what every compiled attack did before parameters were frozen for it) differentiates the weights
    backend.backward_graphs.clear()
    _attack(compiled, x, "full")
    assert backend.conv_grad_masks() and all(m[1] for m in backend.conv_grad_masks())


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_inputs_of_any_layout_share_one_compiled_graph(layout):
    encoder = compile_encoder(_encoder().to(memory_format=layout), backend=RecordingBackend())
    x = torch.rand(B, 3, SIZE, SIZE, dtype=torch.float64)
    wide = torch.rand(B, 3, SIZE, 2 * SIZE, dtype=torch.float64)[..., ::2]  # strided, as an FFT's real part
    with torch.no_grad():
        outs = [encoder(v, "pgd") for v in (x, x.contiguous(memory_format=torch.channels_last), wide.contiguous())]
        outs.append(encoder(wide, "pgd"))
    assert counters["frames"]["ok"] == 1, "one compilation for every input layout"
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[2], outs[3])


def test_input_only_gradients_restores_the_parameters_after_an_error():
    encoder = _encoder()
    encoder.conv1.weight.requires_grad_(False)  # a frozen layer stays frozen
    with pytest.raises(RuntimeError, match="boom"), attacks.input_only_gradients(encoder):
        assert not any(p.requires_grad for p in encoder.parameters())
        raise RuntimeError("boom")
    assert [n for n, p in encoder.named_parameters() if not p.requires_grad] == ["conv1.weight"]


# ---- every method under compile: one compilation per variant, no recompile, no eager fallback ----------
# one setup per distinct pattern of encoder calls (moco v1 calls the encoder as v2 does); about 90 s in all
SETUPS = {
    "simclr": ("simclr", None, {}),
    "moco": ("moco", "v2", {"method_options": {"queue_size": 32}}),
    "acl-a2a": ("acl", "a2a", {}),
    "acl-a2s": ("acl", "a2s", {}),
    "acl-ds": ("acl", "ds", {}),
    "amoc-aca": ("amoc", "aca", {"method_options": {"queue_size_clean": 32, "queue_size_adv": 32}}),
    "amoc-aaa": ("amoc", "aaa", {"method_options": {"queue_size_clean": 32, "queue_size_adv": 32}}),
    "moco-adv": ("moco-adv", None, {"method_options": {"queue_size": 32}}),
    "advcl": ("advcl", None, {"method_options": {"pseudo_labels_from": "raw_pixels", "cluster_ks": "2,10",
                                                 "head_hidden": 16}}),
    "rocl": ("rocl", None, {}),
}


def _method(setup):
    name, variant, over = SETUPS[setup]
    cfg = build_config(name, variant, "digits", overrides=[dict(arch="convnet", image_size=SIZE, batch_size=B,
                                                                device="cpu", attack=dict(steps=2), **over)])
    method = METHODS[name](cfg, 10, (0.5,) * 3, (0.25,) * 3).train()
    return method


def _batches(steps):
    g = torch.Generator().manual_seed(3)
    return [Batch([torch.rand(B, 3, SIZE, SIZE, generator=g) for _ in range(3)], torch.zeros(B, dtype=torch.long),
                  torch.randperm(1000, generator=g)[:B]) for _ in range(steps)]


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_every_method_trains_compiled_without_recompiles_or_eager_fallback(setup):
    method = _method(setup)
    backend = RecordingBackend()
    encoder = compile_encoder(method.encoder, backend=backend)
    compiled_call, calls = encoder._compiled_call_impl, 0

    def counting_call(*args, **kwargs):
        nonlocal calls
        calls += 1
        return compiled_call(*args, **kwargs)

    encoder._compiled_call_impl = counting_call
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.05)

    def train(batches):
        for batch in batches:
            loss, _ = method.training_step(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_optimizer_step()

    first, later = _batches(4)[:2], _batches(4)[2:]
    # torch keeps up to 8 compiled entries per code object and runs any further variant eagerly (with a log
    # line). Here a code object may hold 2 (a variant and its dynamic-batch recompile), and more fails the test
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        train(first)
        compiled_once = counters["frames"]["ok"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            train(later)  # the rest of the epoch: same shapes and modes, nothing new to compile
    assert counters["frames"]["ok"] == compiled_once
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert calls > 0 and backend.forward_runs == calls, "every encoder call ran as one compiled graph"
