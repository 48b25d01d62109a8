"""Nothing of a run is ever lost: resume never restarts, pruning keeps the last good checkpoint,
--overwrite validates and builds first and deletes only an advfast run's own files, one process per
run directory (a lock), and process-wide settings are put back after training."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from advfast.cli import train_main
from advfast.engine import CheckpointError, Trainer, build_config, load_checkpoint
from advfast.engine.checkpoint import KILL_HOOK_ENV, list_checkpoints, prune
from advfast.engine.rundir import LOCK_FILE, MARKER, NotARunDirectory
from advfast.engine.runlock import RunDirLocked

# 1437 digits / 512 = 2 steps per epoch
SMALL = dict(image_size=8, batch_size=512, epochs=3, progress=False, log_every=1, ckpt_every=1, deterministic=True,
             method_options=dict(head_hidden=16), attack=dict(steps=1))
ARGV = ["--method", "acl", "--dataset", "digits", "--no-progress", "--batch-size", "512", "--set", "image_size=8",
        "--set", "method.head_hidden=16", "--set", "attack.steps=1", "--set", "deterministic=true",
        "--set", "log_every=1", "--set", "ckpt_every=1"]


def cfg(out, **extra):
    return build_config("acl", None, "digits", [dict(SMALL, out=str(out)), extra])


def tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` (lock excluded: it is transient) with its SHA-256."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run with checkpoints 1 and 2, copied by each test that damages it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    Trainer(cfg(out, max_steps=2)).fit()
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- resume never restarts; pruning keeps the last good checkpoint ----------------------------------

@pytest.mark.parametrize("damage", ["truncated", "none_written"])
def test_resume_without_a_whole_checkpoint_refuses_and_changes_nothing(trained, tmp_path, capsys, damage):
    run = copy_run(trained, tmp_path / "run")
    for json_path in list_checkpoints(run / "checkpoints"):
        if damage == "truncated":
            tensors = json_path.with_suffix(".safetensors")
            tensors.write_bytes(tensors.read_bytes()[:-10])
        else:
            json_path.unlink()
            json_path.with_suffix(".safetensors").unlink()
    before = tree(run)
    with pytest.raises(CheckpointError, match=r"nothing to resume in .*(2 damaged checkpoint|no checkpoint)"):
        Trainer(cfg(run, max_steps=3, keep_last=1), resume=True)
    capsys.readouterr()
    assert train_main(["--resume", "--no-progress", "--set", "keep_last=1", "--out", str(run)]) == 2
    assert "nothing to resume" in one_line_error(capsys)
    assert tree(run) == before and not (run / LOCK_FILE).exists()


def test_pruning_counts_only_whole_checkpoints(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    ckpts = run / "checkpoints"
    newest = list_checkpoints(ckpts)[-1].with_suffix(".safetensors")
    newest.write_bytes(newest.read_bytes()[:-10])  # ckpt 2 damaged, ckpt 1 the only good one
    prune(ckpts, keep_last=1)
    assert [p.name for p in list_checkpoints(ckpts)] == ["ckpt-000000001.json", "ckpt-000000002.json"]
    load_checkpoint(ckpts / "ckpt-000000001.json")
    # resume with keep_last=1: skips the damaged one (one warning line), trains on, keeps a whole one
    trainer = Trainer(cfg(run, max_steps=3, keep_last=1), resume=True)
    assert trainer.step == 1
    assert "skipping checkpoint" in capsys.readouterr().out
    trainer.fit()
    kept = list_checkpoints(ckpts)
    assert [p.name for p in kept] == ["ckpt-000000003.json"]
    assert load_checkpoint(kept[0])[0]["step"] == 3


# ---- --overwrite: validate and build first, delete only advfast's own files --------------------------

def test_overwrite_with_a_setting_only_caught_at_build_time_deletes_nothing(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    before = tree(run)
    with pytest.raises(ValueError, match="larger than the dataset"):  # only known once the data is loaded
        Trainer(cfg(run, batch_size=4096), overwrite=True)
    argv = [a if a != "512" else "4096" for a in ARGV]
    assert train_main([*argv, "--overwrite", "--out", str(run)]) == 2
    assert "batch_size 4096 is larger than the dataset" in one_line_error(capsys)
    assert tree(run) == before and not (run / LOCK_FILE).exists()


def test_overwrite_refuses_a_folder_advfast_did_not_make(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "ckpt-000000001.json").write_text("{}")  # looks like ours, is not
    (folder / "notes.txt").write_text("precious")
    (folder / "run.json").write_text('{"config": "not advfast"}')
    before = tree(folder)
    with pytest.raises(NotARunDirectory, match="not an advfast run directory"):
        Trainer(cfg(folder, max_steps=1), overwrite=True)
    assert train_main([*ARGV, "--overwrite", "--out", str(folder)]) == 2
    assert "not an advfast run directory" in one_line_error(capsys)
    assert tree(folder) == before


def test_a_new_run_never_replaces_a_users_file_named_like_a_run_file(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "metrics.csv").write_text("my,own,table\n")
    for flags in ([], ["--overwrite"]):
        assert train_main([*ARGV, *flags, "--out", str(folder)]) == 2
        assert "not an advfast run directory" in one_line_error(capsys)
    assert tree(folder) == {"metrics.csv": hashlib.sha256(b"my,own,table\n").hexdigest()}


def test_overwrite_removes_only_advfast_files(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    foreign = {"notes.txt": "mine", "checkpoints/readme.txt": "mine too", "tb/keep.me": "and this"}
    for name, text in foreign.items():
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(text)
    Trainer(cfg(run, max_steps=1), overwrite=True).fit()
    assert all((run / name).read_text() == text for name, text in foreign.items())
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt-000000001.json"]
    assert (run / MARKER).is_file()


def test_a_run_made_before_the_marker_still_resumes_and_overwrites(trained, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    (run / MARKER).unlink()
    trainer = Trainer(cfg(run, max_steps=3), resume=True)
    assert trainer.step == 2 and (run / MARKER).is_file()  # marked as advfast's from now on
    trainer.fit()
    (run / MARKER).unlink()
    Trainer(cfg(run, max_steps=1), overwrite=True).fit()
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["ckpt-000000001.json"]


# ---- one process per run directory -----------------------------------------------------------------

def test_lock_is_held_while_training_and_released_after(tmp_path):
    run = tmp_path / "run"
    first = Trainer(cfg(run, max_steps=1))
    owner = json.loads((run / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["started"] > 0
    with pytest.raises(RunDirLocked, match="is in use by this process"):
        Trainer(cfg(run, max_steps=2), overwrite=True)
    first.fit()
    assert not (run / LOCK_FILE).exists()
    with pytest.raises(ZeroDivisionError):  # released on an exception too
        broken = Trainer(cfg(run, max_steps=2), resume=True)
        broken.train_step = lambda batch: 1 / 0
        broken.fit()
    assert not (run / LOCK_FILE).exists()


def _write_lock(run: Path, **owner):
    (run / LOCK_FILE).write_text(json.dumps(dict({"started": time.time() - 7300, "started_at": "earlier"}, **owner)))


def test_a_stale_lock_of_a_dead_process_is_taken_over(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(run, pid=dead.pid, host=socket.gethostname())
    trainer = Trainer(cfg(run, max_steps=3), resume=True)
    assert f"taking over the lock of {run} left by pid {dead.pid}" in capsys.readouterr().out
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    trainer.fit()


def test_a_lock_from_another_host_is_reported_with_its_age_and_can_be_broken(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    _write_lock(run, pid=4242, host="node-elsewhere")
    before = tree(run)
    with pytest.raises(RunDirLocked, match=r"locked by pid 4242 on host node-elsewhere .*2h0\dm ago.*--break-lock"):
        Trainer(cfg(run, max_steps=3), resume=True)
    assert tree(run) == before
    trainer = Trainer(cfg(run, max_steps=3), resume=True, break_lock=True)
    assert "breaking the lock" in capsys.readouterr().out
    trainer.fit()
    assert not (run / LOCK_FILE).exists()



def test_the_cli_refuses_a_remote_lock_in_one_line_and_break_lock_takes_it(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    _write_lock(run, pid=4242, host="node-elsewhere")
    before = tree(run)
    argv = ["--resume", "--out", str(run), "--no-progress", "--set", "max_steps=3"]
    assert train_main(argv) == 2
    assert "--break-lock" in one_line_error(capsys)
    assert tree(run) == before
    assert train_main(argv + ["--break-lock"]) == 0
    assert "breaking the lock" in capsys.readouterr().out
    assert not (run / LOCK_FILE).exists()

def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(KILL_HOOK_ENV, None)
    return env


@pytest.mark.slow  # two real training processes: 20 s alone, 90 s on a loaded 2-core machine
def test_a_second_process_refuses_while_the_first_trains(tmp_path):
    """Real processes: a long run, then a --resume of the same directory while it trains."""
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "advfast.train", *ARGV, "--epochs", "200", "--out", str(run)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run / "checkpoints") and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        second = subprocess.run([sys.executable, "-m", "advfast.train", "--resume", "--no-progress", "--out", str(run)],
                                capture_output=True, text=True, env=_env(), timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"is in use by pid {first.pid} on this host" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err  # the first run was not disturbed
    assert not (run / LOCK_FILE).exists()
    load_checkpoint(list_checkpoints(run / "checkpoints")[-1])


# ---- process-wide settings -------------------------------------------------------------------------

def test_process_settings_are_restored_after_fit_and_on_errors(tmp_path):
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    seen = {}
    trainer = Trainer(cfg(tmp_path / "a", max_steps=1))  # deterministic=True
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision()) == before[:2]
    step = trainer.train_step

    def spy(batch):
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        return step(batch)

    trainer.train_step = spy
    trainer.fit()
    assert seen["deterministic"] is True  # in force while training
    after = (torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    assert after == before
    failing = Trainer(cfg(tmp_path / "b", max_steps=1))
    failing.train_step = lambda batch: 1 / 0
    with pytest.raises(ZeroDivisionError):
        failing.fit()
    assert torch.are_deterministic_algorithms_enabled() == before[0]
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == before[4]


def test_tf32_is_scoped_to_the_block_on_a_gpu_device():
    """What the Trainer does on a GPU (TF32 matmuls, cuDNN autotuning), checked without one: the flags are
    process-wide and need no device to be set or read."""
    from advfast.engine.precision import training_settings

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    with training_settings(False, torch.device("cuda")):
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
    with pytest.raises(RuntimeError), training_settings(False, torch.device("cuda")):
        raise RuntimeError("fails inside")
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
