"""Shared test setup.

Without a GPU, Triton kernels are tested through the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, ahead of every test module.

In CI (`CI=true`, as .ci/run sets it) a test that skips because something .ci/run installs is
missing (cmake, torchattacks, DALI, matplotlib, advfast._C or its CUDA build) fails instead: a skip
there would mean CI silently stopped covering it.
"""

import os
import sys

import pytest

INSTALL = ('pip install torch torchvision ninja setuptools wheel && '
           'pip install --no-build-isolation ".[test]"  (README.md, from the clone)')

try:
    import torch
except ImportError:
    torch = None  # pytest_configure below stops the run with one line


def pytest_configure(config):
    if torch is None:
        pytest.exit(f"advfast's tests need torch, which this Python ({sys.executable}) does not have; "
                    f"install it and advfast with: {INSTALL}", returncode=4)


_HAS_CUDA = torch is not None and torch.cuda.is_available()
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

# Skip reasons (substrings) that in CI mean "CI's set-up is broken", with what .ci/run provides.
CI_PROVIDES = {
    "cmake is not installed": "cmake (PyPI) for the CMake build test",
    "ninja is not installed": "ninja (README's install line)",
    "torchattacks": "torchattacks (--no-deps) for AutoAttack",
    "NVIDIA DALI is not importable": "nvidia-dali-cuda130 for the DALI augmentation tests",
    "matplotlib": "matplotlib (a core dependency) for the evaluation plots",
    "advfast._C is not built": "advfast._C (built by README's install line)",
    "built without its CUDA kernels": "the CUDA build of advfast._C (CUDA toolkit at /usr/local/cuda)",
    "cuobjdump (CUDA toolkit or Triton) not found": "cuobjdump (Triton's, installed with torch)",
}

# Subprocesses the tests start (python -c / -m) must import the installed advfast, as the tests do
# (--import-mode=importlib), not the source folder that shadows it from the checkout's root: that folder
# has neither the compiled advfast._C nor advfast.kernels (kernels/ is mapped in at install time).
os.environ["PYTHONSAFEPATH"] = "1"

if torch is not None and not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU tests use small tensors, where two OpenMP threads cost more in hand-offs than they gain,
    # and on a busy machine (several test processes, or training next to the suite) they run several
    # times slower than one. One thread for the whole CPU suite.
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report names its seed, so ``ADVFAST_TEST_SEED=<seed> pytest <test>`` replays it.
    In CI, a skip for want of something CI installs becomes a failure (see the module docstring)."""
    report = yield
    if IN_CI and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        needed = [what for key, what in CI_PROVIDES.items() if key in reason]
        if needed:
            report.outcome = "failed"
            report.longrepr = (f"CI=true and this test skipped ({reason}); .ci/run provides "
                               f"{needed[0]}, so CI's set-up is broken")
    if report.failed:
        seed = dict(item.user_properties).get("seed")
        if seed is not None:
            report.sections.append(("seed", f"ADVFAST_TEST_SEED={seed}"))
    return report


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Every test gets fresh random inputs, reproducible from the seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("ADVFAST_TEST_SEED") is None \
        else int(os.environ["ADVFAST_TEST_SEED"])
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.fixture
def train_a_few_steps():
    """``run(method, make_batch, steps=2)``: SGD steps of a method's full recipe (training step,
    backward, optimiser step, after_optimizer_step), asserting every loss and metric is finite."""

    def run(method, make_batch, steps: int = 2, lr: float = 0.05):
        opt = torch.optim.SGD(method.trainable_parameters(), lr=lr, momentum=0.9)
        for _ in range(steps):
            loss, metrics = method.training_step(make_batch())
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.after_optimizer_step()
        return loss

    return run

