"""tests/conftest.py under CI=true: a test that skips for want of something .ci/run installs fails;
other skips (no GPU) stay skips; without CI both stay skips."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

SAMPLE = '''
import pytest

@pytest.mark.skipif(True, reason="cmake is not installed (pip install cmake)")
def test_needs_cmake():
    pass

def test_needs_torchattacks():
    pytest.importorskip("advfast_no_such_module_torchattacks")

@pytest.mark.skipif(True, reason="needs a CUDA GPU; none is present on this machine")
def test_needs_gpu():
    pass
'''


def _run(tmp_path, ci):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-c", os.devnull,
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    return proc.stdout


def test_ci_turns_missing_ci_packages_into_failures(tmp_path):
    out = _run(tmp_path, ci=True)
    assert "test_needs_cmake - CI=true and this test skipped" in out
    assert "test_needs_torchattacks - CI=true and this test skipped" in out
    assert "SKIPPED" in out and "needs a CUDA GPU" in out  # a GPU skip stays a skip


def test_without_ci_they_stay_skips(tmp_path):
    out = _run(tmp_path, ci=False)
    assert "3 skipped" in out and "failed" not in out and "error" not in out.lower().replace("errors", "")
