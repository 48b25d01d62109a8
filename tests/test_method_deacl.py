"""--method deacl: one whole step against a float64 transcription of the official step (pantheon5100/DeACL @
3fb81e3, solo/methods/mocov2_distillation_AT.py: training_step, generate_training_AE), the frozen teacher (no
gradient, outside the state, the optimiser and the checkpoints), the three teacher sources (an advfast run
directory, a published solo-learn checkpoint file, the in-run simclr stage), kill and resume inside each stage,
and the CLI (train on digits, then advfast-eval)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advfast.cli import train_main
from advfast.config import validate
from advfast.data import Batch
from advfast.engine import Trainer, build_config
from advfast.engine.checkpoint import KILL_HOOK_ENV, list_checkpoints
from advfast.engine.trainer import load_run_config
from advfast.methods.deacl import DEACL_CIFAR_MEAN, DEACL_CIFAR_STD, DEACL_VIEWS, DeACL
from advfast.models import build_encoder

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("deacl_loss_tests", HERE / "test_deacl_loss.py")
_loss_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_loss_tests)  # its official-step transcription (not collected twice: a private name)
D64 = torch.float64
EPS = 8 / 255
# digits at 8 px with the convnet; every step logged and checkpointed, deterministic kernels
RUN = dict(progress=False, log_every=1, ckpt_every=1, deterministic=True, keep_last=20, arch="convnet", image_size=8)


def official_step(student, teacher, image_weak, start, steps, trades_k=2.0):
    """The float64 transcription of the official step (tests/test_deacl_loss.py), its loss only."""
    return _loss_tests.official_step(student, teacher, image_weak, start, trades_k, steps=steps)[0]


def _tiny_method(steps=5):
    cfg = build_config("deacl", None, "digits", [dict(arch="convnet", image_size=8, attack=dict(steps=steps),
                                                      method_options=dict(teacher="given"))])
    validate(cfg)
    torch.manual_seed(0)
    method = DeACL(cfg, 10, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)).to(D64)
    teacher = build_encoder("convnet", ("normal",), (0.45, 0.5, 0.35), (0.3, 0.25, 0.2)).to(D64)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    method.set_encoder_input("teacher", teacher, {})
    return method, teacher


def test_whole_step_matches_official():
    method, teacher = _tiny_method()
    method._start_distill()  # the engine's on_start: the student becomes the teacher, normalisation included
    for a, b in zip(method.backbone.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():  # then it is trained a while: the two differ
        for p in method.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = EPS + (1 - 2 * EPS) * torch.rand(6, 3, 8, 8, dtype=D64)  # the start never leaves [0, 1]
    st_o, te_o = copy.deepcopy(method.backbone), copy.deepcopy(teacher).requires_grad_(True)
    torch.manual_seed(123)
    start = torch.empty_like(x).uniform_(-1.0, 1.0) * EPS
    lo = official_step(st_o, te_o, x, start, steps=5)
    lo.backward()
    method.train()
    torch.manual_seed(123)  # the same start: advfast's PGD draws it first, from the global generator
    lm, parts = method.training_step(Batch([x, x.clone()], torch.zeros(6, dtype=torch.long), torch.arange(6)))
    lm.backward()
    torch.testing.assert_close(lm, lo, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(method.backbone.named_parameters(), st_o.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(method.backbone.buffers(), st_o.buffers()):  # BN statistics of the one cat[x, x'] forward
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(parts["loss_distill"] + 2.0 * parts["loss_adv_consistency"], lm.detach())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())  # no work through it
    assert any(p.grad is not None for p in te_o.parameters())  # the official backward ran through its teacher
    assert not teacher.training and method.training


def test_options_are_checked(tmp_path, capsys):
    def refused(*sets):
        code = train_main(["--method", "deacl", "--dataset", "cifar10", "--out", str(tmp_path / "o"), "--no-progress",
                           *[a for s in sets for a in ("--set", s)]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert not (tmp_path / "o").exists()
        return err

    assert "needs a teacher" in refused()
    assert "not both" in refused("method.teacher=x", "method.train_teacher=true")
    assert "train_teacher=true" in refused("method.teacher=x", "method.teacher_epochs=3")
    assert "no such directory or file" in refused(f"method.teacher={tmp_path / 'nope'}")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert "method.teacher=" in refused(f"method.teacher={tmp_path / 'junk.ckpt'}")
    # digits: the preset trains its own teacher unless one is given
    assert build_config("deacl", None, "digits").method_options == {"train_teacher": True}
    assert "train_teacher" not in build_config("deacl", None, "digits", [dict(method_options=dict(teacher="r"))]
                                               ).method_options


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny simclr run: an advfast teacher (convnet, 8 px)."""
    out = tmp_path_factory.mktemp("teacher")
    Trainer(build_config("simclr", None, "digits", [dict(RUN, out=str(out), batch_size=512, max_steps=1,
                                                         method_options=dict(head_hidden=16))])).fit()
    return out


