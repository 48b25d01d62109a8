"""coreset=rcs (RCS, Xu et al. NeurIPS 2023) as an engine option: the selection through a method's declared objective
against the float64 transcription of the official step (tests/test_rcs_selection.py), the loader's subsets, the
epoch layout and the LR schedule in epoch units, training only on the selection, bit-exact resume across a
selection, the refusals, and the CLI (advfast-train then advfast-eval)."""

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.utils._python_dispatch

from advfast.config import validate
from advfast.data import DeviceLoader, build_augment
from advfast.data.datasets import ImageDataset
from advfast.data.loader import Batch
from advfast.engine import Trainer, build_config
from advfast.engine.coreset import EpochLayout
from advfast.methods.coreset_rcs import (CoresetObjective, RCSSettings, holdout_split, select_with,
                                         val_rows_as_coded)
# the float64 transcription of the official step lives in the groundwork test (loaded by path: tests/ is no package)
_spec = importlib.util.spec_from_file_location("test_rcs_selection", Path(__file__).resolve().parent / "test_rcs_selection.py")
_official = sys.modules.setdefault("test_rcs_selection", importlib.util.module_from_spec(_spec))
if not hasattr(_official, "official_select"):
    _spec.loader.exec_module(_official)
_data, _model, official_select = _official._data, _official._model, _official.official_select

pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
_LOADED = {}


@pytest.fixture(autouse=True)
def _digits_loaded_once(monkeypatch):
    """The Trainers of this file load the same digits split at 8 px: load it once (the Trainer only reads it)."""
    import advfast.data

    real = advfast.data.load_dataset

    def cached(name, root=None, split="train", download=False, **kw):
        key = (name, root, split, download, tuple(sorted(kw.items())))
        if key not in _LOADED:
            _LOADED[key] = real(name, root, split, download, **kw)
        return _LOADED[key]

    monkeypatch.setattr(advfast.data, "load_dataset", cached)


class _Batches:
    """A selection loader in float64: fixed two-view batches with dataset positions (shuffled order)."""

    def __init__(self, items, positions, bs):
        self.items, self.positions, self.bs = items, positions, bs

    def num_images(self):
        return self.items.shape[0]

    def __iter__(self):
        for s in range(0, self.items.shape[0], self.bs):
            it = self.items[s:s + self.bs]
            yield Batch([it[:, 0], it[:, 1]], torch.zeros(len(it), dtype=torch.long), self.positions[s:s + self.bs])


def test_select_with_objective_matches_official():
    """The engine's path (a method's CoresetObjective over a loader of dataset positions) picks the official
    batches with the official greedy gains, and returns their dataset positions."""
    backbone, head = _model()
    items, val = _data(20, 5)
    bs, fraction = 4, 0.6
    ref_idx, ref_gains = official_select(copy.deepcopy(backbone), copy.deepcopy(head), items,
                                         torch.stack([val, val], 1), fraction, bs)
    positions = torch.randperm(100)[:20]  # the loader's items are dataset positions in shuffled order
    objective = CoresetObjective(backbone, head, "normal", "pgd", 0.5, pool="holdout")
    sel = select_with(objective, _Batches(items, positions, bs), val_rows_as_coded(val, bs),
                      RCSSettings(fraction=fraction, batch_size=bs, random_start=False, temperature=9.0), None)
    assert sel.indices.tolist() == positions[ref_idx].tolist()  # temperature: the objective's (0.5), not 9
    assert sel.gains.tolist() == pytest.approx(ref_gains, rel=1e-9, abs=1e-15)


def _dataset(n=40):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                        torch.arange(n) % 10, mean=(0.5,) * 3, std=(0.25,) * 3, num_classes=10, name="t")


