"""Every mistake a user can make: one line on stderr naming the problem and the fix, exit code 2, no
traceback, and nothing in the output directory created or overwritten."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from advfast.cli import train_main

TINY = ["--no-progress", "--set", "image_size=8", "--set", "method.head_hidden=16", "--set", "attack.steps=1"]


def _snapshot(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (to prove nothing was touched)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _fails_with(capsys, argv, *needles, out: Path | None = None):
    """Run advfast-train in-process; exit code 2, one line on stderr holding every needle, no traceback,
    and ``out`` (when given) left exactly as it was."""
    before = _snapshot(out) if out is not None else None
    code = train_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("advfast-train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    if out is not None:
        assert _snapshot(out) == before
    return err


# ---- names: unknown method, variant, dataset, architecture, attack (with the closest name) --------

@pytest.mark.parametrize("argv,needles", [
    (["--method", "amocc"], ["unknown method 'amocc'", "(did you mean 'amoc'?)", "choose from"]),
    (["--method", "acl", "--variant", "a2z"], ["unknown variant 'a2z' for method 'acl'", "did you mean"]),
    (["--method", "acl", "--dataset", "cifar1O"], ["unknown dataset 'cifar1O'", "(did you mean 'cifar10'?)"]),
    (["--method", "acl", "--arch", "resnet5O"], ["unknown arch 'resnet5O'", "(did you mean 'resnet50'?)"]),
    (["--method", "acl", "--set", "attack.kind=pgdd"], ["attack.kind must be one of pgd, fgsm, none",
                                                         "(did you mean 'pgd'?)"]),
    (["--method", "acl", "--set", "attack.norm=l3"], ["attack.norm must be one of linf, l2"]),
])
def test_unknown_names_suggest_the_closest(tmp_path, capsys, argv, needles):
    out = tmp_path / "run"
    _fails_with(capsys, [*argv, *TINY, "--out", out], *needles)
    assert not out.exists()


# ---- numbers: eps / alpha negative or absurd, batch larger than the dataset -----------------------

@pytest.mark.parametrize("setting,needle", [
    ("attack.eps=-8/255", "attack.eps must be in [0, 1] (image scale [0, 1]; e.g. 8/255), got -0.031"),
    ("attack.eps=8", "attack.eps must be in [0, 1]"),  # 8 meant as 8/255: the ball would hold every image
    ("attack.alpha=-0.01", "attack.alpha must be in [0, 1] (e.g. 2/255)"),
    ("attack.alpha=2", "attack.alpha must be in [0, 1]"),
    ("attack.eps=nan", "attack.eps must be in [0, 1]"),
    ("attack.steps=0", "attack.steps must be a positive integer"),
])
def test_eps_and_alpha_out_of_range(tmp_path, capsys, setting, needle):
    out = tmp_path / "run"
    _fails_with(capsys, ["--method", "acl", *TINY, "--set", setting, "--out", out], needle)
    assert not out.exists()


def test_batch_larger_than_the_dataset(tmp_path, capsys):
    out = tmp_path / "run"
    from advfast.data import load_dataset

    n = len(load_dataset("digits", split="train"))
    _fails_with(capsys, ["--method", "acl", *TINY, "--batch-size", "2000", "--out", out],
                f"batch_size 2000 is larger than the dataset (digits: {n} images)", f"--batch-size {n} or less")
    assert not out.exists()


# ---- data: missing directory without --download, mixed image sizes -------------------------------

@pytest.mark.parametrize("dataset", ["cifar10", "stl10", "imagefolder"])
def test_missing_data_directory_without_download(tmp_path, capsys, dataset):
    out, missing = tmp_path / "run", tmp_path / "no-data-here"
    err = _fails_with(capsys, ["--method", "simclr", "--dataset", dataset, "--data-dir", missing, "--no-progress",
                               "--out", out], str(missing))
    assert ("--download" in err) if dataset != "imagefolder" else ("is not a folder" in err)
    assert not out.exists() and not missing.exists()  # nothing downloaded or created without --download


def test_image_folder_with_mixed_sizes(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    for cls, size in (("cat", 12), ("dog", 16)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    out = tmp_path / "run"
    _fails_with(capsys, ["--method", "simclr", "--dataset", "imagefolder", "--data-dir", root, "--no-progress",
                         "--set", "image_size=null", "--batch-size", "4", "--out", out],
                "dog/0.png is 16x16 but", "cat/0.png is 12x12", "--image-size")
    assert not out.exists()


# ---- the output directory: not writable, a file, holding another run ------------------------------

def test_output_directory_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _fails_with(capsys, ["--method", "acl", *TINY, "--out", blocker / "run"], "is not writable", "choose another --out")
    _fails_with(capsys, ["--method", "acl", *TINY, "--out", blocker], f"output path {blocker} is a file")
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_output_directory_read_only(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        _fails_with(capsys, ["--method", "acl", *TINY, "--out", ro / "run"], "is not writable")
    finally:
        ro.chmod(0o700)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three finished one-step runs: acl/convnet, simclr/convnet, acl/resnet18."""
    base = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in (("acl", ["--method", "acl"]), ("simclr", ["--method", "simclr"]),
                        ("resnet18", ["--method", "acl", "--arch", "resnet18"])):
        out = base / name
        assert train_main([*extra, *TINY, "--batch-size", "32", "--set", "max_steps=1", "--out", str(out)]) == 0
        made[name] = out
    return made


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_output_directory_holding_another_run(runs, tmp_path, capsys):
    out = _copy_run(runs["acl"], tmp_path / "acl")
    for argv in (["--method", "acl"], ["--method", "simclr"]):  # the same recipe or another: both refused
        _fails_with(capsys, [*argv, *TINY, "--out", out], f"output directory {out} already holds a run",
                    "--resume", "--overwrite", out=out)
    _fails_with(capsys, ["--method", "acl", *TINY, "--resume", "--overwrite", "--out", out], "exclude each other",
                out=out)


