"""advfast-eval --protocol-set robustssl on published checkpoints (--from FORMAT), end to end.

Each checkpoint is generated the way its official code base saves it (tests/test_interop_load.py's builders:
the official model class, random weights, the real payload around them); the data are synthetic CIFAR-10 /
CIFAR-100 / STL-10 files in the official on-disk layout (advfast.data.datasets.write_official_format). Epoch,
image-count and attack-step overrides make the benchmark's code paths run in seconds on a CPU; the
leaderboard entry then says the run is not comparable, and why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from advfast.data.datasets import load_dataset, write_corruptions, write_official_format
from advfast.eval.cli import eval_main
from advfast.eval.robustssl import CORRUPTIONS
from advfast.eval.run import EvalConfig, evaluate

_spec = importlib.util.spec_from_file_location("test_interop_load_builders",
                                               Path(__file__).with_name("test_interop_load.py"))
til = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(til)
om = til.om


def _build_robustssl(seed):
    """A file advfast-export --to robustssl writes (ACL's dual-BN layout under 'state_dict', 'advfast' info)."""
    from advfast.interop.export import robustssl_state_dict
    from advfast.models import build_encoder, to_single_branch

    encoder = om.randomize(build_encoder("resnet18", bn_branches=("normal", "pgd"), mean=(0.5,) * 3, std=(0.25,) * 3),
                           seed)
    state = robustssl_state_dict(to_single_branch(encoder, "pgd"), to_single_branch(encoder, "normal"))
    return {"state_dict": state,
            "advfast": {"method": "acl", "bn_branch": "pgd"}}


BUILDERS = {  # --from: the official save of that code base
    "acl": til.build_acl, "dynacl": til.build_dynacl_full, "advcl": til.build_advcl, "a-infonce": til.build_ainfonce,
    "deacl": til.build_deacl, "solo-learn": til.build_solo, "rocl": til.build_rocl, "amoc": til.build_amoc_tar,
    "robustssl": _build_robustssl,
}
_FILES: dict = {}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_official_format("cifar10", root, n_train=6, n_test=4, seed=1)
    write_official_format("cifar100", root, n_train=4, n_test=2, seed=2)
    write_official_format("stl10", root, n_train=4, n_test=2, seed=3)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("published")

    def get(fmt):
        if fmt not in _FILES:
            with om.no_default_init():
                payload = BUILDERS[fmt](seed=len(fmt))
            if isinstance(payload, tuple):
                payload = payload[0]
            path = folder / f"{fmt}.pt"
            if isinstance(payload, bytes):  # Lightning checkpoints, pickled while stand-in modules existed
                path.write_bytes(payload)
            else:
                torch.save(payload, path)
            _FILES[fmt] = path
        return _FILES[fmt]
    return get


def _run(tmp_path, data_root, path, fmt, protocol="slf", **kw):
    """evaluate() with the tiny overrides: 1 epoch, 2 training images, 1 test image, FGSM unless told."""
    cfg = EvalConfig(checkpoint=str(path), from_format=fmt, protocol_set=kw.pop("protocol_set", "robustssl"),
                     protocol=protocol, out=kw.pop("out", str(tmp_path / f"{fmt}-{protocol}")),
                     data_dir=str(data_root), plots=False, progress=False, n_train=kw.pop("n_train", 2),
                     n_eval=kw.pop("n_eval", 1), attacks=kw.pop("attacks", "fgsm"),
                     overrides={"epochs": 1, **kw.pop("overrides", {})}, **kw)
    result = evaluate(cfg, log=lambda msg: None)
    on_disk = json.loads((Path(cfg.out) / "results.json").read_text())
    assert on_disk.get("leaderboard") == result.get("leaderboard")
    return result


@pytest.mark.parametrize("fmt", sorted(BUILDERS))
def test_every_published_format_evaluates_with_the_benchmark_protocol(tmp_path, data_root, ckpt, fmt):
    res = _run(tmp_path, data_root, ckpt(fmt), fmt)
    assert res["checkpoint_format"] == fmt and res["protocol_set"] == "robustssl" and res["arch"].startswith("resnet18")
    assert res["bn_branch"] == {"acl": "pgd", "dynacl": "pgd", "advcl": "pgd", "a-infonce": "pgd", "amoc": "adv",
                                "robustssl": "pgd"}.get(fmt, "normal")
    # the benchmark's per-method SLF settings (setup_hyperparameter) for the methods it lists, else its generic ones
    listed = {"acl": "ACL", "dynacl": "DynACL", "advcl": "AdvCL", "a-infonce": "A-InfoNCE", "deacl": "DeACL",
              "robustssl": "DynACL"}
    assert res["robustssl"]["pretraining"] == listed.get(fmt)
    lr, bs = (0.01, 512) if fmt in listed else (0.1, 128)
    assert (res["schedule"]["lr"], res["schedule"]["batch_size"], res["schedule"]["epochs"]) == (lr, bs, 1)
    assert res["robustssl"]["settings"]["epochs"] == 25  # what the benchmark runs; --epochs overrode it here
    board = res["leaderboard"]
    assert board["table"] == "cifar10-cifar10-SLF" and board["row"]["sa1"] == round(100 * res["clean_accuracy"], 2)
    assert board["comparable"] is False and any("epochs" in d for d in board["differences"])
    assert (tmp_path / f"{fmt}-slf" / "classifier.json").is_file()


def test_dual_bn_aff_matches_the_benchmarks_trades_loss_dual(tmp_path, data_root, ckpt):
    """AFF on a dual-BN ACL checkpoint: natural term through BN 'normal', attack and adversarial term through
    'pgd' (utils.py trades_loss_dual), scored on 'pgd'; the saved classifier reloads with both branches."""
    from advfast.eval import load_classifier

    path = ckpt("acl")
    res = _run(tmp_path, data_root, path, "acl", protocol="aff", overrides={"train_steps": 1})
    assert res["robustssl"]["dual_bn"] is True and res["robustssl"]["natural_branch"] == "normal"
    assert res["schedule"]["dual_bn"] and res["robustssl"]["settings"]["epochs"] == 100  # ACL's AFF: 100 epochs
    assert res["leaderboard"]["table"] == "cifar10-cifar10-AFF"
    record = json.loads((tmp_path / "acl-aff" / "classifier.json").read_text())
    assert record["checkpoint_format"] == "acl" and record["keep_branches"] and record["natural_branch"] == "normal"
    model = load_classifier(tmp_path / "acl-aff")
    assert model.encoder.branches == ("normal", "pgd") and model.branch == "pgd"
    test = load_dataset("cifar10", root=data_root, split="test")
    with torch.no_grad():
        pred = model(test.images[:1].float() / 255).argmax(1)
    assert float((pred == test.labels[:1]).float().mean()) == res["clean_accuracy"]
    # --dual-bn 0 (the run script's setting for CIFAR-10 -> STL-10 rows) keeps one branch
    single = _run(tmp_path, data_root, path, "acl", protocol="aff", dual_bn=False, overrides={"train_steps": 1},
                  out=str(tmp_path / "single"))
    assert single["robustssl"]["dual_bn"] is False and single["schedule"]["dual_bn"] is False


def test_dual_bn_step_equals_a_transcription_of_the_benchmark(ckpt):
    """One AFF step of advfast's dual-BN TRADES on the imported encoder = the benchmark's trades_loss_dual +
    SGD on the official dual-BN model (float64, same head, same start noise)."""
    from advfast.eval.finetune import Classifier, finetune
    from advfast.eval.protocols import ProtocolConfig
    from advfast.interop import load_published

    torch.manual_seed(0)
    payload = torch.load(ckpt("acl"), weights_only=False)
    official = om.MultiBNResNet18(bn_names=["normal", "pgd"], heads="benchmark", num_classes=3)
    official.load_state_dict(payload["state_dict"], strict=False)  # fc: the benchmark's zero-initialised head
    torch.nn.init.zeros_(official.fc.weight)
    torch.nn.init.zeros_(official.fc.bias)
    official.double()
    encoder, _ = load_published(ckpt("acl"), "acl", keep_branches=True)
    model = Classifier(encoder.double(), 3, branch="pgd", frozen=False, natural_branch="normal").double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2])
    cfg = ProtocolConfig("aff", epochs=1, batch_size=2, lr=0.1, milestones=(15, 20), train_steps=2, dual_bn=True)

    class Batch:
        views, labels = [x], y

    gen = torch.Generator().manual_seed(5)
    finetune(model, [Batch()], cfg, generator=gen)

    # utils.py trades_loss_dual, transcribed (the same N(0, 1) draw for the start), then an SGD step
    noise = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(5))

    def logits(z, bn):
        return official.fc(official(z, bn))

    official.eval()
    x_adv = x + 0.001 * noise
    for _ in range(2):
        x_adv.requires_grad_()
        loss_kl = F.kl_div(F.log_softmax(logits(x_adv, "pgd"), 1), F.softmax(logits(x, "normal"), 1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + 2 / 255 * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - 8 / 255), x + 8 / 255), 0.0, 1.0)
    official.train()
    nat, adv = logits(x, "normal"), logits(x_adv, "pgd")
    loss = F.cross_entropy(nat, y) + 6.0 / 2 * F.kl_div(F.log_softmax(adv, 1), F.softmax(nat, 1), reduction="sum")
    opt = torch.optim.SGD(official.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch.testing.assert_close(model.head.weight, official.fc.weight, rtol=1e-9, atol=1e-12)
    ours = model.encoder.state_dict()
    torch.testing.assert_close(ours["layer4.1.conv2.weight"], official.layer4[1].conv2.weight, rtol=1e-9, atol=1e-12)
    for branch, index in (("normal", 0), ("pgd", 1)):  # each branch's BN moved with its own inputs
        theirs = official.layer1[0].bn1.bn_list[index]
        torch.testing.assert_close(ours[f"layer1.0.bn1.bns.{branch}.running_mean"], theirs.running_mean)
        torch.testing.assert_close(ours[f"layer1.0.bn1.bns.{branch}.weight"], theirs.weight, rtol=1e-9, atol=1e-12)


def test_downstream_stl10_is_resized_and_corruptions_use_the_15_of_the_benchmark(tmp_path, data_root, ckpt):
    res = _run(tmp_path, data_root, ckpt("dynacl"), "dynacl", downstream="stl10")
    assert res["dataset"] == "stl10" and res["robustssl"]["resize"] == 32
    assert res["leaderboard"]["table"] == "cifar10-stl10-SLF" and res["leaderboard"]["row"]["ca1"] == 0.0
    assert res["robustssl"]["dual_bn"] is False  # SLF; and the run script's --dualBN 0 for CIFAR-10 -> STL-10
    assert (res["schedule"]["lr"], res["schedule"]["batch_size"]) == (0.01, 128)  # DynACL, stl10 at resize 32
    # the advfast protocol set takes --downstream too: the same resize, advfast's schedule, no leaderboard row
    own = _run(tmp_path, data_root, ckpt("dynacl"), "dynacl", downstream="stl10", protocol_set="advfast",
               out=str(tmp_path / "own"))
    assert own["dataset"] == "stl10" and "leaderboard" not in own and own["schedule"]["batch_size"] == 512
    with pytest.raises(ValueError, match="no corruption set for stl10"):
        _run(tmp_path, data_root, ckpt("dynacl"), "dynacl", downstream="stl10", corruptions_dir=str(tmp_path))

    corr = write_corruptions(tmp_path / "CIFAR-10-C", CORRUPTIONS + ("speckle_noise",), n_per_severity=1)
    res = _run(tmp_path, data_root, ckpt("dynacl"), "dynacl", corruptions_dir=corr, out=str(tmp_path / "c"))
    names = {k for k in res["corruptions"] if "/" not in k and k != "mean"}
    assert names == set(CORRUPTIONS)  # the benchmark's 15: CIFAR-10-C's speckle_noise is not one
    severities = [res["corruptions"][f"severity/{s}"] for s in range(1, 6)]
    assert res["corruptions"]["mean"] == pytest.approx(sum(severities) / 5)
    assert res["leaderboard"]["row"]["ca1"] == round(100 * res["corruptions"]["mean"], 2)


def test_autoattack_records_package_and_version_in_the_leaderboard_row(tmp_path, data_root, ckpt):
    pytest.importorskip("torchattacks", reason="torchattacks (the eval extra) is not installed")
    from importlib.metadata import version

    package = "autoattack" if importlib.util.find_spec("autoattack") else "torchattacks"
    # CIFAR-100 downstream: 100 classes, so the 1 test image is misclassified and AutoAttack ends early on a CPU
    res = _run(tmp_path, data_root, ckpt("advcl"), "advcl", downstream="cifar100", attacks="pgd20,autoattack")
    assert res["autoattack"]["package"] == package and res["autoattack"]["version_setting"] == "standard"
    assert res["autoattack"]["version"] == version(package)
    assert set(res["robust_accuracy"]) == {"pgd20", "autoattack"}
    board = res["leaderboard"]
    assert board["table"] == "cifar10-cifar100-SLF"
    assert board["row"]["ra1"] == round(100 * res["robust_accuracy"]["autoattack"], 2)
    assert (package == "torchattacks") == any("torchattacks" in d for d in board["differences"])
    assert "leaderboard" in (tmp_path / "advcl-slf" / "results.md").read_text()


@pytest.mark.slow  # a fresh interpreter imports torch and advfast: about 30 s on a busy 2-core CPU
def test_the_cli_runs_the_protocol_and_records_its_command_line(tmp_path, data_root, ckpt):
    out = tmp_path / "cli"
    args = ["--checkpoint", str(ckpt("rocl")), "--from", "rocl", "--protocol-set", "robustssl", "--epochs", "1",
            "--n-train", "2", "--n-eval", "1", "--attacks", "fgsm", "--data-dir", str(data_root), "--out", str(out),
            "--no-plots", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "advfast.eval.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ, ADVFAST_DATA=str(data_root)))
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["command"].startswith("advfast-eval --checkpoint ") and "--protocol-set robustssl" in res["command"]
    assert res["leaderboard"]["table"] == "cifar10-cifar10-SLF" and res["robustssl"]["pretraining"] is None


def test_a_file_of_another_format_is_one_line_exit_2(tmp_path, data_root, ckpt, capsys):
    rc = eval_main(["--checkpoint", str(ckpt("rocl")), "--from", "acl", "--protocol-set", "robustssl",
                    "--data-dir", str(data_root), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "is not a acl checkpoint" in err and "--from rocl" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args,message", [
    (["--protocol-set", "robustssl", "--protocol", "aff_long"], "aff_long belongs to the advfast set"),
    (["--pretraining", "ACL"], "settings of --protocol-set robustssl"),
    (["--protocol-set", "robustssl", "--pretraining", "DynACL-AIR+"], "did you mean 'DynACL-AIR++'"),
    (["--protocol-set", "robustssl", "--dataset", "digits"], "not digits"),
])
def test_flags_that_cannot_apply_are_refused_in_one_line(tmp_path, data_root, ckpt, capsys, args, message):
    rc = eval_main(["--checkpoint", str(ckpt("acl")), "--from", "acl", "--data-dir", str(data_root),
                    "--out", str(tmp_path / "o"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_the_downstream_resize_is_pils_bilinear_up_to_rounding():
    """get_loader's transforms.Resize(32) on STL-10's 96 px PIL images: advfast resizes the uint8 tensor instead."""
    import numpy as np

    Image = pytest.importorskip("PIL.Image")
    from advfast.data.datasets import ImageDataset, resized

    x = np.random.default_rng(0).integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    ds = ImageDataset(torch.from_numpy(x), torch.zeros(3, dtype=torch.int64), (0.5,) * 3, (0.25,) * 3, 10, "stl10")
    ours = resized(ds, 32).images.numpy().astype(int)
    pil = np.stack([np.asarray(Image.fromarray(im.transpose(1, 2, 0)).resize((32, 32), Image.BILINEAR))
                    for im in x]).transpose(0, 3, 1, 2).astype(int)
    assert ours.shape == pil.shape and np.abs(ours - pil).max() <= 1
    assert resized(ds, 96) is ds  # already that size: untouched


def test_the_reference_autoattack_package_is_preferred_when_importable(monkeypatch):
    """The dispatch to fra31's `autoattack` (not on PyPI, so a stand-in module here): standard version, Linf,
    the benchmark's bs 128 and the model's device; its version is what results.json records."""
    import types

    from advfast.eval.robustness import AttackSpec, autoattack_backend, robust_accuracy

    calls = []

    class AutoAttack:
        def __init__(self, model, norm, eps, version, verbose, seed, device):
            calls.append({"norm": norm, "eps": eps, "version": version, "device": str(device)})

        def run_standard_evaluation(self, x, y, bs):
            calls[-1]["bs"] = bs
            return x

    module = types.ModuleType("autoattack")
    module.AutoAttack, module.__version__ = AutoAttack, "0.1-test"
    monkeypatch.setitem(sys.modules, "autoattack", module)
    assert autoattack_backend() == {"package": "autoattack", "version": "0.1-test", "version_setting": "standard"}
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images, labels = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1])
    acc = robust_accuracy(model, images, labels, AttackSpec("autoattack", "autoattack", 8 / 255), batch_size=128)
    with torch.no_grad():
        clean = (model(images.float() / 255).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(clean)  # the stand-in returns the inputs unchanged
    assert calls == [{"norm": "Linf", "eps": 8 / 255, "version": "standard", "device": "cpu", "bs": 128}]
