"""advfast.bench: FLOP counters against hand counts and the pass model, configs, statistics, report."""

import json

import pytest
import torch
from torch import nn

from advfast.bench import report
from advfast.bench.configs import ABLATION, CONFIGS, EAGER, FAST, OPTIMISATIONS, expand_configs
from advfast.bench.flops import count_flops, expected_passes, forward_flops_per_image
from advfast.bench.harness import Sizes, check_methods, count_iteration_flops, method_names, same_as_fast, spread


def test_forward_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 5))
    model.train()
    conv1 = 2 * (8 * 10 * 12) * (3 * 9)  # outputs x MACs per output
    conv2 = 2 * (16 * 5 * 6) * (4 * 9)  # stride 2: 5 x 6 outputs, 8 / 2 groups input channels
    linear = 2 * 5 * 16
    assert forward_flops_per_image(model, (3, 10, 12)) == conv1 + conv2 + linear
    assert model.training  # mode restored


def test_resnet18_forward_flops_match_torch_and_the_known_count():
    from advfast.models import build_encoder

    enc = build_encoder("resnet18")
    hooks = forward_flops_per_image(enc, (3, 32, 32))
    counted, _ = count_flops(lambda: enc.eval()(torch.zeros(1, 3, 32, 32)))
    assert hooks == counted
    assert 1.10e9 < hooks < 1.12e9  # CIFAR ResNet-18: 0.556 GMACs


def test_count_flops_sees_input_only_and_full_backward():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.rand(2, 4, 6, 6, requires_grad=True)
    fwd = 2 * 2 * 8 * 36 * 4 * 9
    only_input, _ = count_flops(lambda: torch.autograd.grad(conv(x).sum(), (x,)))
    full, _ = count_flops(lambda: conv(x).sum().backward())
    assert only_input == 2 * fwd  # forward F + input gradient F
    assert full == 3 * fwd  # forward F + input F + weight F


# the pass counts as bench/flops.py's table wrote them before each method declared its own (issue 15):
# (count at 0 attack steps, count added per step)
PASSES_BEFORE = {"simclr": (6, 0), "moco": (4, 0), "acl": (12, 4), "amoc": (8, 3), "moco-adv": (4, 2),
                 "advcl": (18, 4), "rocl": (15, 4), "dynacl": (8, 4), "deacl": (7, 2)}


def test_benchmarked_methods_and_their_pass_counts_are_declared_by_the_methods():
    assert method_names() == tuple(PASSES_BEFORE)  # the benchmark's order: clean methods, then adversarial
    for m, (base, per_step) in PASSES_BEFORE.items():
        assert [expected_passes(m, k) for k in range(12)] == [base + per_step * k for k in range(12)], m
    assert expected_passes("acl", 5) == 32 and expected_passes("simclr", 0) == 6
    assert expected_passes("nope", 5) is None


def test_a_method_that_declares_nothing_is_not_benchmarked(monkeypatch):
    from advfast.methods import METHODS, Method

    class Undeclared(Method):
        name = "undeclared"

    monkeypatch.setitem(METHODS, "undeclared", Undeclared)
    assert "undeclared" not in method_names() and expected_passes("undeclared", 5) is None
    with pytest.raises(ValueError, match="unknown method 'undeclared'"):
        check_methods("undeclared")


@pytest.mark.parametrize("method", method_names())
def test_iteration_flops_follow_the_pass_model(method):
    # ResNet-18 on 16x16 images: the heads and the loss are ~1% of the count, so the counted FLOPs of
    # the real iteration must match forward = F, full backward = 2F, input-only backward = F
    sizes = Sizes("check", image_size=16, arch="resnet18", batch_size=4, max_attack_steps=1, max_queue=64)
    got = count_iteration_flops(method, sizes, torch.device("cpu"))
    assert got["expected_passes"] is not None
    assert got["passes_per_image"] == pytest.approx(got["expected_passes"], rel=0.03), got


