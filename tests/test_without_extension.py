"""The package without advfast._C (ADVFAST_BUILD_EXT=0): one debug line at import, no warnings, and the
triton and torch backends still work while cpp/cuda say what is missing."""

import subprocess
import sys
import textwrap


def test_missing_extension_is_reported_once_at_debug_level_and_torch_still_works():
    script = textwrap.dedent("""
        import logging, sys, warnings
        sys.modules["advfast._C"] = None          # as if built with ADVFAST_BUILD_EXT=0
        logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
        warnings.simplefilter("error")
        import torch
        import advfast.ops as ops
        ops.available_backends("cpu"); ops.available_backends("cpu")
        x = torch.rand(3, 2, 4, 4); g = torch.randn_like(x)
        y = ops.pgd_step(x, x, g, 0.1, 0.05)
        assert (y - x).abs().max() <= 0.1 + 1e-6
        try:
            ops.pgd_step(x, x, g, 0.1, 0.05, backend="cpp")
        except RuntimeError as exc:
            print("CPP:", exc)
        print("backends:", ops.available_backends("cpu"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DEBUG advfast ")]
    assert len(lines) == 1 and "advfast._C is not available" in lines[0]
    assert not any(line.startswith(("WARNING", "ERROR")) for line in proc.stdout.splitlines())
    assert "CPP:" in proc.stdout and "advfast._C" in proc.stdout.split("CPP:")[1]
    backends = proc.stdout.split("backends:")[1]
    assert "'torch'" in backends and "'cpp'" not in backends and "'cuda'" not in backends
