"""Imports only go down (docs/ARCHITECTURE.md, "Layers").

Every module of advfast (and kernels/, installed as advfast.kernels) is parsed with ``ast``; every
import statement counts wherever it sits (module level, inside a function, under ``if``/``try``), and
so do ``importlib.import_module("advfast...")`` / ``__import__("advfast...")`` with a literal name,
so a lazy import cannot hide an upward edge. Nothing is imported: the test reads source only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the ground floor and the floors above it, by top-level name under advfast (a package or a module)
LOWER = ("_ext", "io", "ops", "kernels", "models", "data", "attacks", "losses", "optim", "dist", "pseudo_labels")
UPPER = ("methods", "engine", "eval", "bench", "interop", "cli", "train")
FORBIDDEN = {**{low: set(UPPER) for low in LOWER}, "methods": set(UPPER) - {"methods"}}


def source_files() -> dict[str, Path]:
    """Dotted module name -> source file, for advfast/ and kernels/ (advfast.kernels)."""
    files = {}
    for top, prefix in ((ROOT / "advfast", "advfast"), (ROOT / "kernels", "advfast.kernels")):
        for path in sorted(top.rglob("*.py")):
            parts = path.relative_to(top).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((prefix, *parts))] = path
    return files


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted name) of every advfast module ``source`` imports anywhere, relative imports
    resolved against ``module``; ``from X import y`` yields both X and X.y (y may be a submodule)."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__"):
                names = [node.args[0].value]
        found += [(node.lineno, n) for n in names if n == "advfast" or n.startswith("advfast.")]
    return found


def layer_of(dotted: str) -> str | None:
    """The top-level name under advfast (``advfast.engine.trainer`` -> ``engine``); None for advfast itself."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(files: dict[str, Path]) -> list[str]:
    """One line per offending import statement: where, and which floor it reaches up to."""
    bad = {}
    for module, path in files.items():
        floor = layer_of(module)
        forbidden = FORBIDDEN.get(floor, set())
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            if layer_of(target) in forbidden:
                bad.setdefault((str(path.relative_to(ROOT)), line), f"{floor} imports {target} "
                                                                     f"({layer_of(target)} is above {floor})")
    return [f"{where}:{line}: {what}" for (where, line), what in sorted(bad.items())]


def test_imports_only_go_down():
    files = source_files()
    assert len(files) > 80 and "advfast.kernels" in files and "advfast.dist" in files  # the scan sees it all
    bad = upward_imports(files)
    assert not bad, "a lower package imports a higher one:\n" + "\n".join(bad)


def test_every_top_level_name_has_a_floor():
    """A new package or module under advfast/ must be placed in LOWER or UPPER (or be config, the
    shared settings module), so the rules above cover it."""
    tops = {layer_of(m) for m in source_files()} - {None}
    assert tops - set(LOWER) - set(UPPER) <= {"config"}, sorted(tops - set(LOWER) - set(UPPER) - {"config"})


@pytest.mark.parametrize("snippet", [
    "from advfast.engine.trainer import Trainer",
    "import advfast.eval.run",
    "from advfast import methods",
    "def f():\n    if True:\n        from advfast.bench import harness\n",
    "try:\n    from ..engine import export\nexcept ImportError:\n    pass\n",
    "import importlib\nm = importlib.import_module('advfast.cli')\n",
    "class A:\n    def g(self):\n        from advfast.interop.load import load\n",
])
def test_a_lazy_or_relative_upward_import_is_caught(snippet):
    """The checker itself: each way of writing a forbidden import in a models module is reported."""
    found = [layer_of(t) for _, t in imported_modules(snippet, "advfast.models.sneaky")]
    assert set(found) & FORBIDDEN["models"], found


def test_downward_and_sideways_imports_pass():
    ok = ("from advfast.ops import info_nce\nfrom advfast.models.encoder import Encoder\n"
          "from . import heads\nfrom advfast.dist import all_gather\n")
    assert not {layer_of(t) for _, t in imported_modules(ok, "advfast.models.sneaky")} & FORBIDDEN["models"]


def test_augmentation_backends_do_not_import_the_factory_that_imports_them():
    """augment.py's build_augment imports the backends; they take the interface from augment_base.py, so
    no import circle runs through the data package (issue 15: the backends once imported back from it)."""
    files = source_files()
    for backend in ("advfast.data.torchvision_backend", "advfast.data.dali_backend", "advfast.data.loader"):
        targets = {t for _, t in imported_modules(files[backend].read_text(), backend)}
        assert "advfast.data.augment" not in targets, f"{backend} imports advfast.data.augment"