def test_configs_and_expansion():
    assert EAGER == CONFIGS["eager"] and FAST == CONFIGS["fast"]
    fast = FAST.as_dict()
    assert not any(EAGER.as_dict().values())
    assert fast.pop("cuda_graph_attack") is False and all(fast.values())  # graphs exclude compile: own row
    for name in OPTIMISATIONS:
        row = CONFIGS[f"fast-no-{name}"].as_dict()
        assert row[name] is False and [k for k in row if row[k] != FAST.as_dict()[k]] == [name]
    graphs = CONFIGS["fast-graphs"].as_dict()
    assert [k for k in graphs if graphs[k] != FAST.as_dict()[k]] == ["compile", "cuda_graph_attack"]
    assert same_as_fast("fast-graphs", torch.device("cpu")) and not same_as_fast("fast-graphs", torch.device("cuda"))
    assert expand_configs("eager, fast,ablation,fast") == ["eager", "fast", *ABLATION]
    with pytest.raises(ValueError, match="unknown config 'fsat'.*did you mean 'fast'"):
        expand_configs("eager,fsat")
    with pytest.raises(ValueError, match="empty"):
        expand_configs(" , ")
    assert same_as_fast("fast-no-compile", torch.device("cpu"))
    assert not same_as_fast("fast-no-compile", torch.device("cuda"))
    assert not same_as_fast("fast", torch.device("cpu"))


def test_check_methods():
    assert check_methods("acl,simclr,acl") == ["acl", "simclr"]
    with pytest.raises(ValueError, match="unknown method 'acll'.*did you mean 'acl'"):
        check_methods("acll")


def test_spread():
    s = spread([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert spread([2.0])["q1"] == spread([2.0])["q3"] == 2.0


def _row(method, config, step):
    return {"method": method, "config": config, "arch": "resnet18", "batch_size": 512, "attack": "pgd-5",
            "step_s": {"median": step}, "images_per_s": 512 / step, "images_per_s_q1": 1.0, "images_per_s_q3": 2.0,
            "s_per_epoch": 50_000 * step / 512, "peak_mem_bytes": 3 * 2**30, "mfu": 0.25}


def test_report_speedups_and_table(tmp_path):
    rows = report.add_speedups([_row("acl", "eager", 8.0), _row("acl", "fast", 1.0),
                                _row("acl", "fast-no-bf16", 2.0), _row("simclr", "fast", 1.0)])
    assert [r["speedup_vs_eager"] for r in rows] == [1.0, 8.0, 4.0, None]
    assert rows[2]["fast_over_this"] == 2.0 and rows[1]["fast_over_this"] is None
    doc = {"environment": {"device": "GPU X", "device_type": "cuda", "torch": "2.x", "cuda": "13.0",
                           "date": "2026-01-01T00:00:00+00:00"},
           "matmul_peak": {"dtype": "bfloat16", "flops_per_s": 9e14}, "sizes": {"name": "full"}, "rows": rows}
    table = report.markdown_table(doc)
    assert "| acl | fast | resnet18 | 512 | pgd-5 | 512.0 (1.0-2.0) | 97.7 | 8.00x | - | 3.00 GiB | 25.0% |" in table
    assert "GPU X" in table and "900.00 TFLOP/s" in table
    path = tmp_path / "sub" / "r.json"
    report.write_json(doc, str(path))
    assert json.loads(path.read_text())["rows"][1]["speedup_vs_eager"] == 8.0


def test_bench_config_applies_each_methods_declarations(tmp_path):
    from advfast.bench.configs import EAGER
    from advfast.bench.harness import TINY, bench_config

    cpu = torch.device("cpu")
    assert bench_config("moco", EAGER, TINY, cpu, tmp_path).method_options["queue_size"] == 1024  # queue_options
    amoc = bench_config("amoc", EAGER, TINY, cpu, tmp_path).method_options
    assert (amoc["queue_size_clean"], amoc["queue_size_adv"]) == (1024, 1024)
    advcl = bench_config("advcl", EAGER, TINY, cpu, tmp_path)  # prepare_bench_run: random ClusterFit labels
    assert advcl.method_options["pseudo_labels"] == str(tmp_path / "pseudo_labels.safetensors")
    assert (tmp_path / "pseudo_labels.safetensors").is_file()
    assert "pseudo_labels" not in bench_config("acl", EAGER, TINY, cpu, tmp_path).method_options
