"""advfast-eval end to end on a digits checkpoint: every protocol and every test-time attack."""

import json
import subprocess
import sys

import numpy as np
import pytest

from advfast.cli import train_main
from advfast.eval.cli import eval_main


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "acl"
    rc = train_main(["--method", "acl", "--dataset", "digits", "--out", str(out), "--no-progress",
                     "--batch-size", "64", "--set", "max_steps=2", "--set", "attack.steps=1"])
    assert rc == 0
    return out


@pytest.mark.parametrize("protocol,attacks,extra", [
    ("slf", "pgd20,l2-0.25,l1-7.84", []),
    ("alf", "pgd20,fgsm", ["--precision", "bf16"]),
    ("aff", "pgd20", ["--no-progress"]),
])
def test_every_protocol_runs_and_reports(digits_run, tmp_path, protocol, attacks, extra):
    out = tmp_path / protocol
    rc = eval_main(["--checkpoint", str(digits_run), "--protocol", protocol, "--attacks", attacks,
                    "--epochs", "1", "--n-eval", "24", "--out", str(out), "--no-plots", *extra])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("clean_accuracy", "robust_accuracy", "protocol", "bn_branch", "n_eval", "eps", "finetune_history"):
        assert key in res
    assert set(res["robust_accuracy"]) == set(attacks.split(","))
    for acc in res["robust_accuracy"].values():
        assert 0.0 <= acc <= 1.0
    assert res["bn_branch"] == "pgd"  # ACL DS evaluates its pgd branch, as the official --bnNameCnt 1
    assert "| SA (clean) |" in (out / "results.md").read_text()
    assert res["precision"] == ("bf16" if "bf16" in extra else "fp32")


def _fake_cifar10c(directory, n=6, size=16):
    """CIFAR-10-C's layout at digits' size: labels.npy + <corruption>.npy, 5 severities of n images."""
    rng = np.random.default_rng(0)
    directory.mkdir()
    np.save(directory / "labels.npy", np.tile(rng.integers(0, 10, n), 5).astype(np.int64))
    for name in ("gaussian_noise", "fog"):
        np.save(directory / f"{name}.npy", rng.integers(0, 256, (5 * n, size, size, 3), dtype=np.uint8))
    return directory


