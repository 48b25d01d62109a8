"""The engine: exact resume, checkpoints (atomic, pruned, verified, never unpickled), run-dir guard,
logs, encoder export, precision resolution, torch.compile, divergence."""

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file

from advfast.config import TrainConfig, validate
from advfast.engine import (CheckpointError, Trainer, TrainingDiverged, build_config, latest_valid_checkpoint,
                            load_checkpoint, resolve_precision)
from advfast.engine.checkpoint import list_checkpoints
from advfast.models import build_encoder

# 1437 digits / 512 = 2 steps per epoch: 5 steps cross two epoch boundaries
SMALL = dict(image_size=8, batch_size=512, epochs=3, progress=False, log_every=1, ckpt_every=1, deterministic=True,
             method_options=dict(head_hidden=16), attack=dict(steps=1))


def small_config(out, method="acl", **extra):
    return build_config(method, None, "digits", [dict(SMALL, out=str(out)), extra])


def test_resume_continues_bit_identically(tmp_path):
    """4 steps straight vs 1 step, resume to 2 (from mid-epoch), resume to 4 (from an epoch boundary):
    identical weights, optimiser state and logged losses. The attack's random start and the augment
    draws make any RNG slip visible."""
    straight = Trainer(small_config(tmp_path / "a", max_steps=4))
    straight.fit()
    Trainer(small_config(tmp_path / "b", max_steps=1)).fit()
    Trainer(small_config(tmp_path / "b", max_steps=2), resume=True).fit()
    resumed = Trainer(small_config(tmp_path / "b", max_steps=4), resume=True)
    assert resumed.step == 2
    resumed.fit()
    a, b = straight.method.state_dict(), resumed.method.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]) if torch.is_tensor(v) else v == ob["state"][i][k]
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert straight.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]


def test_checkpoints_are_pruned_whole_and_verified(tmp_path):
    trainer = Trainer(small_config(tmp_path, max_steps=3, keep_last=2))
    trainer.fit()
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt-000000002.json", "ckpt-000000003.json"]
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    meta, parts = load_checkpoint(ckpts[-1])
    assert meta["step"] == 3 and meta["config"]["method"] == "acl"
    assert set(parts["model"]) == set(trainer.method.state_dict())
    assert "torch_cpu" in "".join(parts["rng"])
    # truncate the newest: reported by name, the previous one is used
    tensors = ckpts[-1].with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:100])
    warnings = []
    meta, _ = latest_valid_checkpoint(tmp_path / "checkpoints", warn=warnings.append)
    assert meta["step"] == 2
    assert len(warnings) == 1 and "ckpt-000000003.safetensors" in warnings[0]


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED",))


def test_a_planted_pickle_is_rejected_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Trainer(small_config(tmp_path / "run", max_steps=1)).fit()
    json_path = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    tensors = json_path.with_suffix(".safetensors")
    tensors.write_bytes(pickle.dumps({"model.w": _Boom()}))
    meta = json.loads(json_path.read_text())
    import hashlib
    meta["sha256"] = hashlib.sha256(tensors.read_bytes()).hexdigest()  # even with a matching hash
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(json_path)
    assert not (tmp_path / "PWNED").exists()


