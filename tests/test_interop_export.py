"""advfast-export --to robustssl: an advfast encoder written in the layout the RobustSSL benchmark's
vanilla_finetuning.py loads, read back with a transcription of the benchmark's loading code
(Finetuning_Methods/Vanilla_Finetuning/utils.py get_model + cvt_state_dict) and with
load_published(fmt='robustssl'): same features. Encoders the layout cannot hold are refused in one line."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from advfast.models.export import export_encoder
from advfast.interop import InteropError, check_exportable, load_published, robustssl_state_dict, save_robustssl
from advfast.interop.cli import export_main
from advfast.models import build_encoder, to_single_branch

_spec = importlib.util.spec_from_file_location("interop_official_models",
                                               Path(__file__).with_name("interop_official_models.py"))
om = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(om)

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def cvt_state_dict(state_dict, bnNameCnt, num_classes):
    """The benchmark's utils.cvt_state_dict (SLF/ALF: keep BN branch bnNameCnt, single-BN key names)."""
    state_dict_new = copy.deepcopy(state_dict)
    if bnNameCnt >= 0:
        for name, item in state_dict.items():
            if 'bn' in name:
                assert 'bn_list' in name
                state_dict_new[name.replace('.bn_list.{}'.format(bnNameCnt), '')] = item
    name_to_del = []
    for name, item in state_dict_new.items():
        if 'bn' in name and 'adv' in name:
            name_to_del.append(name)
        if 'bn_list' in name:
            name_to_del.append(name)
        if 'fc' in name:
            name_to_del.append(name)
    for name in np.unique(name_to_del):
        del state_dict_new[name]
    keys = list(state_dict_new.keys())[:]
    name_to_del = []
    for name in keys:
        if 'downsample.conv' in name:
            state_dict_new[name.replace('downsample.conv', 'downsample.0')] = state_dict_new[name]
            name_to_del.append(name)
        if 'downsample.bn' in name:
            state_dict_new[name.replace('downsample.bn', 'downsample.1')] = state_dict_new[name]
            name_to_del.append(name)
    for name in np.unique(name_to_del):
        del state_dict_new[name]
    state_dict_new['fc.weight'] = torch.zeros(num_classes, 512)
    state_dict_new['fc.bias'] = torch.zeros(num_classes)
    return state_dict_new


