"""The hooks beyond the iteration, through a method defined here (tests/hooks_demo_method.py): views changed
per epoch (in the batches, on the torch and torchvision backends; DALI's pipeline cache), a stage after
pre-training, a frozen teacher input and its up-front validation, and a SIGKILL in the middle of the
post-training stage then --resume, bit-identical to the run that was never interrupted."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advfast.cli import train_main
from advfast.data import DeviceLoader, build_augment, load_dataset
from advfast.data.presets import Original, ResizedCrop
from advfast.engine import Trainer, build_config
from advfast.engine.checkpoint import KILL_HOOK_ENV, list_checkpoints, load_checkpoint
from advfast.methods import METHODS, register

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("same_run", HERE / "same_run.py")
_same_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_same_run)
_spec = importlib.util.spec_from_file_location("hooks_demo_method", HERE / "hooks_demo_method.py")
demo = sys.modules.setdefault("hooks_demo_method", importlib.util.module_from_spec(_spec))
if not hasattr(demo, "HookDemo"):
    _spec.loader.exec_module(demo)

# digits at 8 px, batch 512: 2 steps per epoch; 2 epochs of pre-training then 2 of "distill" = 8 steps
RUN = dict(progress=False, log_every=1, ckpt_every=1, deterministic=True, attack=dict(steps=1), keep_last=10)


@pytest.fixture
def hookdemo():
    """HookDemo registered for the test only (METHODS is the same registry advfast-train reads)."""
    register(demo.HookDemo)
    yield demo.HookDemo
    METHODS.pop(demo.HookDemo.name, None)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny simclr run: the teacher's run directory (convnet, 8 px, like HookDemo's preset)."""
    out = tmp_path_factory.mktemp("teacher")
    Trainer(build_config("simclr", None, "digits", [dict(RUN, out=str(out), arch="convnet", image_size=8,
                                                         batch_size=512, max_steps=1,
                                                         method_options=dict(head_hidden=16))])).fit()
    return out


def config(out, teacher, **extra):
    return build_config("hookdemo", None, "digits",
                        [dict(RUN, out=str(out), method_options=dict(teacher=str(teacher))), extra])


def cli_args(out, teacher) -> list[str]:
    return ["--method", "hookdemo", "--dataset", "digits", "--out", str(out), "--no-progress",
            "--set", f"method.teacher={teacher}", "--set", "deterministic=true", "--set", "log_every=1",
            "--set", "ckpt_every=1", "--set", "attack.steps=1", "--set", "keep_last=10"]


rows = _same_run.metric_rows


def _assert_same_run(a: Trainer, b: Trainer, out_a, out_b):
    _same_run.assert_same_run(a, b, out_a, out_b)
    assert [r["step"] for r in rows(out_b)] == list(range(1, 9))