def test_run_dir_guard(tmp_path):
    Trainer(small_config(tmp_path, max_steps=1)).fit()
    with pytest.raises(ValueError, match="already holds a run; pass --resume"):
        Trainer(small_config(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="exclude each other"):
        Trainer(small_config(tmp_path, max_steps=1), resume=True, overwrite=True)
    (tmp_path / "keep.txt").write_text("mine")
    trainer = Trainer(small_config(tmp_path, max_steps=1), overwrite=True)
    assert not (tmp_path / "checkpoints").exists() and (tmp_path / "keep.txt").exists()
    trainer.fit()


def test_metrics_and_exported_encoder(tmp_path):
    trainer = Trainer(small_config(tmp_path, max_steps=2, log_every=2))
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 2
    assert {"loss", "loss_clean", "loss_adv", "lr", "images_per_s", "epoch"} <= set(rows[0])
    assert all(math.isfinite(rows[0][k]) for k in ("loss", "lr", "images_per_s"))
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["step", "epoch", "lr"]
    info = json.loads((tmp_path / "encoder.json").read_text())
    assert (info["method"], info["variant"], info["bn_branch"], info["image_size"], info["arch"]) == \
        ("acl", "ds", "pgd", 8, "convnet")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in info["build_args"].items()}
    plain = build_encoder(**args)
    plain.load_state_dict(load_file(tmp_path / "encoder.safetensors"))
    plain.eval()
    trainer.method.eval()
    x = torch.rand(8, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(plain(x), trainer.method.encoder(x, "pgd"), atol=1e-6)


@pytest.mark.parametrize("log_every", [1, 10])
def test_divergence_stops_with_the_last_good_checkpoint_named(tmp_path, monkeypatch, log_every):
    """Caught at the log point, or at a checkpoint between log points: no NaN weights are saved."""
    trainer = Trainer(small_config(tmp_path, max_steps=4, log_every=log_every))
    step = trainer.method.training_step

    def poisoned(batch):
        loss, metrics = step(batch)
        return (loss * float("nan") if trainer.step >= 2 else loss), metrics

    monkeypatch.setattr(trainer.method, "training_step", poisoned)
    with pytest.raises(TrainingDiverged, match="ckpt-000000002"):
        trainer.fit()
    assert list_checkpoints(tmp_path / "checkpoints")[-1].name == "ckpt-000000002.json"


def test_compile_flag_trains(tmp_path):
    trainer = Trainer(small_config(tmp_path, method="simclr", max_steps=1, compile=True, compile_backend="eager"))
    summary = trainer.fit()
    assert math.isfinite(summary["last"]["loss"])
    assert trainer.method.encoder._compiled_call_impl is not None  # compiled in place:
    assert not any("_orig_mod" in k for k in trainer.method.state_dict())  # checkpoint keys unchanged


def test_precision_resolution():
    cfg = TrainConfig(device="cpu")
    p = resolve_precision(cfg)
    assert (p.name, p.channels_last, p.device.type) == ("fp32", False, "cpu")
    assert resolve_precision(TrainConfig(device="cpu", precision="bf16")).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision(TrainConfig(device="cpu", precision="fp16"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_precision(TrainConfig(device="cuda"))


@pytest.mark.parametrize("key,value,match", [
    ("attack", {"eps": -0.1}, "attack.eps must be"),
    ("attack", {"eps": 3.0}, "attack.eps must be"),
    ("batch_size", 1, "batch_size must be at least 2"),
    ("optim", {"lr": 0.0}, "optim.lr must be positive"),
    ("precision", "fp8", "precision must be one of"),
    ("device", "tpu", "device must be"),
])
def test_validate_rejects_bad_values(key, value, match):
    from advfast.config import apply_overrides
    cfg = TrainConfig()
    apply_overrides(cfg, {key: value})
    with pytest.raises(ValueError, match=match):
        validate(cfg)


def test_batch_larger_than_dataset(tmp_path):
    with pytest.raises(ValueError, match="larger than the dataset"):
        Trainer(small_config(tmp_path, batch_size=5000))
    assert not (tmp_path / "run.json").exists()


@pytest.mark.gpu
def test_gpu_bf16_channels_last_step(tmp_path):
    cfg = small_config(tmp_path, max_steps=2, device="cuda", deterministic=False)
    trainer = Trainer(cfg)
    assert trainer.precision.name == "bf16" and trainer.precision.channels_last
    summary = trainer.fit()
    assert math.isfinite(summary["last"]["loss"])
    assert all(p.dtype == torch.float32 for p in trainer.method.parameters())  # fp32 master weights
