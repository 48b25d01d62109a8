"""Shared test setup.

Without a GPU, Triton kernels are tested through the interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, ahead of every test module.
"""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

# Subprocesses the tests start (python -c / -m) must import the installed advfast, as the tests do
# (--import-mode=importlib), not the source folder that shadows it from the checkout's root: that folder
# has neither the compiled advfast._C nor advfast.kernels (kernels/ is mapped in at install time).
os.environ["PYTHONSAFEPATH"] = "1"

if not _HAS_CUDA:
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
    """A failed test's report names its seed, so ``ADVFAST_TEST_SEED=<seed> pytest <test>`` replays it."""
    report = yield
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