@pytest.mark.slow  # about 35 s with the teacher run (2 cores)
def test_hooks_end_to_end_and_kill_mid_stage(hookdemo, teacher, tmp_path):
    straight = Trainer(config(tmp_path / "a", teacher))
    assert [s.name for s in straight.plan.stages] == ["pretrain", "distill"] and straight.total_steps == 8
    assert all(not p.requires_grad for p in straight.method.inputs["teacher"].parameters())
    assert not straight.method.inputs["teacher"].training
    assert not any(k.startswith("inputs") for k in straight.method.state_dict())  # never checkpointed
    straight.fit()
    log = rows(tmp_path / "a")
    # hook 1: epoch 0 crops the whole image, epoch 1 a small part of it, as the batches show
    gap = {r["step"]: r["view_gap"] for r in log if "view_gap" in r}
    assert max(gap[1], gap[2]) < 1e-2 and min(gap[3], gap[4]) > 5e-2, gap
    # hook 2: the stage ran with its own optimiser (constant lr 0.05) and its rows carry it
    assert [r["stage"] for r in log] == ["pretrain"] * 4 + ["distill"] * 4
    assert {r["lr"] for r in log[4:]} == {0.05} and all("distill_adv" in r for r in log[4:])
    assert (tmp_path / "a" / "stages" / "pretrain" / "encoder.safetensors").is_file()
    assert (tmp_path / "a" / "stages" / "distill" / "encoder.safetensors").is_file()
    meta, _ = load_checkpoint(list_checkpoints(tmp_path / "a" / "checkpoints")[-1])
    assert (meta["stage"], meta["stage_index"], meta["stage_step"]) == ("distill", 1, 4)
    meta, _ = load_checkpoint(tmp_path / "a" / "checkpoints" / "ckpt-000000004.json")  # the boundary
    assert (meta["stage"], meta["stage_step"]) == ("distill", 0)
    assert json.loads((tmp_path / "a" / "run.json").read_text())["encoder_inputs"]["teacher"]["sha256"]

    # SIGKILL while writing checkpoint 7 (the middle of "distill"): step 6 is the newest whole one
    out = tmp_path / "b"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{KILL_HOOK_ENV: "7:tensors"})
    r = subprocess.run([sys.executable, str(HERE / "hooks_demo_method.py"), *cli_args(out, teacher)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert list_checkpoints(out / "checkpoints")[-1].name == "ckpt-000000006.json"
    resumed = Trainer(config(out, teacher), resume=True)
    assert resumed.step == 6 and resumed.stage.name == "distill"
    resumed.fit()
    _assert_same_run(straight, resumed, tmp_path / "a", out)


def test_resume_mid_epoch_sets_that_epochs_views(hookdemo, teacher, tmp_path):
    """Killed after step 3 (inside pre-training epoch 1, whose views crop small): the resumed run calls
    on_epoch_start(1) again before replaying the epoch, so step 4 sees the same views and weights."""
    straight = Trainer(config(tmp_path / "a", teacher, max_steps=4))
    straight.fit()
    Trainer(config(tmp_path / "b", teacher, max_steps=3)).fit()
    resumed = Trainer(config(tmp_path / "b", teacher, max_steps=4), resume=True)
    assert resumed.augment.views == demo.views_at(0)  # the preset's, until the epoch starts
    resumed.fit()
    assert resumed.augment.views == demo.views_at(1)
    assert [r["view_gap"] for r in rows(tmp_path / "a")] == [r["view_gap"] for r in rows(tmp_path / "b")]
    sa, sb = straight.method.state_dict(), resumed.method.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_teacher_input_is_validated_before_anything_is_written(hookdemo, teacher, tmp_path, capsys):
    def run(*extra):
        out = tmp_path / "out"
        code = train_main(["--method", "hookdemo", "--out", str(out), "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert not out.exists()
        return err

    assert "needs a pre-trained encoder" in run()
    assert "no such directory" in run("--set", f"method.teacher={tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    assert "encoder.json" in run("--set", f"method.teacher={tmp_path / 'empty'}")

    bad = tmp_path / "altered"
    bad.mkdir()
    for f in ("encoder.json", "encoder.safetensors"):
        (bad / f).write_bytes((teacher / f).read_bytes())
    data = bytearray((bad / "encoder.safetensors").read_bytes())
    data[-1] ^= 1
    (bad / "encoder.safetensors").write_bytes(bytes(data))
    assert "altered" in run("--set", f"method.teacher={bad}")

    other = tmp_path / "other_arch"
    other.mkdir()
    (other / "encoder.safetensors").write_bytes((teacher / "encoder.safetensors").read_bytes())
    meta = json.loads((teacher / "encoder.json").read_text())
    (other / "encoder.json").write_text(json.dumps(dict(meta, arch="resnet18")))
    assert "this run trains a convnet" in run("--set", f"method.teacher={other}")


def test_resume_refuses_another_teacher(hookdemo, teacher, tmp_path):
    from safetensors.torch import load_file, save_file

    from advfast.io import file_sha256

    Trainer(config(tmp_path / "run", teacher, max_steps=1)).fit()
    copy = tmp_path / "teacher2"
    copy.mkdir()
    for f in ("encoder.json", "encoder.safetensors"):
        (copy / f).write_bytes((teacher / f).read_bytes())
    Trainer(config(tmp_path / "run", copy, max_steps=2), resume=True)._release_lock()  # same weights elsewhere: fine
    weights = load_file(str(copy / "encoder.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 1
    save_file(weights, str(copy / "encoder.safetensors"), metadata={"format": "advfast-encoder-1"})
    meta = json.loads((copy / "encoder.json").read_text())
    meta["sha256"]["encoder.safetensors"] = file_sha256(copy / "encoder.safetensors")
    (copy / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="differs from the one this run started with"):
        Trainer(config(tmp_path / "run", copy, max_steps=2), resume=True)


# ---- set_views on every augmentation backend ----------------------------------------------------

WHOLE_VIEWS = ((ResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0)),), (Original(),))
SMALL_VIEWS = ((ResizedCrop(scale=(0.1, 0.2)),), (Original(),))


@pytest.mark.parametrize("backend", ["torch", "torchvision"])
def test_set_views_between_epochs_reaches_the_batches(backend):
    data = load_dataset("digits", size=8)
    augment = build_augment(WHOLE_VIEWS, backend=backend)
    loader = DeviceLoader(data, 64, augment, "cpu", seed=0, num_workers=1 if backend == "torchvision" else 0)

    def gap(epoch):
        loader.set_epoch(epoch)
        batch = next(iter(loader))
        return (batch.views[0] - batch.views[1]).abs().mean().item()

    assert gap(0) < 1e-2
    augment.set_views(SMALL_VIEWS)  # the torchvision workers are made per epoch: they get the new views
    assert augment.views == SMALL_VIEWS and gap(1) > 5e-2


def test_set_views_validates_and_keeps_the_old_views():
    augment = build_augment(WHOLE_VIEWS)
    with pytest.raises(ValueError, match="number of views"):
        augment.set_views("simclr" if len(build_augment("simclr").views) != 2 else "advcl")
    with pytest.raises(TypeError):
        augment.set_views(((object(),), (Original(),)))
    assert augment.views == WHOLE_VIEWS


def test_dali_pipeline_is_rebuilt_for_new_views(monkeypatch):
    """DALI caches its pipeline (the views are baked into the graph): new views must rebuild it. Tested on
    the cache logic; the pipeline itself needs nvidia-dali (tests/test_data_augment.py runs it when present)."""
    from advfast.data.augment import Augment
    from advfast.data.dali_backend import DaliAugment

    aug = DaliAugment.__new__(DaliAugment)
    Augment.__init__(aug, WHOLE_VIEWS)
    aug._pipe = aug._key = aug._generator = None
    built = []

    class Pipe:
        max_batch_size = 64

    monkeypatch.setattr(aug, "_build", lambda batch, shape, device, seed: (built.append(aug.views), (Pipe(), ()))[1])
    g = torch.Generator().manual_seed(3)
    shape = (64, 3, 8, 8)
    aug._pipeline(64, shape, torch.device("cpu"), g)
    aug._pipeline(64, shape, torch.device("cpu"), g)
    assert built == [WHOLE_VIEWS]  # cached
    aug.set_views(SMALL_VIEWS)
    assert aug._pipe is None
    aug._pipeline(64, shape, torch.device("cpu"), g)
    assert built == [WHOLE_VIEWS, SMALL_VIEWS]
    aug.views = WHOLE_VIEWS  # even views assigned past set_views: the cache key holds them
    aug._pipeline(64, shape, torch.device("cpu"), g)
    assert built[-1] == WHOLE_VIEWS and len(built) == 3


@pytest.mark.slow  # about 30 s: torchrun start-up and 8 steps on 2 ranks
def test_stages_run_under_torchrun(teacher, tmp_path):
    """Both stages on 2 gloo ranks: DDP wraps the post-training stage's step (its trained parameters only),
    rank 0 writes one row per step and each stage's export."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(HERE / "hooks_demo_method.py"), *cli_args(out, teacher), "--device", "cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [(r["step"], r["stage"]) for r in rows(out)] == [(i, "pretrain" if i <= 4 else "distill")
                                                            for i in range(1, 9)]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    for stage in ("pretrain", "distill"):
        assert (out / "stages" / stage / "encoder.json").is_file()


def test_overwrite_removes_stage_exports_and_nothing_else(tmp_path):
    from advfast.engine.rundir import remove_run_files

    for stage in ("pretrain", "distill"):
        (tmp_path / "stages" / stage).mkdir(parents=True)
        for f in ("encoder.safetensors", "encoder.json", "encoder-normal.safetensors"):
            (tmp_path / "stages" / stage / f).write_text("x")
    (tmp_path / "stages" / "distill" / "notes.txt").write_text("mine")
    remove_run_files(tmp_path)
    assert not (tmp_path / "stages" / "pretrain").exists()
    assert sorted(p.name for p in (tmp_path / "stages" / "distill").iterdir()) == ["notes.txt"]