def _deacl(out, teacher, **extra):
    return build_config("deacl", None, "digits", [dict(RUN, out=str(out), batch_size=512, attack=dict(steps=1),
                                                       method_options=dict(teacher=str(teacher))), extra])


def test_run_dir_teacher_is_frozen_and_outside_the_state(teacher_run, tmp_path):
    trainer = Trainer(_deacl(tmp_path / "run", teacher_run, max_steps=2))
    method = trainer.method
    teacher = method.teacher
    assert [s.name for s in trainer.plan.stages] == ["distill"]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    for a, b in zip(method.backbone.state_dict().values(), before.values()):  # the student starts as the teacher
        assert torch.equal(a, b)
    assert method.backbone.build_args["mean"] == teacher.build_args["mean"]  # the teacher's (imagenet) stats
    trainer.fit()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not any(k.startswith(("_teacher", "inputs", "teacher.")) for k in method.state_dict())
    ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not ids & {id(p) for p in teacher.parameters()} and ids == {id(p) for p in method.backbone.parameters()}
    record = json.loads((tmp_path / "run" / "run.json").read_text())["encoder_inputs"]["teacher"]
    assert record["sha256"] and Path(record["path"]) == Path(teacher_run)
    assert method.teacher_digest.any()
    # a resume with other teacher weights is refused (run.json's record)
    other = tmp_path / "other"
    shutil.copytree(teacher_run, other)
    _alter_export(other)
    with pytest.raises(ValueError, match="differs from the one this run started with"):
        Trainer(_deacl(tmp_path / "run", other, max_steps=2), resume=True)


def _solo_checkpoint(path: Path):
    """A solo-learn SimCLR Lightning checkpoint as solo-learn writes it (backbone.* of its padding-2 torchvision
    ResNet-18, a projector, a classifier), random weights; and that backbone, to compute the official features."""
    spec = importlib.util.spec_from_file_location("interop_official_models", HERE / "interop_official_models.py")
    om = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(om)
    backbone = om.randomize(om.TorchvisionResNet18(cifar_stem_padding=2), 5)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({"projector.0.weight": torch.randn(2048, 512), "projector.0.bias": torch.zeros(2048),
                  "projector.3.weight": torch.randn(256, 2048), "classifier.weight": torch.randn(10, 512),
                  "classifier.bias": torch.zeros(10)})
    torch.save({"epoch": 999, "global_step": 195000, "state_dict": state}, path)
    return backbone, om