def test_autoattack_unseen_corruptions_smoothing_plots_and_other_branch(digits_run, tmp_path):
    pytest.importorskip("torchattacks", reason="torchattacks (the eval extra) is not installed")
    out = tmp_path / "aa"
    corruptions = _fake_cifar10c(tmp_path / "cifar10c")
    attacks = "autoattack,pgd20-2x,l2-0.5,l1-12"
    rc = eval_main(["--checkpoint", str(digits_run / "encoder.safetensors"), "--protocol", "slf",
                    "--bn-branch", "normal", "--attacks", attacks, "--smoothing", "2", "--epochs", "1",
                    "--corruptions-dir", str(corruptions), "--n-eval", "12", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["bn_branch"] == "normal"
    assert set(res["robust_accuracy"]) == set(attacks.split(","))
    assert set(res["smoothed"]) == {"clean", "pgd20-transfer"}
    assert {"gaussian_noise", "fog", "fog/5", "mean"} <= set(res["corruptions"])
    assert "| corruptions (mean) |" in (out / "results.md").read_text()
    for name in ("tsne.png", "accuracy_vs_eps.png", "training_curves.png"):
        assert (out / name).stat().st_size > 1000


def test_bad_input_is_one_line_with_exit_code_2(digits_run, tmp_path):
    cases = [
        ["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        ["--checkpoint", str(digits_run), "--attacks", "pgd200", "--out", str(tmp_path / "o")],
        ["--checkpoint", str(digits_run), "--bn-branch", "adv", "--out", str(tmp_path / "o")],
    ]
    for args in cases:
        proc = subprocess.run([sys.executable, "-m", "advfast.eval.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "error" in proc.stderr


# --- results first, optional steps skipped, the scored classifier saved -------------------------------

def test_results_are_written_when_plotting_cannot_run(digits_run, tmp_path, monkeypatch, capsys):
    # matplotlib missing (None in sys.modules makes its import fail): plots are skipped with one line each
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "noplots"
    rc = eval_main(["--checkpoint", str(digits_run), "--protocol", "slf", "--attacks", "pgd20", "--epochs", "1",
                    "--n-eval", "16", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["clean_accuracy"] <= 1 and "pgd20" in res["robust_accuracy"]
    assert "| SA (clean) |" in (out / "results.md").read_text()
    assert set(res["skipped"]) == {"tsne", "eps_curve plot", "training_curves"}
    assert all("matplotlib" in why for why in res["skipped"].values())
    assert res["plots"] == {} and not list(out.glob("*.png"))
    # the eps curve is still computed, and says which images it used
    assert res["eps_curve"]["n_images"] == 16 and len(res["eps_curve"]["accuracy"]) == 5
    err = capsys.readouterr().err
    assert "Traceback" not in err
    notes = [line for line in err.splitlines() if "skipped:" in line]
    assert len(notes) == 3 and all(line.startswith("[advfast-eval] ") for line in notes)
    assert (out / "classifier.safetensors").is_file() and (out / "classifier.json").is_file()


def test_results_exist_before_the_plots_run(digits_run, tmp_path, monkeypatch):
    import advfast.eval.run as run

    seen = {}

    def crash_plots(cfg, *args):
        seen["results"] = json.loads((tmp_path / "o" / "results.json").read_text())
        raise KeyboardInterrupt  # anything, even an interrupt, after the results are on disk

    monkeypatch.setattr(run, "_plots", crash_plots)
    with pytest.raises(KeyboardInterrupt):
        eval_main(["--checkpoint", str(digits_run), "--epochs", "1", "--n-eval", "8", "--attacks", "pgd20,fgsm",
                   "--out", str(tmp_path / "o"), "--no-progress"])
    assert set(seen["results"]["robust_accuracy"]) == {"pgd20", "fgsm"}
    assert seen["results"]["classifier"]["weights"].endswith("classifier.safetensors")


@pytest.mark.parametrize("protocol", ["slf", "aff"])
def test_saved_classifier_reloads_to_the_same_logits(digits_run, tmp_path, protocol):
    import torch

    from advfast.eval import load_classifier
    from advfast.eval.finetune import Classifier
    from advfast.eval.pretrained import load_pretrained
    from advfast.eval.saved_classifier import save_classifier

    encoder, meta = load_pretrained(str(digits_run))
    model = Classifier(encoder, 10, frozen=protocol == "slf", zero_init_head=False)
    if protocol == "aff":  # fine-tuned weights differ from the pre-trained ones: they must be the saved ones
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    save_classifier(model, str(tmp_path), checkpoint=str(digits_run), bn_branch=meta["bn_branch"],
                    protocol=protocol, num_classes=10)
    record = json.loads((tmp_path / "classifier.json").read_text())
    assert record["kind"] == ("linear_head" if protocol == "slf" else "full_model") and len(record["sha256"]) == 64
    x = torch.rand(6, 3, 16, 16)
    again = load_classifier(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # a damaged weights file is refused in one line
    data = bytearray((tmp_path / "classifier.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "classifier.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_classifier(tmp_path)


def test_evaluated_classifier_reproduces_its_clean_accuracy(digits_run, tmp_path):
    import torch

    from advfast.data import load_dataset
    from advfast.eval import load_classifier

    out = tmp_path / "e"
    assert eval_main(["--checkpoint", str(digits_run), "--epochs", "1", "--n-eval", "40", "--attacks", "fgsm",
                      "--out", str(out), "--no-plots", "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    model = load_classifier(out)
    test = load_dataset("digits", split="test", size=16)
    with torch.no_grad():
        pred = model(test.images[:40].float() / 255).argmax(1)
    assert float((pred == test.labels[:40]).float().mean()) == pytest.approx(res["clean_accuracy"], abs=1e-6)  # 1/40 apart


@pytest.mark.parametrize("args,named", [
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--smoothing", "-1"], "--smoothing"),
    (["--protocol", "slff"], "--protocol"), (["--epochs", "0"], "--epochs"), (["--n-eval", "-3"], "--n-eval"),
])
def test_bad_flags_are_one_line_exit_2_and_write_nothing(digits_run, tmp_path, capsys, args, named):
    with pytest.raises(SystemExit) as stop:
        eval_main(["--checkpoint", str(digits_run), *args, "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "usage:" not in err
    assert not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused_before_fine_tuning(digits_run, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("mine")
    for out in (target, target / "sub"):
        assert eval_main(["--checkpoint", str(digits_run), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("is an existing file" in err or "which is a file" in err)
        assert "epoch" not in err  # refused before the fine-tune
    assert target.read_text() == "mine"
