"""Faults during and around a run, each with its stated outcome (docs/reliability.md): damaged checkpoint
sidecars fall back to the previous good checkpoint, another run's checkpoint and damaged run.json /
encoder.json are one-line input errors, disk full stops cleanly, metrics survive a torn line, max_steps
past the plan is refused, exported encoders are checksummed, and a diverged run can be resumed with
a lower learning rate (allow_change)."""

import gc
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advfast.cli import train_main
from advfast.engine import CheckpointError, Trainer, TrainingDiverged, build_config, load_checkpoint
from advfast.engine.checkpoint import KILL_HOOK_ENV, list_checkpoints
from advfast.models.export import load_encoder
from advfast.eval.pretrained import load_pretrained

SMALL = dict(image_size=8, batch_size=512, epochs=3, progress=False, log_every=1, ckpt_every=1, deterministic=True,
             method_options=dict(head_hidden=16), attack=dict(steps=1))


def cfg(out, **extra):
    return build_config("acl", None, "digits", [dict(SMALL, out=str(out)), extra])


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run (checkpoints 1 and 2, encoder exported); tests damage copies of it."""
    out = tmp_path_factory.mktemp("faults") / "run"
    Trainer(cfg(out, max_steps=2)).fit()
    return out


@pytest.fixture
def run(trained, tmp_path):
    return Path(shutil.copytree(trained, tmp_path / "run"))


# ---- damaged sidecars: fall back to the previous good checkpoint, say so, go on ------------------------

SIDECAR_DAMAGE = {
    "missing_step": lambda m: m.pop("step"),
    "step_as_text": lambda m: m.update(step="2"),
    "absurd_step": lambda m: m.update(step=10 ** 15),
    "bool_epoch": lambda m: m.update(epoch=True),
    "wrong_epoch": lambda m: m.update(epoch=7),
    "foreign_tensor_path": lambda m: m.update(tensors="../../run.json"),
    "bad_sha": lambda m: m.update(sha256="x" * 64),
    "optimizer_groups_text": lambda m: m["optimizer"].update(param_groups="lr"),
    "optimizer_plain_keys": lambda m: m["optimizer"].update(plain={"not-an-index": {"momentum_buffer": 1}}),
    "scheduler_missing": lambda m: m.pop("scheduler"),
    "not_a_mapping": None,
}


@pytest.mark.parametrize("damage", sorted(SIDECAR_DAMAGE))
def test_a_damaged_sidecar_falls_back_to_the_previous_checkpoint(run, capsys, damage):
    sidecar = run / "checkpoints" / "ckpt-000000002.json"
    meta = json.loads(sidecar.read_text())
    if SIDECAR_DAMAGE[damage] is None:
        meta = [meta]
    else:
        SIDECAR_DAMAGE[damage](meta)
    sidecar.write_text(json.dumps(meta))
    trainer = Trainer(cfg(run, max_steps=3), resume=True)
    out = capsys.readouterr().out
    warnings = [ln for ln in out.splitlines() if "skipping" in ln]
    assert len(warnings) == 1 and "ckpt-000000002" in warnings[0], out
    assert trainer.step == 1 and f"resuming {run} from step 1" in out
    if damage == "absurd_step":  # one case trains on, to the end
        assert trainer.fit()["step"] == 3
        assert load_checkpoint(run / "checkpoints" / "ckpt-000000003.json")[0]["step"] == 3
    load_checkpoint(run / "checkpoints" / "ckpt-000000001.json")  # the good one still loads


def test_a_checkpoint_of_the_same_method_with_other_shapes_is_an_input_error(run):
    before = tree(run)
    with pytest.raises(CheckpointError, match=r"does not fit this acl model \(another run's\? .*size mismatch"):
        Trainer(cfg(run, max_steps=3, method_options=dict(head_hidden=32)), resume=True)
    assert tree(run) == before


# ---- damaged run.json / encoder.json: one line, nothing built from unchecked arguments ------------------

RUN_FILE_DAMAGE = {
    "not_json": lambda d: "{not json",
    "no_config": lambda d: json.dumps({k: v for k, v in d.items() if k != "config"}),
    "unknown_key": lambda d: json.dumps(dict(d, config=dict(d["config"], bogus=1))),
    "epochs_text": lambda d: json.dumps(dict(d, config=dict(d["config"], epochs="many"))),
    "not_utf8": lambda d: b"\xff\xfe{}",
}


@pytest.mark.parametrize("damage", sorted(RUN_FILE_DAMAGE))
def test_a_damaged_run_file_is_one_line_and_exit_2(run, capsys, damage):
    data = json.loads((run / "run.json").read_text())
    text = RUN_FILE_DAMAGE[damage](data)
    (run / "run.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    before = tree(run)
    assert train_main(["--resume", "--no-progress", "--out", str(run)]) == 2
    assert "run.json" in one_line_error(capsys)
    assert tree(run) == before


ENCODER_DAMAGE = {
    "unknown_build_arg": (lambda b: b.update(exec="rm -rf /"), "unknown key 'exec'"),
    "huge_width": (lambda b: b.update(widths=[10 ** 9, 8]), "widths is not a plain value in range"),
    "unknown_arch": (lambda b: b.update(arch="resnet9000"), "unknown arch"),
    "mean_text": (lambda b: b.update(mean="0.5"), "mean is not a short list"),
    "no_arch": (lambda b: b.pop("arch"), "has no arch"),
}


@pytest.mark.parametrize("damage", sorted(ENCODER_DAMAGE))
def test_a_damaged_encoder_json_never_builds_a_model(run, monkeypatch, damage):
    import advfast.models

    change, message = ENCODER_DAMAGE[damage]
    info = json.loads((run / "encoder.json").read_text())
    change(info["build_args"])
    (run / "encoder.json").write_text(json.dumps(info))
    monkeypatch.setattr(advfast.models, "build_encoder", lambda **kw: pytest.fail("built from unchecked args"))
    with pytest.raises(ValueError, match=message):
        load_pretrained(str(run))


def test_exported_encoders_carry_a_checksum_that_is_verified(run, capsys):
    info = json.loads((run / "encoder.json").read_text())
    assert set(info["sha256"]) == {"encoder.safetensors", "encoder-normal.safetensors"}
    load_encoder(run)
    assert capsys.readouterr().err == ""
    weights = run / "encoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or altered"):
        load_pretrained(str(run))
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    del info["sha256"]  # an export made before checksums: loads, with a note
    (run / "encoder.json").write_text(json.dumps(info))
    encoder, _ = load_pretrained(str(run))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "carries no checksum" in err
    assert isinstance(encoder, torch.nn.Module)


# ---- disk full, metrics after a kill, max_steps ------------------------------------------------------

def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(KILL_HOOK_ENV, None)
    return env


def test_disk_full_while_checkpointing_stops_cleanly(run):
    """A real process under `ulimit -f`: its checkpoint (2 MB) cannot be written, its small files can.
    SIGXFSZ is ignored (Python's default) so the write fails with EFBIG instead of killing the process."""
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    limit = (run / "checkpoints" / "ckpt-000000002.safetensors").stat().st_size // 2

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "advfast.train", "--resume", "--no-progress", "--set", "max_steps=4",
                        "--out", str(run)], capture_output=True, text=True, env=_env(), timeout=300,
                       preexec_fn=limited)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "could not write checkpoint 3" in r.stderr and "File too large" in r.stderr
    assert "ckpt-000000002.json is intact" in r.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # no temp file left
    assert not [p for p in run.rglob("*.tmp")]
    for json_path in list_checkpoints(run / "checkpoints"):
        load_checkpoint(json_path)
    assert not (run / ".advfast-lock").exists()


