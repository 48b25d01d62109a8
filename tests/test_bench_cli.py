"""advfast-bench end to end at tiny sizes on the CPU: table, JSON, and one-line errors with status 2."""

import datetime
import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch

from advfast.bench.cli import main
from advfast.bench.harness import EPOCH_IMAGES

FAST_ARGS = ["--device", "cpu", "--size", "tiny", "--steps", "1", "--repeats", "2", "--warmup", "0"]


def test_console_script_is_registered():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("advfast-bench") == "advfast.bench.cli:main"


def test_two_methods_two_configs_table_and_json(tmp_path, capsys):
    path = tmp_path / "out" / "bench.json"
    assert main(["--methods", "simclr,acl", "--configs", "eager,fast", "--json", str(path), *FAST_ARGS]) == 0
    doc = json.loads(path.read_text())
    env = doc["environment"]
    assert env["device"].startswith("CPU") and env["device_type"] == "cpu"
    assert env["torch"] == torch.__version__ and "cuda" in env
    assert datetime.datetime.fromisoformat(env["date"]).tzinfo is not None
    assert doc["matmul_peak"]["flops_per_s"] > 0 and doc["matmul_peak"]["dtype"] == "float32"

    rows = doc["rows"]
    assert [(r["method"], r["config"]) for r in rows] == [("simclr", "eager"), ("simclr", "fast"),
                                                          ("acl", "eager"), ("acl", "fast")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["batch_size"] == 32 and r["arch"] == "convnet"
        assert r["s_per_epoch"] == pytest.approx(EPOCH_IMAGES / r["images_per_s"])
        assert r["step_s"]["n"] == 2 and r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
        assert r["peak_mem_bytes"] is None  # not measured on a CPU
        assert 0 < r["mfu"] < 1 and r["flops_per_iter"] > 0
        assert r["final_loss"] == r["final_loss"]  # finite training
        eager = r["config"] == "eager"
        assert r["precision"] == ("fp32" if eager else "bf16")
        assert r["switches"]["input_grads"] is (not eager) and r["switches"]["compile"] is False  # CPU: no compile
        assert r["workers"] == (1 if eager else None)
    assert rows[0]["speedup_vs_eager"] == 1.0 and rows[1]["speedup_vs_eager"] > 0
    acl = rows[2]
    assert acl["attack"] == "pgd-2" and acl["expected_passes"] == 4 * 2 + 12

    out = capsys.readouterr().out
    assert "| method | config |" in out and out.count("| simclr |") == 2 and out.count("| acl |") == 2


@pytest.mark.parametrize("argv, message", [
    (["--methods", "acll"], "unknown method 'acll'"),
    (["--configs", "eager,fastest"], "unknown config 'fastest'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--device", "tpu"], "--device must be"),
    (["--size", "huge"], "--size must be"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("advfast-bench: error:")


def test_bad_input_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "advfast.bench.cli", "--configs", "ablation,nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "unknown config 'nope'" in proc.stderr