def benchmark_models(path, num_classes=10):
    """get_model(args, mode) for --pretraining DynACL --model r18: (SLF/ALF model, AFF dual-BN model),
    both with do_normalize=1 (ImageNet mean/std unless the checkpoint's normalize buffers replace them)."""
    checkpoint = torch.load(path, map_location="cpu")  # the benchmark's own call (torch 1.13: full unpickling)
    state_dict = checkpoint['state_dict_dual'] if 'state_dict_dual' in checkpoint else checkpoint['state_dict']
    with om.no_default_init():  # every weight is loaded below (checked), so skip the initialisation cost
        slf = om.TorchvisionResNet18(mean=om.IMAGENET_MEAN, std=om.IMAGENET_STD, num_classes=num_classes)
        aff = om.MultiBNResNet18(bn_names=["normal", "pgd"], heads="fc", num_classes=num_classes)
    result = slf.load_state_dict(cvt_state_dict(state_dict, 1, num_classes), strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result  # the benchmark logs these as warnings
    aff_state = dict(state_dict, **{"fc.weight": torch.zeros(num_classes, 512), "fc.bias": torch.zeros(num_classes)})
    result = aff.load_state_dict(aff_state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    return slf.eval().double(), aff.eval().double()


def _dual_encoder(mean=CIFAR_MEAN, std=CIFAR_STD, seed=0):
    with om.no_default_init():
        encoder = build_encoder("resnet18", bn_branches=("normal", "pgd"), mean=mean, std=std)
    return om.randomize(encoder, seed)


def test_export_round_trips_through_the_benchmark_loader(tmp_path):
    encoder = _dual_encoder()
    pgd, normal = to_single_branch(encoder, "pgd"), to_single_branch(encoder, "normal")
    path = save_robustssl(robustssl_state_dict(pgd, normal), tmp_path / "model.pt", {"arch": "resnet18"})
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    encoder = encoder.double()
    with torch.no_grad():
        want_pgd, want_normal = encoder(x, "pgd"), encoder(x, "normal")
        slf, aff = benchmark_models(path)
        torch.testing.assert_close(slf(x), want_pgd, rtol=1e-9, atol=1e-9)  # SLF / ALF: bn_list.1
        torch.testing.assert_close(aff(x, "pgd"), want_pgd, rtol=1e-9, atol=1e-9)  # AFF, adversarial half
        torch.testing.assert_close(aff(x, "normal"), want_normal, rtol=1e-9, atol=1e-9)  # AFF, natural half
        back, meta = load_published(path, "robustssl")
        assert meta["bn_branch"] == "pgd" and meta["branches"] == ["normal", "pgd"]
        torch.testing.assert_close(back.double()(x), want_pgd, rtol=1e-9, atol=1e-9)
        back_normal = load_published(path, "robustssl", bn_branch="normal")[0]
        torch.testing.assert_close(back_normal.double()(x), want_normal, rtol=1e-9, atol=1e-9)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no leftovers


def _run_dir(tmp_path, encoder, eval_branch, arch="resnet18", dataset="cifar10"):
    method = SimpleNamespace(encoder=encoder, eval_branch=eval_branch, variant="ds", num_classes=10)
    cfg = SimpleNamespace(arch=arch, method="acl", dataset=dataset)
    run = tmp_path / "run"
    run.mkdir()
    export_encoder(method, cfg, run, step=100, image_size=32)  # advfast-train's own writer
    return run


def test_cli_exports_a_run_directory(tmp_path, capsys):
    encoder = _dual_encoder(mean=None, std=None, seed=1)  # no input normalisation: written as mean 0, std 1
    run = _run_dir(tmp_path, encoder, "pgd")
    out = tmp_path / "sub" / "acl_robustssl.pt"
    assert export_main(["--to", "robustssl", str(run), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert str(out) in line and "--pretraining DynACL --model r18" in line
    payload = torch.load(out, weights_only=True)
    assert payload["advfast"]["pgd_branch"] == "pgd" and payload["advfast"]["normal_branch"] == "normal"
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    encoder = encoder.double()
    with torch.no_grad():
        run_pgd, run_normal = encoder(x, "pgd"), encoder(x, "normal")
        slf, aff = benchmark_models(out)
        torch.testing.assert_close(slf(x), run_pgd, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(aff(x, "normal"), run_normal, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(load_published(out, "robustssl")[0].double()(x), run_pgd, rtol=1e-9, atol=1e-9)


def test_what_the_layout_cannot_hold_is_refused_in_one_line(tmp_path, capsys):
    run = _run_dir(tmp_path, build_encoder("convnet", bn_branches=("normal", "pgd")), "pgd", arch="convnet")
    assert export_main(["--to", "robustssl", str(run), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a convnet encoder cannot be written" in err
    assert not (tmp_path / "x.pt").exists()
    gray = build_encoder("resnet18", in_channels=1)
    with pytest.raises(InteropError, match="takes 3-channel images; this encoder takes 1"):
        check_exportable(gray)
    with pytest.raises(InteropError, match="resnet18_solo encoder cannot be written"):
        check_exportable(build_encoder("resnet18_solo"))  # DeACL / solo-learn stem (padding 2)
    assert export_main(["--to", "robustssl", str(tmp_path / "nope"), "--out", str(tmp_path / "y.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert export_main(["--to", "onnx", str(run), "--out", str(tmp_path / "y.pt")]) == 2
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def test_advfast_export_is_an_installed_command():
    import importlib.metadata

    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("advfast-export") == "advfast.interop.cli:main"
