"""Data-parallel correctness on a CPU: 2 gloo ranks with batch b each == 1 process with batch 2b.

What makes the two equal, and how the reference is built:
* The global batch is the same: rank r takes rows [r*b, (r+1)*b) of every view of the 2b batch.
* BatchNorm statistics are per rank under DDP, so the one-process reference normalises each half's
  rows separately ("ghost" BN with the rank's rows: row i of a forward with n = V*2b rows belongs to
  rank (i mod 2b) // b, since every forward of these methods stacks whole views of the batch).
* The attack's random start is turned off (it is each rank's own randomness, not part of the global
  computation); everything else (PGD steps, queues, EMA) runs as in training.
* Contrastive methods (simclr, acl) contrast against the global batch through the differentiable
  all_gather: every rank's loss is the reference loss. Queue methods (moco, amoc) average their local
  losses (as DDP averages the gradients) and fill the queue with every rank's keys, so the rank
  mean is the reference loss and the queues equal the reference queue.

The ranks run as two subprocesses of this file (``python tests/test_distributed.py``) with torchrun's
environment variables, on a free port of 127.0.0.1, all methods in one process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

B = 8  # batch per rank
WORLD = 2
METHODS = ("simclr", "acl", "moco", "amoc", "acl-air")
MEAN, STD = (0.4, 0.45, 0.5), (0.25, 0.25, 0.25)


def _config(method: str):
    from advfast.engine.trainer import build_config

    over = dict(arch="convnet", image_size=8, batch_size=WORLD * B,
                attack=dict(steps=2, random_start=False))
    if method == "moco":
        over.update(attack=dict(kind="none"), method_options=dict(queue_size=40, momentum=0.9))
    if method == "amoc":
        over["method_options"] = dict(queue_size_clean=40, queue_size_adv=40, momentum=0.9)
    if method in ("simclr", "acl", "acl-air"):
        over["method_options"] = dict(head_hidden=16, **({"air": True} if method == "acl-air" else {}))
        if method == "simclr":
            over.pop("attack")
    return build_config(method.removesuffix("-air"), dataset="digits", overrides=[over])


def _build(method: str):
    from advfast.engine.trainer import method_class

    torch.manual_seed(0)  # identical init on every side
    m = method_class(method.removesuffix("-air"))(_config(method), 10, MEAN, STD)
    return m.train()


def _global_batch():
    from advfast.data.loader import Batch

    g = torch.Generator().manual_seed(1234)
    views = [torch.rand(WORLD * B, 3, 8, 8, generator=g) for _ in range(3)]  # acl-air: the original image
    return Batch(views, torch.zeros(WORLD * B, dtype=torch.long), torch.arange(WORLD * B))


def _rank_batch(batch, rank: int):
    from advfast.data.loader import Batch

    s = slice(rank * B, (rank + 1) * B)
    return Batch([v[s] for v in batch.views], batch.labels[s], batch.indices[s])


def _one_step(method, step, batch):
    """One training step as the Trainer runs it (plain SGD so an update is a plain gradient)."""
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.5)
    loss, _ = step(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    method.after_optimizer_step()
    state = {k: v.detach().clone() for k, v in method.state_dict().items()}
    return float(loss.detach()), state


def _worker(out_dir: str) -> None:
    from advfast import dist as C
    from advfast.engine import distributed as D

    torch.set_num_threads(1)
    info, device = D.setup(torch.device("cpu"))
    assert info.world_size == WORLD and C.is_active() and C.world_size() == WORLD
    try:
        for name in METHODS:
            method = _build(name)
            loss, state = _one_step(method, D.wrap_step(method, device), _rank_batch(_global_batch(), info.rank))
            torch.save({"loss": loss, "state": state}, Path(out_dir) / f"{name}_rank{info.rank}.pt")
    finally:
        D.cleanup()


# ---- the one-process reference -----------------------------------------------------------------------
def _ghost_bn(module: nn.Module) -> None:
    """BN layers of ``module`` normalise each rank's rows on their own in train mode."""
    from torch.nn.modules.batchnorm import _BatchNorm

    def forward(self, x, _orig=None):
        if not self.training:
            return self._orig_forward(x)
        n = x.shape[0]
        assert n % (WORLD * B) == 0, n
        owner = (torch.arange(n) % (WORLD * B)) // B
        order = torch.cat([torch.nonzero(owner == r).flatten() for r in range(WORLD)])
        out = torch.cat([self._orig_forward(x[order[r * n // WORLD:(r + 1) * n // WORLD]]) for r in range(WORLD)])
        return out[torch.argsort(order)]

    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m._orig_forward = m.forward
            m.forward = types.MethodType(forward, m)


def _shuffle_bn_reference(key: nn.Module) -> None:
    """The key encoder's shuffle-BN as one process sees it: the rows are permuted by rank 0's
    permutation (the same RNG draw: both sides start from the same seed), each half of the shuffled
    rows is one rank's BN batch (the ghost BN), and the outputs are put back in order."""
    plain = key.forward

    def forward(x, branch="normal"):
        if not key.training:
            return plain(x, branch)
        perm = torch.randperm(x.shape[0])
        return plain(x[perm], branch)[torch.argsort(perm)]

    key.forward = forward


def _reference(name: str):
    method = _build(name)
    _ghost_bn(method)
    if hasattr(method, "key"):
        _shuffle_bn_reference(method.key)
    init = {k: v.detach().clone() for k, v in method.state_dict().items()}
    loss, state = _one_step(method, method.training_step, _global_batch())
    return init, loss, state


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    port = _free_port()
    procs = []
    for r in range(WORLD):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-rank run timed out:\n" + "\n".join(logs))
    if any(p.returncode for p in procs):
        pytest.fail("a rank failed:\n" + "\n----\n".join(logs))
    return {name: [torch.load(out / f"{name}_rank{r}.pt") for r in range(WORLD)] for name in METHODS}


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_match_one_process_with_the_global_batch(rank_results, name):
    ranks = rank_results[name]
    init, ref_loss, ref_state = _reference(name)
    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    assert mean_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    if name in ("simclr", "acl", "acl-air"):  # the global NT-Xent: the same value on every rank
        for r in ranks:
            assert r["loss"] == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    params = {n for n, p in _build(name).named_parameters()}
    moved = 0
    for key, ref in ref_state.items():
        if "running_" in key or "num_batches_tracked" in key:
            continue  # BN statistics: per rank under DDP, not part of the comparison
        for r in ranks:
            got = r["state"][key]
            if key in params and got.is_floating_point():
                # the update itself, not just the weights (the init dominates those)
                torch.testing.assert_close(got - init[key], ref - init[key], rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{name} {key}: {m}")
                moved += int(not torch.equal(ref, init[key]))
            else:  # queues and their pointers
                torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")
    assert moved > 0, "the step changed no parameter: the comparison would be empty"


def test_gather_helpers_are_the_identity_in_one_process():
    from advfast import dist as C
    from advfast.engine import distributed as D

    z = torch.randn(6, 4, requires_grad=True)
    assert C.gather_views(z, 2) is z and C.all_gather(z) is z and C.gather_with_grad(z) is z
    assert C.world_size() == 1 and C.rank() == 0 and C.is_main()
    method = _build("simclr")
    assert D.wrap_step(method, torch.device("cpu")) == method.training_step  # no DDP in one process


def test_detect_reads_torchrun_environment(monkeypatch):
    from advfast.engine import distributed as D

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = D.detect()
    assert (info.rank, info.world_size, info.local_rank, info.enabled, info.is_main) == (3, 4, 1, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK"):
        D.detect()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        D.detect()
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var)
    assert D.detect() == D.DistInfo(0, 1, 0)


def test_rank_seed_keeps_rank_zero_and_separates_the_others():
    from advfast.engine.distributed import rank_seed

    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, r) for r in range(1, 64)} | {rank_seed(7, r, step=5) for r in range(64)}
    assert len(seeds) == 127 and 7 not in seeds


# ---- the engine under torchrun ------------------------------------------------------------------
def _train_args(out, max_steps: int) -> list[str]:
    return ["--method", "simclr", "--dataset", "digits", "--out", str(out), "--device", "cpu", "--image-size", "8",
            "--batch-size", "64", "--no-progress", "--set", f"max_steps={max_steps}", "--set", "log_every=1",
            "--set", "ckpt_every=1", "--set", "method.head_hidden=16"]


def test_torchrun_trains_on_two_ranks_and_resumes_on_one(tmp_path):
    """torchrun with 2 ranks, each running advfast-train's entry point (cli.train_main; this file
    wraps it only to dump the final weights): rank 0 alone writes the run directory (one metrics row per step, not one per rank), the ranks hold the same weights at
    the end (DDP averaged the gradients), and the 2-rank checkpoint resumes in one process."""
    from advfast.engine import Trainer
    from advfast.engine.trainer import load_run_config

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", ADVFAST_TEST_DUMP_WEIGHTS=str(tmp_path))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, "train", *_train_args(out, 2)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert (out / "encoder.safetensors").is_file()
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in range(2))
    for k in w0:  # BN running statistics are each rank's own; everything else is shared
        assert torch.equal(w0[k], w1[k]) or "running_" in k, k
    assert any("running_" in k and not torch.equal(w0[k], w1[k]) for k in w0)  # the ranks saw different data

    cfg = load_run_config(out)
    cfg.max_steps = 3
    resumed = Trainer(cfg, resume=True)  # one process, world size 1
    assert resumed.step == 2 and resumed.steps_per_epoch == 1437 // 64
    for k, v in resumed.method.state_dict().items():  # rank 0's state at step 2
        assert torch.equal(v, w0[k]), k
    resumed.fit()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 alone after step 3; with log_every=2 the ranks agree at step 4, both
    stop there (no rank waits forever in a collective), rank 0 checkpoints step 4, both exit 143."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", ADVFAST_TEST_DUMP_WEIGHTS=str(tmp_path),
               ADVFAST_TEST_SIGTERM_RANK1_AT="3")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, "train", *_train_args(out, 10), "--set", "log_every=2",
           "--set", "ckpt_every=100"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.count("stopped by SIGTERM at step 4") == 2, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert [p.name for p in sorted((out / "checkpoints").glob("*.json"))] == ["ckpt-000000004.json"]


def _train_rank(argv: list[str]) -> int:
    """One torchrun worker: advfast-train, then its final weights for the test to compare."""
    from advfast import cli
    from advfast.engine import Trainer

    torch.set_num_threads(1)
    held = {}
    original_fit = Trainer.fit

    def fit(self):
        summary = original_fit(self)
        held.update({k: v.detach().clone() for k, v in self.method.state_dict().items()})
        return summary

    Trainer.fit = fit
    kill_at = os.environ.get("ADVFAST_TEST_SIGTERM_RANK1_AT")
    if kill_at and os.environ["RANK"] == "1":
        original_step = Trainer.train_step

        def train_step(self, batch):
            result = original_step(self, batch)
            if self.step == int(kill_at):
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        Trainer.train_step = train_step
    code = cli.train_main(argv)
    torch.save(held, Path(os.environ["ADVFAST_TEST_DUMP_WEIGHTS"]) / f"weights_rank{os.environ['RANK']}.pt")
    return code


if __name__ == "__main__" and sys.argv[1] == "train":
    sys.exit(_train_rank(sys.argv[2:]))
elif __name__ == "__main__":  # one rank of the fixture's 2-process run
    _worker(sys.argv[1])