def test_loader_subset():
    ds = _dataset()
    aug = build_augment("simclr", backend="torch", size=8)
    plain = DeviceLoader(ds, 8, aug, "cpu", seed=3)
    loader = DeviceLoader(ds, 8, aug, "cpu", seed=3)
    subset = torch.tensor([5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 2, 3, 0, 1, 4, 6], dtype=torch.int64)
    loader.set_subset(subset)
    assert len(loader) == 2 and loader.num_images() == 16
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = torch.cat([b.indices for b in loader])
        assert sorted(seen.tolist()) == sorted(subset.tolist())  # a permutation of the subset, no other image
    shards = [DeviceLoader(ds, 4, aug, "cpu", seed=3, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_subset(subset)
    assert sorted(torch.cat([s.epoch_indices() for s in shards]).tolist()) == sorted(subset.tolist())
    loader.set_subset(None)  # back to the whole set: exactly a plain loader's draws
    loader.set_epoch(1), plain.set_epoch(1)
    for a, b in zip(loader, plain):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.views[0], b.views[0])
    with pytest.raises(ValueError, match="less than one batch"):
        loader.set_subset(subset[:7])
    with pytest.raises(ValueError, match="positions must lie"):
        loader.set_subset(torch.arange(30, 50))


def test_holdout_split_seeded():
    pool, val = holdout_split(50000, 0.01, 7)
    assert len(val) == 500 and len(pool) == 49500 and val.tolist() == sorted(val.tolist())
    assert sorted(torch.cat([pool, val]).tolist()) == list(range(50000))
    assert torch.equal(holdout_split(50000, 0.01, 7)[1], val) and not torch.equal(holdout_split(50000, 0.01, 8)[1], val)
    assert len(holdout_split(1438, 0.01, 0)[1]) == 1438 - int(1438 * 0.99) == 15


def _cosine_annealing(step, total, lr_max, lr_min, warmup):  # ACL_RCS.py, as the official LambdaLR uses it
    if step < warmup:
        return lr_max * step / warmup
    return lr_min + (lr_max - lr_min) * 0.5 * (1 + math.cos((step - warmup) / (total - warmup) * math.pi))


def test_layout_and_schedule_in_epoch_units():
    """Epoch e (1-based) with L batches: the official rebuilds LambdaLR(total E*L, warm-up 10*L) and steps it
    (e-1)*L times, so iteration i runs at cosine((e-1+i/L)/E): advfast's virtual step gives the same LR."""
    from advfast.optim.schedule import lr_at

    lay = EpochLayout(98, 19, 100)
    assert [lay.steps_in(e) for e in (0, 99, 100, 999)] == [98, 98, 19, 19]
    assert lay.start(100) == 9800 and lay.start(1000) == 9800 + 900 * 19
    for step in (0, 97, 98, 9799, 9800, 9818, 9819, 9800 + 900 * 19 - 1):
        e = lay.epoch_of(step)
        assert lay.start(e) <= step < lay.start(e) + lay.steps_in(e)
        L = lay.steps_in(e)
        official = _cosine_annealing(e * L + (step - lay.start(e)), 1000 * L, 1.0, 1e-6 / 5.0, 10 * L)
        ours = lr_at(lay.virtual_step(step), 5.0, 98000, 980, 0.0, 1e-6) / 5.0
        assert ours == pytest.approx(official, rel=1e-9, abs=1e-15)
    uniform = EpochLayout(7)
    assert uniform.uniform and uniform.epoch_of(20) == 2 and uniform.virtual_step(20) == 20


def test_refusals():
    with pytest.raises(ValueError, match="method simclr does not define"):
        validate(build_config("simclr", None, "digits", [{"coreset": "rcs"}]))
    with pytest.raises(ValueError, match="coreset must be one of none, rcs"):
        validate(build_config("acl", None, "digits", [{"coreset": "rsc"}]))
    with pytest.raises(ValueError, match="multiple of rcs.interval"):
        validate(build_config("acl", None, "digits", [{"coreset": "rcs", "rcs": {"warmup_epochs": 4}}]))
    with pytest.raises(ValueError, match="rcs.fraction must be"):
        validate(build_config("acl", None, "digits", [{"coreset": "rcs", "rcs": {"fraction": 0}}]))
    from advfast.methods.acl import ACL

    for variant, options in (("a2s", {}), ("a2a", {}), ("ds", {"dual_bn": False})):  # RCS is ACL-DS's, dual BN
        cfg = build_config("acl", variant, "digits", [dict(SMALL, method_options=dict(head_hidden=16, **options))])
        assert ACL(cfg, 10, (0.5,) * 3, (0.25,) * 3).coreset_objective() is None
    assert build_config("acl", None, "digits").rcs.warmup_epochs == 3  # digits preset
    assert build_config("acl", None, "cifar10").rcs.warmup_epochs == 100


# digits at 8 px, batch 256: 1423-image pool -> 5 full steps per epoch; fraction 0.5 -> 2 batches of 256 -> 2 steps;
# warm-up 2, interval 2: full epochs 1-2 (steps 0-9), a selection before epoch 3, epoch 4 reuses it: 14 steps
SMALL = dict(image_size=8, batch_size=256, epochs=4, progress=False, log_every=1, ckpt_every=1, deterministic=True,
             method_options=dict(head_hidden=16), attack=dict(steps=1), coreset="rcs",
             rcs=dict(fraction=0.5, warmup_epochs=2, interval=2, val_steps=1))


def _cfg(out, **extra):
    return build_config("acl", None, "digits", [dict(SMALL, out=str(out)), extra])


def _record_batches(trainer):
    seen = []
    step = trainer.method.training_step

    def recording(batch):
        seen.append((trainer.step, batch.indices.clone()))
        return step(batch)

    trainer.method.training_step = recording
    return seen


@pytest.mark.slow  # 28 training steps of 256 images and 2 selections: 30-45 s on 2 busy cores
def test_trains_on_selection_and_resumes_bit_exact(tmp_path, capsys):
    straight = Trainer(_cfg(tmp_path / "a"))
    assert straight.total_steps == 14 and straight.layout == EpochLayout(5, 2, 2)
    seen = _record_batches(straight)
    straight.fit()
    run = json.loads((tmp_path / "a" / "run.json").read_text())["coreset"]
    val = set(run["validation_indices"])
    assert len(val) == 15 and run["coreset_size"] == 512 and run["pool"] == "holdout"
    selection = straight.coreset.indices
    assert straight.coreset.selected_at == 2 and selection.numel() == 512
    for step, idx in seen:
        ids = set(idx.tolist())
        assert not ids & val  # never the held-out validation images
        if step >= 10:  # coreset epochs: only the selection, all of it once per epoch
            assert ids <= set(selection.tolist())
    for epoch_steps in ((10, 12), (12, 14)):
        drawn = torch.cat([i for s, i in seen if epoch_steps[0] <= s < epoch_steps[1]])
        assert sorted(drawn.tolist()) == sorted(selection.tolist())
    # stop at the boundary before the selection (the resume selects), then inside epoch 3 (the resume reuses the
    # checkpoint's selection, also for epoch 4): bit-identical to the straight run
    Trainer(_cfg(tmp_path / "b", max_steps=10)).fit()
    Trainer(_cfg(tmp_path / "b", max_steps=11), resume=True).fit()
    resumed = Trainer(_cfg(tmp_path / "b"), resume=True)
    assert resumed.step == 11 and resumed.coreset.selected_at == 2
    assert torch.equal(resumed.coreset.indices, selection)
    resumed.fit()
    assert capsys.readouterr().out.count("advfast: RCS selected 512 of 1423") == 2  # straight, first resume
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [(r["loss"], r["lr"], r["epoch"]) for r in rows[0]] == [(r["loss"], r["lr"], r["epoch"]) for r in rows[1]]
    assert [r["epoch"] for r in rows[0]][9:] == [2.0, 2.5, 3.0, 3.5, 4.0]


def test_cli_train_then_eval(tmp_path, capsys):
    from advfast.cli import train_main
    from advfast.eval.cli import eval_main

    out = tmp_path / "run"
    args = ["--method", "acl", "--dataset", "digits", "--out", str(out), "--set", "coreset=rcs",
            "--set", "image_size=8", "--set", "batch_size=256", "--set", "epochs=3", "--set", "attack.steps=1",
            "--set", "method.head_hidden=16", "--set", "rcs.fraction=0.4", "--set", "rcs.warmup_epochs=1",
            "--set", "rcs.interval=1", "--set", "rcs.val_steps=1", "--set", "progress=false"]
    assert train_main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("advfast: RCS selected 512 of 1423 images") == 3  # before epochs 1, 2, 3: interval 1
    assert eval_main(["--checkpoint", str(out), "--protocol", "slf", "--attacks", "pgd20", "--epochs", "1",
                      "--n-eval", "16", "--out", str(tmp_path / "eval"), "--no-plots"]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["protocol"] == "slf" and 0 <= res["robust_accuracy"]["pgd20"] <= res["clean_accuracy"] <= 1


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a tensor back to the host (.item(), bool(), int(): _local_scalar_dense) or
    whose output size depends on the data (nonzero: masked indexing): each is a stall on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_selection_reads_back_once_whatever_the_batch_count():
    """No host read per batch or per greedy pick: the selection's host reads do not grow with the number of
    batches (2 vs 5) or picks (1 vs 3); the indices come back once, at the end."""
    backbone, head = _model()
    counts = []
    for n_batches, fraction in ((2, 0.5), (5, 0.6)):
        items, val = _data(4 * n_batches, 3)
        batches = _Batches(items, torch.arange(4 * n_batches), 4)
        objective = CoresetObjective(backbone, head)
        with _HostReads() as reads:
            sel = select_with(objective, batches, val, RCSSettings(fraction=fraction, batch_size=4),
                              torch.Generator().manual_seed(0))
        counts.append(reads.count)
        assert len(sel.indices) == 4 * int(int(4 * n_batches * fraction) / 4)
    assert counts[0] == counts[1] <= 1, counts


def test_full_pool_as_dynacl_rcs(tmp_path):
    """pool="full" (DynACL_RCS.py, DynACL's declaration): the full-data epochs and the selection draw from the
    whole set (the validation images included, as coded)."""
    trainer = Trainer(build_config("dynacl", None, "digits", [dict(SMALL, out=str(tmp_path / "full"), epochs=3)]))
    assert trainer.method.coreset_objective().pool == "full"
    assert trainer.steps_per_epoch == 1438 // 256 and trainer.coreset.chooser.num_images() == 1438
    trainer._coreset_epoch(0)
    assert trainer.loader.subset is None and trainer.loader.num_images() == 1438
    trainer._coreset_epoch(2)
    assert trainer.coreset.selected_at == 2 and trainer.loader.num_images() == 512 and len(trainer.loader) == 2
    with pytest.raises(ValueError, match="ACL-DS's dual BN only"):  # the Trainer refuses, before any file is written
        Trainer(build_config("acl", "a2s", "digits", [dict(SMALL, out=str(tmp_path / "a2s"))]))
    assert not (tmp_path / "a2s").exists()
    with pytest.raises(ValueError, match="less than one selection batch of 256"):  # 5% of 1423 < 256
        Trainer(_cfg(tmp_path / "small", rcs=dict(fraction=0.05)))


@pytest.mark.slow
def test_torchrun_two_ranks_share_rank0_selection_and_resume_on_one(tmp_path):
    """torchrun, 2 CPU ranks (tests/test_distributed.py's worker around advfast-train): every rank selects, rank 0's
    indices are broadcast, each rank trains on its shard of them; the checkpoint's selection resumes in one
    process (global batch 64: the same steps per epoch)."""
    import os
    import socket
    import subprocess

    from advfast.engine.trainer import load_run_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    # pool 1423, fraction 0.1 -> 2 selection batches of 64 -> 128 images, 64 per rank -> 2 steps of 32 per rank
    args = ["--method", "acl", "--dataset", "digits", "--out", str(out), "--device", "cpu", "--image-size", "8",
            "--batch-size", "64", "--no-progress", "--set", "max_steps=1", "--set", "ckpt_every=1",
            "--set", "attack.steps=1", "--set", "method.head_hidden=16", "--set", "coreset=rcs",
            "--set", "rcs.fraction=0.1", "--set", "rcs.warmup_epochs=1", "--set", "rcs.interval=1",
            "--set", "rcs.val_steps=1", "--set", "epochs=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", ADVFAST_TEST_DUMP_WEIGHTS=str(tmp_path))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(Path(__file__).resolve().parent / "test_distributed.py"), "train", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("advfast: RCS selected 128 of 1423 images before epoch 1") == 1  # rank 0 reports
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt") for r in range(2))
    for k in w0:
        assert torch.equal(w0[k], w1[k]) or "running_" in k, k
    cfg = load_run_config(out)
    cfg.max_steps = 2
    resumed = Trainer(cfg, resume=True)  # one process: the 2-rank run's selection, from its checkpoint
    assert resumed.step == 1 and resumed.coreset.selected_at == 0 and resumed.coreset.indices.numel() == 128
    selection = resumed.coreset.indices.clone()
    seen = _record_batches(resumed)
    resumed.fit()
    assert set(seen[0][1].tolist()) <= set(selection.tolist()) and len(seen) == 1
