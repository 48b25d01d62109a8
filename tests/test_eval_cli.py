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
