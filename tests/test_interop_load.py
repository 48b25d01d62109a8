"""advfast.interop.load_published: checkpoints written the way each official code base writes them
(its model class transcribed in tests/interop_official_models.py, random weights, the real payload
around the weights) load into advfast encoders that compute the official features (float64)."""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from advfast.interop import FORMATS, InteropError, load_published

_spec = importlib.util.spec_from_file_location("interop_official_models",
                                               Path(__file__).with_name("interop_official_models.py"))
om = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(om)


def _sgd_state(model: nn.Module) -> dict:
    """An optimizer state dict with momentum buffers, as saved after training steps."""
    params = [p for p in model.parameters()][:4]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    sum(p.float().sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


class _FakeLightning:
    """Installs stand-in pytorch_lightning modules while a checkpoint is saved, so the payload names
    Lightning's classes exactly as a real Lightning 1.5 checkpoint does; removed before loading."""

    def __enter__(self):
        self.names = ["pytorch_lightning", "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing",
                      "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
        mods = {n: types.ModuleType(n) for n in self.names}

        class AttributeDict(dict):
            pass

        class ModelCheckpoint:
            pass

        AttributeDict.__module__ = "pytorch_lightning.utilities.parsing"
        ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
        AttributeDict.__qualname__, ModelCheckpoint.__qualname__ = "AttributeDict", "ModelCheckpoint"
        mods["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict
        mods["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
        for n, m in mods.items():
            assert n not in sys.modules
            sys.modules[n] = m
        self.AttributeDict, self.ModelCheckpoint = AttributeDict, ModelCheckpoint
        return self

    def __exit__(self, *exc):
        for n in self.names:
            sys.modules.pop(n, None)


def _lightning_payload(lt, state_dict, model, hparams) -> dict:
    return {"epoch": 99, "global_step": 19500, "pytorch-lightning_version": "1.5.3", "state_dict": state_dict,
            "callbacks": {lt.ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "dirpath": "trained_models"}},
            "optimizer_states": [_sgd_state(model)],
            "lr_schedulers": [{"last_epoch": 99, "base_lrs": [0.5], "_step_count": 100}],
            "hparams_name": "kwargs", "hyper_parameters": lt.AttributeDict(hparams)}


# ---- one builder per published layout: (payload, reference features function) ----------------------------

def build_acl(seed):
    model = om.randomize(om.MultiBNResNet18(bn_names=["normal", "pgd"]), seed)
    payload = {"epoch": 1000, "state_dict": model.state_dict(), "optim": _sgd_state(model)}
    return payload, lambda x, b="pgd": model(x, b)


def build_dynacl_full(seed):  # model.pt: the encoder_q / encoder_k wrapper
    model = om.resnet18_momentum(bn_names=["normal", "pgd"])
    om.randomize(model.encoder_q, seed)
    om.randomize(model.encoder_k, seed + 1)
    payload = {"epoch": 1000, "state_dict": model.state_dict(), "optim": _sgd_state(model)}
    return payload, lambda x, b="pgd": model.encoder_k(x, b)


def build_dynacl_k(seed):  # model_encoder_k.pt
    model = om.resnet18_momentum(bn_names=["normal", "pgd"])
    om.randomize(model, seed)
    return {"epoch": 1000, "state_dict": model.encoder_k.state_dict()}, lambda x, b="pgd": model.encoder_k(x, b)


def build_dynacl_pp_single(seed):  # DynACL++ after LPAFT.py: single-BN models/resnet.py with fc and normalize
    model = om.randomize(om.TorchvisionResNet18(mean=om.IMAGENET_MEAN, std=om.IMAGENET_STD, num_classes=10), seed)
    return {"epoch": 25, "state_dict": model.state_dict()}, lambda x, b=None: model(x)


def _advcl(seed):
    model = om.randomize(om.MultiBNResNet18(bn_names=["normal", "pgd", "pgd_ce"], normalize=False, heads="advcl"),
                         seed)
    wrapped = nn.DataParallel(model)  # pretraining_advCL.py trains under DataParallel: keys start with module.
    payload = {"model": wrapped.state_dict(), "epoch": 1000, "rng_state": torch.get_rng_state()}
    return payload, lambda x, b="pgd": model(x, b)


build_advcl = build_ainfonce = _advcl


def build_deacl(seed):
    backbone = om.randomize(om.TorchvisionResNet18(mean=[0.4914, 0.4822, 0.4465], std=[0.247, 0.243, 0.261],
                                                   cifar_stem_padding=2), seed)
    momentum = om.randomize(om.TorchvisionResNet18(mean=[0.4914, 0.4822, 0.4465], std=[0.247, 0.243, 0.261],
                                                   cifar_stem_padding=2), seed + 1)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"momentum_backbone.{k}": v for k, v in momentum.state_dict().items()})
    state.update({"classifier.weight": torch.randn(10, 512), "classifier.bias": torch.zeros(10),
                  "classifier_adv.weight": torch.randn(10, 512), "classifier_adv.bias": torch.zeros(10)})
    with _FakeLightning() as lt:
        hp = {"backbone": "resnet18", "num_classes": 10, "backbone_args": {"cifar": True, "zero_init_residual": False},
              "epsilon": 8, "trades_k": 2.0, "distillation_teacher": "simclr_cifar10",
              "cli_args": argparse.Namespace(method="mocov2_kd_at", max_epochs=100, lr=0.5)}
        payload = _lightning_payload(lt, state, backbone, hp)
        blob = _dumps(payload)
    return blob, lambda x, b=None: backbone(x)


def build_solo(seed):
    backbone = om.randomize(om.TorchvisionResNet18(cifar_stem_padding=2), seed)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({"projector.0.weight": torch.randn(2048, 512), "projector.0.bias": torch.zeros(2048),
                  "projector.3.weight": torch.randn(256, 2048), "classifier.weight": torch.randn(10, 512),
                  "classifier.bias": torch.zeros(10)})
    norm = om.NormalizeByChannelMeanStd([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]).double()
    with _FakeLightning() as lt:
        hp = {"backbone": "resnet18", "proj_hidden_dim": 2048, "proj_output_dim": 256, "temperature": 0.2,
              "extra_optimizer_args": {"momentum": 0.9}, "scheduler": "warmup_cosine"}
        blob = _dumps(_lightning_payload(lt, state, backbone, hp))
    return blob, lambda x, b=None: backbone(norm(x))  # solo-learn normalises in its data pipeline


def build_rocl(seed):
    model = om.randomize(om.RoclResNet18(), seed)
    payload = {"epoch": 1000, "acc": np.float64(3.25), "model": nn.DataParallel(model).state_dict(),
               "optimizer_state": _sgd_state(model), "rng_state": torch.get_rng_state()}
    return payload, lambda x, b=None: model(x)


_AMOC_NORM = ([0.4914, 0.4824, 0.4467], [0.2471, 0.2435, 0.2617])  # src/config.py, applied outside the model


def _amoc_ref(encoder):
    norm = om.NormalizeByChannelMeanStd(*_AMOC_NORM).double()

    def ref(x, b="adv"):
        encoder.adv_train(b == "adv")
        return encoder(norm(x))
    return ref


def build_amoc_paras(seed):  # src/base.py save(): paras.pt = encoder_q.state_dict()
    moco = om.randomize(om.AmocMoCo(), seed)
    return moco.encoder_q.state_dict(), _amoc_ref(moco.encoder_q)


def build_amoc_tar(seed):  # src/utils.py save_checkpoint(): model-optim-lr_sch-epoch.tar
    moco = om.AmocMoCo()
    om.randomize(moco, seed)
    om.randomize(moco.encoder_k, seed + 7)
    payload = {"model": moco.state_dict(), "optimizer": _sgd_state(moco),
               "lr_scheduler": {"T_max": 190, "eta_min": 0, "last_epoch": 199}, "epoch": 200}
    return payload, _amoc_ref(moco.encoder_q)


def _dumps(obj) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


CASES = {  # name: (builder, --from, branches to check; the first is the format's default)
    "acl": (build_acl, "acl", ("pgd",)),  # the 'normal' branch: test_branch_choice_matters...
    "dynacl-model.pt": (build_dynacl_full, "dynacl", ("pgd",)),
    "dynacl-model_encoder_k.pt": (build_dynacl_k, "dynacl", ("pgd",)),
    "dynacl++-lpaft": (build_dynacl_pp_single, "dynacl", (None,)),
    "advcl": (build_advcl, "advcl", ("pgd", "pgd_ce")),
    "a-infonce": (build_ainfonce, "a-infonce", ("pgd",)),
    "deacl": (build_deacl, "deacl", (None,)),
    "solo-learn": (build_solo, "solo-learn", (None,)),
    "rocl": (build_rocl, "rocl", (None,)),
    "amoc-paras.pt": (build_amoc_paras, "amoc", ("adv", "clean")),
    "amoc-tar": (build_amoc_tar, "amoc", ("adv",)),
}


def _write(tmp_path, name, payload) -> Path:
    path = tmp_path / f"{name}.pt"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    return path


_BUILT: dict = {}


@pytest.fixture
def built(tmp_path_factory):
    """(checkpoint path, reference features function) of a case, built once per session (a ResNet-18
    costs about a second to build, randomise and save on a CPU)."""
    def get(case):
        if case not in _BUILT:
            with om.no_default_init():
                payload, reference = CASES[case][0](seed=len(case))
            _BUILT[case] = (_write(tmp_path_factory.mktemp("interop"), case, payload), reference)
        return _BUILT[case]
    return get


def _x(fmt):
    # RoCL pools with F.avg_pool2d(out, 4), which equals a global average only for 32x32 inputs;
    # the others are run at 16x16 to keep the float64 forwards cheap
    return torch.rand(2, 3, 32 if fmt == "rocl" else 16, 32 if fmt == "rocl" else 16, dtype=torch.float64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_reproduces_the_official_features(built, case):
    _, fmt, branches = CASES[case]
    path, reference = built(case)
    x = _x(fmt)
    for i, branch in enumerate(branches):
        # the first branch is the one the method's paper evaluates: loaded without --bn-branch
        encoder, meta = load_published(path, fmt) if i == 0 else load_published(path, fmt, bn_branch=branch)
        assert meta["bn_branch"] == (branch or "normal") and meta["format"] == fmt
        assert meta["dataset"] == "cifar10" and meta["image_size"] == 32 and meta["feat_dim"] == 512
        with torch.no_grad():
            expected = reference(x, branch) if branch else reference(x)
            out = encoder.double()(x)  # the official model also computes with the saved float32 values
        assert out.shape == (2, 512) and out.abs().max() > 1e-3
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


@pytest.fixture(autouse=True)
def _official_models_in_float64(monkeypatch):
    # the reference models run in float64 with the weights they were saved with (float32 values)
    orig = om.nn.Module.__call__

    def call(self, *args, **kwargs):
        if isinstance(self, (om.MultiBNResNet18, om.TorchvisionResNet18, om.AmocResNet18, om.RoclResNet18)):
            first = next(self.parameters())
            if first.dtype != torch.float64:
                self.double()
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(om.nn.Module, "__call__", call)


def test_branch_choice_matters_and_wrong_branch_fails(built):
    path, reference = built("acl")
    x = _x("acl")
    with torch.no_grad():
        normal = load_published(path, "acl", bn_branch="normal")[0].double()(x)
        torch.testing.assert_close(normal, reference(x, "normal"), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(normal, reference(x, "pgd"))
    both, meta = load_published(path, "acl", keep_branches=True)  # for dual-BN fine-tuning (the benchmark's AFF)
    assert both.branches == ("normal", "pgd") and meta["bn_branch"] == "pgd"
    with torch.no_grad():
        both = both.double()
        for branch in ("normal", "pgd"):
            torch.testing.assert_close(both(x, branch), reference(x, branch), rtol=1e-9, atol=1e-9)
    with pytest.raises(InteropError, match=r"branch 'adv' is not in this acl file \(it has normal, pgd\)"):
        load_published(path, "acl", bn_branch="adv")
    rocl, _ = built("rocl")
    with pytest.raises(InteropError, match="single BatchNorm"):
        load_published(rocl, "rocl", bn_branch="pgd")


@pytest.mark.parametrize("wrong, right", [("rocl", "acl"), ("acl", "amoc"), ("deacl", "rocl"), ("advcl", "dynacl")])
def test_a_file_of_another_format_fails_in_one_line_naming_it(built, wrong, right):
    path, _ = built({"acl": "acl", "amoc": "amoc-paras.pt", "rocl": "rocl", "dynacl": "dynacl-model.pt"}[right])
    with pytest.raises(InteropError) as info:
        load_published(path, wrong)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert right in message or "missing" in message


def test_other_architectures_and_shapes_are_refused(built, tmp_path):
    state = torch.load(built("rocl")[0], weights_only=False)["model"]
    short = {k: v for k, v in state.items() if not k.startswith("module.layer4.1.")}  # a ResNet with 2,2,2,1 blocks
    path = _write(tmp_path, "short", {"model": short})
    with pytest.raises(InteropError, match=r"\(2, 2, 2, 1\) BasicBlocks per stage"):
        load_published(path, "rocl")
    bad_shape = dict(state, **{"module.layer3.0.conv2.weight": torch.zeros(256, 256, 5, 5)})
    path = _write(tmp_path, "shape", {"model": bad_shape})
    with pytest.raises(InteropError, match=r"layer3.0.conv2.weight has shape \(256, 256, 5, 5\), a resnet18 "
                                           r"encoder expects \(256, 256, 3, 3\)"):
        load_published(path, "rocl")


def test_unknown_format_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InteropError, match="unknown checkpoint format 'acll'.*acl"):
        load_published(tmp_path / "x.pt", "acll")
    with pytest.raises(FileNotFoundError):
        load_published(tmp_path / "missing.pt", "acl")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InteropError, match="not a readable torch checkpoint"):
        load_published(bad, "acl")
    with pytest.raises(InteropError, match="holds a list"):
        load_published(_write(tmp_path, "list", [torch.zeros(1)]), "acl")


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


def test_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    payload = {"epoch": 3, "state_dict": {"conv1.weight": torch.zeros(64, 3, 3, 3)}, "args": _Exploit()}
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(InteropError, match=r"refused global (posix|os|nt)\.system") as info:
        load_published(path, "acl")
    assert "\n" not in str(info.value)
    # and with plain pickle (no torch zip container) as well
    path.write_bytes(pickle.dumps({"state_dict": {}, "x": _Exploit()}, protocol=2))
    with pytest.raises(InteropError, match="refused global|not a readable"):
        load_published(path, "acl")


def test_lightning_payload_loads_without_lightning(built):
    from advfast.interop.safe_unpickle import AttributeDict, LightningStandIn, load_checkpoint

    path, _ = built("deacl")
    assert "pytorch_lightning" not in sys.modules
    payload = load_checkpoint(path)
    assert "pytorch_lightning" not in sys.modules  # never imported
    hp = payload["hyper_parameters"]
    assert isinstance(hp, AttributeDict) and hp.trades_k == 2.0
    assert isinstance(hp["cli_args"], argparse.Namespace) and hp["cli_args"].max_epochs == 100
    (key,) = payload["callbacks"]
    assert issubclass(key, LightningStandIn) and key.qualname.endswith("ModelCheckpoint")


def test_the_package_level_name_is_the_importer_and_import_stays_light():
    import subprocess
    import sys

    import advfast
    from advfast.interop import load_published

    assert advfast.load_published is load_published
    code = "import sys, advfast; assert 'torch' not in sys.modules; print('light')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "light\n"
