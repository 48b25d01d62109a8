"""advfast-train: --list, an end-to-end digits run in a subprocess, resume, and one-line errors (exit 2)."""

import json
import os
import subprocess
import sys

import pytest

from advfast.cli import parse_set, train_main
from advfast.methods import METHODS

FAST = ["--dataset", "digits", "--no-progress", "--set", "image_size=8", "--set", "batch_size=64",
        "--set", "method.head_hidden=16", "--set", "attack.steps=1", "--set", "log_every=1"]


def run_cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "advfast.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_list_prints_methods_variants_and_presets(capsys):
    assert train_main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert f"\n{name}\n" in out
    assert "a2a, a2s, ds (default)" in out
    assert "optim.name=lars" in out and "attack.eps=8/255" in out
    assert "preset [ds, cifar10, cifar100, stl10]:" in out


def test_list_shows_the_newer_methods_and_the_options_that_select_presets(capsys):
    assert train_main(["--list"]) == 0
    out = capsys.readouterr().out
    blocks = {b.split("\n", 1)[0]: b for b in out.split("\n\n")}
    assert "dynacl (default), dynacl++" in blocks["dynacl"] and "method.post_process=none" in blocks["dynacl"]
    for method in ("acl", "dynacl"):  # AIR's own presets and the RCS engine option
        assert "method.air=False" in blocks[method] and "preset [" in blocks[method]
        assert "method.air=True, digits]" in blocks[method]
        assert "engine options: coreset=rcs" in blocks[method]
    for method in ("advcl", "rocl"):
        for form in ("ip", "hn", "iphn"):
            assert f"preset [method.asymmetric={form}, cifar10, cifar100, stl10]" in blocks[method]
        assert "coreset" not in blocks[method]
    assert "method.teacher=None" in blocks["deacl"] and "method.train_teacher=False" in blocks["deacl"]
    assert "digits: rcs.warmup_epochs=3 rcs.interval=3" in out and "coreset=none" in out


def test_digits_run_end_to_end_in_a_subprocess(tmp_path, capsys):
    out = tmp_path / "acl"
    r = run_cli("--method", "acl", *FAST, "--set", "max_steps=2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "2/" in r.stdout and "encoder.safetensors" in r.stdout
    for name in ("run.json", "metrics.jsonl", "metrics.csv", "encoder.safetensors", "encoder.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "encoder.json").read_text())["bn_branch"] == "pgd"
    # resume may extend max_steps (where and how long, not what); changing the recipe is refused
    assert train_main(["--resume", "--set", "max_steps=3", "--no-progress", "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert train_main(["--resume", "--set", "attack.eps=4/255", "--out", str(out)]) == 2
    assert "cannot change" in capsys.readouterr().err
    assert train_main(["--method", "acl", *FAST, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bad_input_in_a_subprocess_is_one_line_without_traceback(tmp_path):
    r = run_cli("--method", "acll", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert r.stderr.strip() == "advfast-train: error: unknown method 'acll' (did you mean 'acl'?); choose from " + \
        ", ".join(sorted(METHODS))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,match", [
    (["--method", "acl", "--variant", "dss"], "unknown variant 'dss' for method 'acl' (did you mean 'ds'?)"),
    (["--method", "acl", "--dataset", "digit"], "unknown dataset 'digit' (did you mean 'digits'?)"),
    (["--method", "acl", "--arch", "resnet19"], "unknown arch 'resnet19' (did you mean 'resnet18'?)"),
    (["--method", "acl", "--set", "attack.eps=-8/255"], "attack.eps must be in [0, 1]"),
    (["--method", "acl", "--set", "attack.epz=0.1"], "unknown config.attack key 'epz' (did you mean 'eps'?)"),
    (["--method", "acl", "--set", "method.dual_b=true"], "unknown option method.dual_b for 'acl' (did you mean 'dual_bn'?)"),
    (["--method", "acl", "--batch-size", "4096"], "batch_size 4096 is larger than the dataset"),
    (["--method", "acl", "--epochs", "many"], "epochs must be an integer"),
    (["--method", "acl", "--device", "cuda:7"], "cuda"),
    (["--method", "acl", "--set", "eps"], "--set takes KEY=VALUE"),
    (["--method", "acl", "--bogus"], "unrecognized arguments: --bogus"),
    (["--variant", "ds"], "--method is required"),
    (["--method", "acl", "--resume"], "nothing to resume"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, match):
    code = train_main([*argv, "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("advfast-train: error: ") and err.count("\n") == 1, err
    assert match in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_missing_out_and_config_file_errors(tmp_path, capsys):
    assert train_main(["--method", "acl"]) == 2
    assert "--out DIR is required" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: acl\nattack:\n  epss: 0.1\n")
    assert train_main(["--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config.attack key 'epss' (did you mean 'eps'?)" in capsys.readouterr().err
    assert train_main(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_config_file_and_set_layering(tmp_path):
    from advfast.cli import _parser, build_train_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("method: acl\nvariant: a2s\nepochs: 7\nattack:\n  eps: 4/255\n  steps: 3\n")
    args = _parser().parse_args(["--config", str(cfg_file), "--epochs", "9", "--set", "attack.steps=2",
                                 "--out", str(tmp_path / "r")])
    cfg = build_train_config(args)
    assert (cfg.method, cfg.variant, cfg.dataset) == ("acl", "a2s", "digits")
    assert cfg.epochs == 9 and cfg.attack.steps == 2 and cfg.attack.eps == pytest.approx(4 / 255)
    assert cfg.arch == "convnet"  # from the digits preset, under the file


def test_parse_set():
    assert parse_set(["attack.eps=8/255", "method.queue_size=4096", "compile=true", "variant=null"]) == \
        {"attack": {"eps": "8/255"}, "method_options": {"queue_size": 4096}, "compile": True, "variant": None}