def test_metrics_survive_a_torn_line_and_are_rewritten_on_resume(run):
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 1.0}\n{"step": 3, "lo')  # a row past the checkpoint, then a torn one
    with (run / "metrics.csv").open("a") as f:
        f.write("3,1.5,0.0")
    Trainer(cfg(run, max_steps=4), resume=True).fit()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all("loss_clean" in r for r in rows)
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert [int(ln.split(",")[header.index("step")]) for ln in lines[1:]] == [1, 2, 3, 4]
    assert all(len(ln.split(",")) == len(header) for ln in lines[1:])


def test_resume_past_the_planned_steps_is_refused(run):
    before = tree(run)
    with pytest.raises(ValueError, match=r"max_steps 7 is beyond the run's 6 planned steps.*max_steps=6"):
        Trainer(cfg(run, max_steps=7), resume=True)
    assert tree(run) == before
    assert Trainer(cfg(run, max_steps=6), resume=True).fit()["step"] == 6  # up to the plan: trains on


# ---- divergence advice is followable: --resume --allow-change optim.lr -----------------------------

def test_after_a_divergence_the_advised_resume_with_a_lower_lr_works(run, monkeypatch, capsys):
    from advfast.methods import METHODS

    cls = METHODS["acl"]
    step = cls.training_step
    monkeypatch.setattr(cls, "training_step", lambda self, batch: (step(self, batch)[0] * float("nan"), {}))
    with pytest.raises(TrainingDiverged) as info:
        Trainer(cfg(run, max_steps=4), resume=True).fit()
    lr = cfg(run).optim.lr
    assert f"advfast-train --resume --out {run} --allow-change optim.lr --set optim.lr={lr / 10:g}" in str(info.value)
    monkeypatch.setattr(cls, "training_step", step)
    gc.collect()

    same = Trainer(cfg(run, max_steps=4), resume=True)
    lr_before = same.optimizer.param_groups[0]["lr"]
    del same
    gc.collect()  # releases its lock
    with pytest.raises(ValueError, match="only optim.lr"):
        Trainer(cfg(run, max_steps=4, arch="resnet18"), resume=True, allow_change=("arch",))
    capsys.readouterr()
    lower = Trainer(cfg(run, max_steps=4, optim=dict(lr=lr / 10)), resume=True, allow_change=("optim.lr",))
    assert f"resuming with optim.lr changed from {lr!r} to {lr / 10!r} at step 2" in capsys.readouterr().out
    assert lower.optimizer.param_groups[0]["lr"] == pytest.approx(lr_before / 10)
    assert json.loads((run / "run.json").read_text())["changes"] == [
        {"key": "optim.lr", "from": lr, "to": lr / 10, "step": 2}]
    assert lower.fit()["step"] == 4