def test_solo_learn_checkpoint_teacher(tmp_path):
    ckpt = tmp_path / "simclr-cifar10-ep=999.ckpt"
    backbone, om = _solo_checkpoint(ckpt)
    cfg = build_config("deacl", None, "digits", [dict(RUN, out=str(tmp_path / "run"), arch="resnet18_solo",
                                                      image_size=32, batch_size=4, max_steps=1, attack=dict(steps=1),
                                                      method_options=dict(teacher=str(ckpt)))])
    trainer = Trainer(cfg)
    teacher = trainer.method.teacher
    x = torch.rand(3, 3, 32, 32)
    # the official DeACL model: the solo-learn weights in its normalising ResNet (DeACL's CIFAR constants)
    norm = om.NormalizeByChannelMeanStd(list(DEACL_CIFAR_MEAN), list(DEACL_CIFAR_STD))
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), backbone(norm(x)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(trainer.method.backbone.eval()(x), teacher(x), rtol=0, atol=0)
    trainer.fit()
    assert all(p.grad is None for p in teacher.parameters())
    record = json.loads((tmp_path / "run" / "run.json").read_text())["encoder_inputs"]["teacher"]
    from advfast.io import file_sha256

    assert record == {"path": str(ckpt.resolve()), "sha256": file_sha256(ckpt)}
    assert json.loads((tmp_path / "run" / "encoder.json").read_text())["arch"] == "resnet18_solo"


def _alter_export(where: Path) -> None:
    """Change one weight of an advfast export and record the new file's SHA-256 (a valid, different encoder)."""
    from safetensors.torch import load_file, save_file

    from advfast.io import file_sha256

    weights = load_file(str(where / "encoder.safetensors"))
    key = next(k for k, v in weights.items() if v.is_floating_point() and "normalize" not in k)
    weights[key] = weights[key] + 1
    save_file(weights, str(where / "encoder.safetensors"), metadata={"format": "advfast-encoder-1"})
    meta = json.loads((where / "encoder.json").read_text())
    meta["sha256"]["encoder.safetensors"] = file_sha256(where / "encoder.safetensors")
    (where / "encoder.json").write_text(json.dumps(meta))


def _cli(out, *extra):
    # batch 256 on the digits: 5 steps per epoch; 1 epoch of the teacher stage (steps 1-5), 1 of "distill" (6-10)
    return ["--method", "deacl", "--dataset", "digits", "--out", str(out), "--no-progress", "--batch-size", "256",
            "--set", "image_size=8", "--set", "arch=convnet", "--set", "epochs=1", "--set", "method.teacher_epochs=1",
            "--set", "deterministic=true", "--set", "log_every=1", "--set", "ckpt_every=1", "--set", "attack.steps=1",
            "--set", "keep_last=20", *extra]


def _killed_at(step: int, args: list[str]):
    code = "import sys; from advfast.cli import train_main; sys.exit(train_main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{KILL_HOOK_ENV: f"{step}:tensors"})
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def _rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # two training subprocesses (about 40 s on 2 shared cores)
def test_train_teacher_stages_kill_and_resume_in_each(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same kernels, bit-identical runs
    try:
        assert train_main(_cli(tmp_path / "a")) == 0
    finally:
        torch.set_num_threads(threads)
    straight = _rows(tmp_path / "a")
    stages = [(i, "teacher" if i <= 5 else "distill") for i in range(1, 11)]
    assert [(r["step"], r["stage"]) for r in straight] == stages
    assert "loss_nt_xent" in straight[0] and "loss_adv_consistency" in straight[-1]
    assert (tmp_path / "a" / "stages" / "teacher" / "encoder.safetensors").is_file()

    out = tmp_path / "b"
    _killed_at(3, _cli(out))  # SIGKILL while writing checkpoint 3: inside the teacher stage, mid-epoch
    assert list_checkpoints(out / "checkpoints")[-1].name == "ckpt-000000002.json"
    _killed_at(8, _cli(out, "--resume"))  # resumed at 2; killed inside "distill" (newest whole: 7)
    assert list_checkpoints(out / "checkpoints")[-1].name == "ckpt-000000007.json"
    assert train_main(_cli(out, "--resume")) == 0  # the in-run teacher comes back from stages/teacher
    keys = [k for k in straight[0] if k != "images_per_s"] + ["loss_distill", "loss_adv_consistency"]
    assert [[r.get(k) for k in keys] for r in _rows(out)] == [[r.get(k) for k in keys] for r in straight]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a" / "encoder.safetensors")), load_file(str(out / "encoder.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # other in-run teacher weights under the same run (a consistent export): refused by the teacher digest
    _alter_export(out / "stages" / "teacher")
    with pytest.raises(ValueError, match="teacher's weights differ"):
        Trainer(load_run_config(out), resume=True)


def test_views_per_stage():
    cfg = build_config("deacl", None, "digits", [dict(arch="convnet", image_size=8)])
    method = DeACL(cfg, 10, (0.5,) * 3, (0.25,) * 3)
    from advfast.data import build_augment

    method.augment = build_augment(DeACL.augment_for(None))
    teacher, distill = method.stages()
    teacher.on_epoch_start(0)
    assert method.augment.preset == "simclr"
    distill.on_epoch_start(0)
    assert method.augment.views == DEACL_VIEWS
    assert teacher.optim.name == "lars" and teacher.optim.lr == pytest.approx(1.25)  # simclr's, batch 128
    assert distill.optim is None and cfg.optim.step_every == "epoch"


def test_cli_trains_on_digits_and_evaluates(tmp_path):
    from advfast.eval.cli import eval_main

    out = tmp_path / "run"
    assert train_main(_cli(out, "--set", "max_steps=7")) == 0  # the teacher stage, then 2 distillation steps
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["method"] == "deacl" and meta["step"] == 7
    rc = eval_main(["--checkpoint", str(out), "--protocol", "slf", "--attacks", "pgd20", "--epochs", "1",
                    "--n-eval", "16", "--out", str(tmp_path / "eval"), "--no-plots", "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 0 <= res["clean_accuracy"] <= 1 and "pgd20" in res["robust_accuracy"]