@pytest.mark.parametrize("text,needles", [
    ("method: acl\nepoch: 3\n", ["unknown config key 'epoch' (did you mean 'epochs'?)"]),
    ("method: acl\noptim:\n  learning_rate: 0.1\n", ["unknown config.optim key 'learning_rate'"]),
    ("method: acl\nattack:\n  espilon: 0.1\n", ["unknown config.attack key 'espilon'"]),
    ("method: acl\nmethod_options:\n  head_hiden: 8\n", ["unknown option method.head_hiden for 'acl'",
                                                         "(did you mean 'head_hidden'?)"]),
    ("- just\n- a list\n", ["must hold a mapping of settings"]),
    ("method: [acl\n", ["is not valid YAML"]),
])
def test_config_file_with_unknown_keys(tmp_path, capsys, text, needles):
    cfg, out = tmp_path / "c.yaml", tmp_path / "run"
    cfg.write_text(text)
    _fails_with(capsys, ["--config", cfg, *TINY, "--out", out], *needles)
    assert not out.exists()


# ---- checkpoints from another method or architecture ----------------------------------------------

@pytest.mark.parametrize("other,needle", [
    ("simclr", "is from method 'simclr', not 'acl'"),
    ("resnet18", "is from arch 'resnet18', not 'convnet'"),
])
def test_resume_with_a_checkpoint_of_another_method_or_arch(runs, tmp_path, capsys, other, needle):
    """A checkpoint copied in from another run: caught before a single weight is loaded or written."""
    out = _copy_run(runs["acl"], tmp_path / "acl")
    shutil.rmtree(out / "checkpoints")
    shutil.copytree(runs[other] / "checkpoints", out / "checkpoints")
    _fails_with(capsys, ["--resume", "--no-progress", "--out", out], needle, "resume with the run's own settings",
                out=out)


def test_resume_asking_for_another_method_or_arch(runs, tmp_path, capsys):
    out = _copy_run(runs["acl"], tmp_path / "acl")
    _fails_with(capsys, ["--resume", "--method", "simclr", "--out", out],
                "--method simclr differs from the run", "drop it to resume", out=out)
    _fails_with(capsys, ["--resume", "--arch", "resnet18", "--out", out], "arch cannot change", out=out)


def _eval(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "advfast.eval.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_eval_with_an_encoder_of_another_arch(runs, tmp_path):
    """advfast-eval on a run whose encoder file came from another architecture."""
    run = _copy_run(runs["acl"], tmp_path / "acl")
    shutil.copy(runs["resnet18"] / "encoder.safetensors", run / "encoder.safetensors")
    # its checksum recorded too, so the file is whole and the shape check is what answers
    from advfast.io import file_sha256

    meta = json.loads((run / "encoder.json").read_text())
    meta["sha256"]["encoder.safetensors"] = file_sha256(run / "encoder.safetensors")
    (run / "encoder.json").write_text(json.dumps(meta))
    r = _eval("--checkpoint", run, "--n-eval", "8", "--epochs", "1", "--no-plots", "--out", tmp_path / "eval")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "does not fit a convnet encoder" in r.stderr
    assert not (tmp_path / "eval" / "results.json").exists()


def test_one_line_without_traceback_in_a_subprocess(tmp_path):
    """The in-process checks above stand for the real entry point: here it is, once, for a data error."""
    out, missing = tmp_path / "run", tmp_path / "nowhere"
    r = subprocess.run([sys.executable, "-m", "advfast.train", "--method", "simclr", "--dataset", "cifar10",
                        "--data-dir", str(missing), "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("advfast-train: error: cifar10 not found at") and "--download" in r.stderr
    assert not out.exists()
