"""Hostile input to advfast-train: every input error that can be checked before training ends in exit
code 2 and one line naming the input, no traceback, and nothing written: each case runs with
--overwrite against a copy of a finished run, and the whole folder (the run and every input file) is
hashed before and after. A file the user names as an input (method.pseudo_labels) is never written."""

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from advfast.cli import train_main

TINY = ["--no-progress", "--set", "image_size=8", "--set", "method.head_hidden=16", "--set", "attack.steps=1",
        "--batch-size", "32", "--set", "max_steps=1"]
def tiny(method: str) -> list[str]:
    """TINY for ``method`` (moco and amoc have no method.head_hidden)."""
    if method in ("moco", "moco-adv", "amoc"):
        i = TINY.index("method.head_hidden=16")
        return TINY[:i - 1] + TINY[i + 1:]
    return TINY


DIGITS_TRAIN = 1438  # digits' fixed 80% train split of 1797 images


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's SHA-256, or "dir"."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_main(["--method", "acl", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _refused(capsys, tmp_path, argv, *needles, out=None):
    """advfast-train ``argv`` (with --overwrite of ``out``, the run in tmp_path by default) exits 2 with one
    line holding every needle, and every file under tmp_path is byte-identical afterwards."""
    out = tmp_path / "run" if out is None else out
    before = _snapshot(tmp_path)
    code = train_main([str(a) for a in argv] + ["--overwrite", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("advfast-train: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and len(err) < 700, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert _snapshot(tmp_path) == before
    return err


# ---- numbers: non-finite, too large for their type, out of range ---------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "1e30"], "epochs is too large for an integer setting"),
    (["--epochs", "2000000"], "epochs must be a positive integer (at most 1000000)"),
    (["--seed", "99999999999999999999999"], "seed is too large for an integer setting"),
    (["--seed", "-1"], "seed must be a non-negative integer"),
    (["--batch-size", "1e20"], "batch_size is too large"),
    (["--set", "max_steps=" + "9" * 40], "max_steps is too large"),
    (["--set", "optim.lr=nan"], "optim.lr must be positive, got nan"),
    (["--set", "optim.lr=1e400"], "optim.lr must be positive, got inf"),
    (["--set", "optim.lr=" + "1" * 400], "optim.lr is too large for a number setting"),
    (["--set", "temperature=-inf"], "temperature must be positive"),
    (["--set", "optim.warmup_epochs=inf"], "optim.warmup_epochs must be non-negative"),
    (["--set", "method.ce_weight=nan", "--method", "advcl"], "method.ce_weight must be a finite number, got nan"),
    (["--set", "method.hfc_radius=-1", "--method", "advcl"], "method.hfc_radius must be >= 0"),
    (["--set", "method.kmeans_seed=" + "9" * 30, "--method", "advcl"], "method.kmeans_seed is too large"),
    (["--set", "method.leverage=2", "--method", "amoc"], "method.leverage must be in [0, 1]"),  # found while building
    (["--set", "method.head_hidden=0"], "method.head_hidden must be a positive integer (at most 65536), got 0"),
    (["--set", "method.queue_size=" + str(10**12), "--method", "moco"], "method.queue_size must be a positive integer"),
    (["--set", "attack.steps=1.5"], "attack.steps must be an integer, got 1.5"),
    (["--set", "device=cuda:123456"], "device must be auto, cpu, cuda or cuda:N"),
    (["--set", "image_size=512"], "digits: size must be an int in [4, 256] (the images are 8x8)"),  # ~2 GB of 8x8 digits
])
def test_bad_numbers(run_copy, tmp_path, capsys, argv, needle):
    method = argv[argv.index("--method") + 1] if "--method" in argv else "acl"
    argv = [a for a in argv if a not in ("--method", method)]
    _refused(capsys, tmp_path, ["--method", method, *tiny(method), *argv], needle)


# ---- backend names: checked up front, never at step 1, never a silent fallback --------------------

@pytest.mark.parametrize("method,setting,needles", [
    ("acl", "method.loss_backend=trition", ["method.loss_backend must be one of auto, triton",
                                           "(did you mean 'triton'?)"]),
    ("moco", "method.ema_backend=cudaa", ["method.ema_backend must be one of auto, cuda", "did you mean 'cuda'"]),
    ("amoc", "method.loss_backend=fast", ["method.loss_backend must be one of"]),
    ("advcl", "method.kmeans_backend=faiss", ["method.kmeans_backend must be one of torch, sklearn"]),
    ("acl", "augment_backend=dalli", ["augment_backend must be one of auto, torch, dali, torchvision"]),
    ("acl", "precision=fp8", ["precision must be one of"]),
])
def test_unknown_backend_names(run_copy, tmp_path, capsys, method, setting, needles):
    _refused(capsys, tmp_path, ["--method", method, *tiny(method), "--set", setting], *needles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CUDA-only backend asked for on a CPU-only machine")
def test_a_backend_that_cannot_run_here(run_copy, tmp_path, capsys):
    _refused(capsys, tmp_path, ["--method", "moco", *tiny("moco"), "--set", "method.ema_backend=cuda"],
             "method.ema_backend=cuda cannot run on cpu here", "use auto")


def test_unknown_compile_backend(run_copy, tmp_path, capsys):
    _refused(capsys, tmp_path, ["--method", "acl", *TINY, "--set", "compile=true", "--set", "compile_backend=inductr"],
             "compile_backend 'inductr' is not a torch.compile backend", "(did you mean 'inductor'?)")


# ---- YAML: bombs, size, nesting, encodings, odd keys, 1.1 booleans --------------------------------

def _bomb(levels=9):
    lines = ["method: acl", "method_options:", "  a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("content,needles", [
    (_bomb(), ["expands to more than 100000 values"]),  # 10**9 strings if expanded
    ("method: acl\nmethod_options:\n  x: &a [*a]\n", ["nested deeper than 32 levels"]),
    ("method: acl\nmethod_options:\n  x: " + "[" * 5000 + "]" * 5000 + "\n", ["nested deeper than 32 levels"]),
    ("method: acl\n# " + "x" * 70_000 + "\n", ["is larger than 64 KiB"]),
    ("base: &b {epochs: 2}\n<<: *b\nmethod: acl\n", ["merge key (<<)"]),
    ("method: acl\n1: 2\n", ["has a key 1 that is not a name"]),
    ("method: [acl]\n", ["method must be a name such as acl, got ['acl']"]),
    ("method: acl\nepochs: [" + ", ".join(["1"] * 5000) + "]\n",
     ["epochs must be an integer, got [1, 1, 1, 1, 1, 1, ...]"]),
    ("method: acl\nattack:\n  kind: " + "p" * 20000 + "\n", ["attack.kind must be one of pgd, fgsm, none, got 'ppp"]),
    ("method: acl\nseed: 2024-01-01\n", ["seed must be an integer, got datetime.date(2024, 1, 1)"]),
    ("method: acl\nepochs: 3\nepochs: [\n", ["is not valid YAML"]),
])
def test_malicious_yaml(run_copy, tmp_path, capsys, content, needles):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    err = _refused(capsys, tmp_path, ["--config", cfg, *TINY], *needles)
    assert len(err) < 400  # huge values are cut, never repr()'d whole


def test_alias_bomb_through_the_real_entry_point(tmp_path):
    """The in-process cases above stand for the console script; here is one through it, for the bomb."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(_bomb())
    r = subprocess.run([sys.executable, "-m", "advfast.train", "--config", str(cfg), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"--config {cfg} expands to more than 100000 values" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_alias_bomb_in_a_set_value(run_copy, tmp_path, capsys):
    value = "[" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + ["*a"] * 12000) + "]"
    _refused(capsys, tmp_path, ["--method", "acl", *TINY, "--set", f"method.x={value}"], "--set 'method.x'",
             "expands to more than 100000 values")


def test_set_value_not_utf8(run_copy, tmp_path, capsys):
    """A command line in another encoding reaches Python as lone surrogates (here: byte 0xff)."""
    _refused(capsys, tmp_path, ["--method", "acl", *TINY, "--set", "epochs=\udcff"],
             "--set 'epochs' is not UTF-8 text", "write it in UTF-8")


def test_config_file_not_utf8_or_not_a_file(run_copy, tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("method: acl\n# caf\u00e9\n".encode("latin-1"))
    _refused(capsys, tmp_path, ["--config", cfg, *TINY], f"--config {cfg} is not UTF-8 text", "save it as UTF-8")
    _refused(capsys, tmp_path, ["--config", tmp_path, *TINY], f"--config {tmp_path} is a folder")


def test_yaml_booleans_for_string_options_mean_the_words(tmp_path):
    from advfast.cli import _parser, build_train_config

    for text, want in (("channels_last: off\n", "off"), ("channels_last: on\n", "on"),
                       ("channels_last: false\n", "off"), ("channels_last: true\n", "on")):
        cfg_file = tmp_path / "c.yaml"
        cfg_file.write_text("method: acl\ndownload: yes\nprogress: off\n" + text)
        cfg = build_train_config(_parser().parse_args(["--config", str(cfg_file), "--out", str(tmp_path / "r")]))
        assert cfg.channels_last == want, text
        assert cfg.download is True and cfg.progress is False  # yes/off still read as booleans for bool options
    args = _parser().parse_args(["--method", "acl", "--set", "channels_last=off", "--out", str(tmp_path / "r")])
    assert build_train_config(args).channels_last == "off"


# ---- paths: odd or impossible output and data paths -------------------------------------------------

def test_odd_output_paths(run_copy, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    argv = ["--method", "acl", *TINY]
    _refused(capsys, tmp_path, argv, "--out must not contain control characters", out=f"{tmp_path}/bad\0name")
    _refused(capsys, tmp_path, argv, "--out must not contain control characters", out=f"{tmp_path}/two\nlines")
    _refused(capsys, tmp_path, argv, "--out has a name of 300 bytes", "file systems allow 255",
             out=tmp_path / ("x" * 300))
    _refused(capsys, tmp_path, argv, "paths are limited to 4095", out=tmp_path / "/".join(["d" * 200] * 25))
    _refused(capsys, tmp_path, argv, f"output path {blocker} is a file", out=blocker)
    _refused(capsys, tmp_path, argv, "is not writable", f"({blocker} is a file, not a directory)",
             out=blocker / "deeper" / "run")
    _refused(capsys, tmp_path, [*argv, "--data-dir", "data\0x"], "data_dir (--data-dir) must not contain control")
    _refused(capsys, tmp_path, [*argv, "--config", "c\0.yaml"], "--config must not contain control characters")


def test_long_bogus_arguments_are_cut(tmp_path, capsys):
    err = _refused(capsys, tmp_path, ["--method", "acl", "--" + "z" * 100_000])
    assert err.rstrip().endswith("...")


# ---- data: labels out of range, images below the minimum size -------------------------------------

def _cifar10(root: Path, bad_label: int | None = None):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = list(g.integers(0, 10, 8))
        if bad_label is not None and i == 2:
            labels[3] = bad_label
        batch = {"data": g.integers(0, 256, (8, 3072), dtype=np.uint8), "labels": labels}
        (base / name).write_bytes(pickle.dumps(batch))
    return base


@pytest.mark.parametrize("bad", [10, -1])
def test_cifar_labels_out_of_range(run_copy, tmp_path, capsys, bad):
    base = _cifar10(tmp_path / "data", bad_label=bad)
    _refused(capsys, tmp_path, ["--method", "simclr", "--dataset", "cifar10", "--data-dir", tmp_path / "data",
                                "--no-progress", "--batch-size", "8"],
             f"{base / 'data_batch_3'} has label {bad} at index 3, outside 0..9")


def test_image_folder_of_images_below_the_minimum_size(run_copy, tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((2, 3, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.png")
    argv = ["--method", "simclr", "--dataset", "imagefolder", "--data-dir", root, "--no-progress", "--batch-size", "4"]
    _refused(capsys, tmp_path, [*argv, "--set", "image_size=null"], "cat/0.png is 3x2",
             "between 4 and 1024 pixels a side", "--image-size")
    _refused(capsys, tmp_path, [*argv, "--image-size", "2"], "image_size must be between 4 and 1024 pixels")


# ---- AdvCL's pseudo labels: a file the user names is read, never written --------------------------

ADVCL = ["--method", "advcl", *TINY, "--set", "method.cluster_ks=2,10"]


def _official_pickle(path: Path, n=DIGITS_TRAIN, top=None):
    g = np.random.default_rng(0)
    arrays = {f"pseudo_train_{k}": g.integers(0, k if top is None else top, n).astype(np.int64) for k in (2, 10)}
    path.write_bytes(pickle.dumps(arrays, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    return arrays


def test_a_named_labels_file_is_read_and_never_written(tmp_path, capsys):
    """The digits preset generates labels (pseudo_labels_from=raw_pixels); a file given on top is only read."""
    labels = tmp_path / "labels.pkl"
    arrays = _official_pickle(labels)
    before = labels.read_bytes()
    out = tmp_path / "advcl"
    assert train_main([*ADVCL, "--set", f"method.pseudo_labels={labels}", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert labels.read_bytes() == before
    from safetensors.torch import load_file

    ckpt = sorted((out / "checkpoints").glob("*.safetensors"))[-1]
    state = load_file(str(ckpt))
    saved = next(v for k, v in state.items() if k.endswith("pseudo_10"))
    assert torch.equal(saved, torch.from_numpy(arrays["pseudo_train_10"]))  # the file's labels were used


def test_a_labels_path_that_is_no_regular_file(run_copy, tmp_path, capsys):
    _refused(capsys, tmp_path, [*ADVCL, "--set", "method.pseudo_labels=/dev/null"],
             "method.pseudo_labels '/dev/null' is not a regular file")
    _refused(capsys, tmp_path, [*ADVCL, "--set", f"method.pseudo_labels={tmp_path}"], "is a folder, not a file")


@pytest.mark.parametrize("name,content,needle", [
    ("notes.txt", b"my notes, not labels\n", "is not a safetensors file of labels"),  # refused, not replaced
    ("labels.pkl", b"\x80\x03}q\x00(X", "is not the official pickle of numpy arrays"),  # truncated
    ("notes.txt", None, "does not exist"),
])
def test_a_wrong_labels_file_is_refused_untouched(run_copy, tmp_path, capsys, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    argv = [*ADVCL, "--set", f"method.pseudo_labels={path}"]
    if content is None:
        _refused(capsys, tmp_path, argv, f"method.pseudo_labels '{path}' does not exist")
        assert not path.exists()
    else:
        _refused(capsys, tmp_path, argv, f"pseudo-label file '{path}' {needle}")


def test_labels_out_of_range_in_a_labels_file(run_copy, tmp_path, capsys):
    labels = tmp_path / "labels.pkl"
    _official_pickle(labels, top=11)  # pseudo_train_2 holds values up to 10
    _refused(capsys, tmp_path, [*ADVCL, "--set", f"method.pseudo_labels={labels}"], "has labels outside [0, 2)")


def test_labels_paths_too_long_or_odd(run_copy, tmp_path, capsys):
    _refused(capsys, tmp_path, [*ADVCL, "--set", "method.pseudo_labels=" + "l" * 300 + ".pkl"],
             "method.pseudo_labels has a name of 304 bytes")
    _refused(capsys, tmp_path, [*ADVCL, "--set", "method.pseudo_labels_from=run\0x"],
             "method.pseudo_labels_from must not contain control characters")


def test_labels_source_run_without_an_encoder(run_copy, tmp_path, capsys):
    _refused(capsys, tmp_path, [*ADVCL, "--set", f"method.pseudo_labels_from={tmp_path / 'nowhere'}"],
             "method.pseudo_labels_from: encoder", "does not exist")


def test_generator_never_overwrites_a_file_it_did_not_write(tmp_path):
    from types import SimpleNamespace

    from advfast import pseudo_labels as pl
    from advfast.pseudo_labels.cli import main as generate

    ds = SimpleNamespace(images=torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8),
                         labels=torch.zeros(30, dtype=torch.int64), name="fake")
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    with pytest.raises(ValueError, match="is not an advfast pseudo-label file"):
        pl.build_pseudo_labels(ds, notes, source="raw_pixels", ks=[2], device="cpu", log=lambda m: None)
    assert notes.read_text() == "precious" and not (tmp_path / "notes.json").exists()
    assert generate(["--raw-pixels", "--dataset", "synthetic", "--image-size", "4", "--ks", "2",
                    "--out", str(notes)]) == 2
    assert notes.read_text() == "precious"
    for bad in (["--seed", str(10**30)], ["--max-iter", "0"], ["--kmeans", "faiss"]):  # one line, exit 2
        with pytest.raises(SystemExit) as exit_info:
            generate(["--raw-pixels", "--dataset", "synthetic", "--ks", "2", "--out", str(tmp_path / "l.st"), *bad])
        assert exit_info.value.code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# ---- --resume --allow-change, --help, --list -------------------------------------------------------

def test_allow_change_keys_are_checked(run_copy, tmp_path, capsys):
    out = run_copy

    def refused(argv, *needles):
        before = _snapshot(tmp_path)
        assert train_main([*argv, "--no-progress", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and all(n in err for n in needles), err
        assert _snapshot(tmp_path) == before

    refused(["--method", "acl", "--allow-change", "optim.lr"], "--allow-change is for --resume")
    refused(["--resume", "--allow-change", "optim.lrr"], "--allow-change 'optim.lrr' is not a setting",
            "(did you mean 'optim.lr'?)")
    refused(["--resume", "--allow-change", "arch"], "the arch of a run never changes")
    refused(["--resume", "--allow-change", "max_steps"], "--allow-change max_steps is not needed")
    refused(["--resume", "--set", "optim.lr=0.01"], "optim.lr cannot change", "--allow-change KEY")
    refused(["--resume", "--allow-change", "optim.lr", "--set", "optim.lr=nan"], "optim.lr must be positive, got nan")


def test_allow_change_lets_a_resume_lower_the_lr(run_copy, capsys):
    code = train_main(["--resume", "--allow-change", "optim.lr", "--set", "optim.lr=0.01", "--set", "max_steps=2",
                       "--no-progress", "--out", str(run_copy)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run_copy / "run.json").read_text())["config"]["optim"]["lr"] == 0.01


def test_help_shows_out_as_required_and_list_has_no_default_out(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: advfast-train --method METHOD --out DIR [options]\n")
    assert "[--out" not in text
    assert "required" in " ".join(text.split()).split("--out DIR run directory", 1)[1][:100]
    assert "--allow-change KEY" in text
    assert train_main(["--list"]) == 0
    assert "out=" not in capsys.readouterr().out
