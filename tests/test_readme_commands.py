"""README.md's commands (the blocks marked readme-command) are what .ci/run and
scripts/newcomer_check.sh run, and they are the commands a new user needs: one build that brings the
test tools, a first run, the evaluation, plain `pytest`.
"""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11 (tomllib)")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "readme_commands.py"

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="not run from a source checkout")


@pytest.fixture(scope="module")
def commands():
    spec = importlib.util.spec_from_file_location("advfast_readme_commands", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = module.readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    return {kind: [c for k, c in found if k == kind] for kind in module.KINDS}, module


def test_readme_has_two_setup_lines_one_build_with_the_test_extra(commands):
    by_kind, _ = commands
    setup = by_kind["setup"]
    assert len(setup) == 2
    builds = [c for c in setup if "--no-build-isolation" in c]
    assert len(builds) == 1 and '".[test]"' in builds[0]  # one build of the extension, test tools included
    # --no-build-isolation builds against what is already installed: the first line brings it all
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for req in build_requires:
        name = re.split(r"[<>=!~ ]", req)[0]
        assert name in setup[0], f"README's first line does not install {name}, which the build needs"
    assert "advfast-train" in builds[0]
    assert by_kind["test"] == ["pytest"]
    assert len(by_kind["evaluate"]) == 1 and by_kind["evaluate"][0].startswith("advfast-eval ")


def test_readme_commands_use_only_declared_entry_points_and_dependencies(commands):
    by_kind, _ = commands
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    scripts = set(meta["scripts"])
    for cmd in by_kind["setup"][1:] + by_kind["evaluate"]:
        for tool in re.findall(r"\b(advfast-[a-z]+)\b", cmd):
            assert tool in scripts
    deps = " ".join(meta["dependencies"] + meta["optional-dependencies"]["test"])
    for needed in ("matplotlib", "pytest"):  # the evaluation's plots, the test line
        assert needed in deps


def test_ci_runs_readme_commands_and_sets_no_cuda_home():
    ci = (ROOT / ".ci" / "run").read_text()
    calls = re.findall(r"^readme (\w+)$", ci, re.MULTILINE)
    assert calls == ["setup", "evaluate", "test"]
    assert "scripts/readme_commands.py" in ci
    assert not re.search(r"^\s*export CUDA_HOME", ci, re.MULTILINE) and "unset CUDA_HOME" in ci
    assert "CI=true" in ci
    # advfast is built only by README's own line, never by a CI-only command
    assert not re.search(r"pip install[^\n]*(\s\.|\"\.\[)", ci.split("readme setup")[1])
    # every CI-only install comes with a comment saying why a user does not need it
    lines = ci.splitlines()
    for i, line in enumerate(lines):
        if "pip install" in line:
            assert lines[i - 1].lstrip().startswith("#"), f"uncommented CI-only install: {line}"


def test_newcomer_check_runs_the_parsed_commands():
    script = (ROOT / "scripts" / "newcomer_check.sh").read_text()
    assert "scripts/readme_commands.py" in script and "git clone" in script and "-m venv" in script


def test_command_line_and_its_errors():
    out = subprocess.run([sys.executable, str(SCRIPT), "test"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "pytest\n"
    bad = subprocess.run([sys.executable, str(SCRIPT), "deploy"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown kind 'deploy'" in bad.stderr


def test_a_tag_without_a_code_block_is_an_error(commands):
    _, module = commands
    with pytest.raises(ValueError, match="right above"):
        module.readme_commands("<!-- readme-command: test -->\npytest\n")
    assert module.readme_commands("<!-- readme-command: test -->\n```\npytest -q\n\n```\n") == [
        ("test", "pytest -q")]
