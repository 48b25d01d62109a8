"""Command-line entry points. ``advfast-train`` (also ``python -m advfast.train``).

Settings are layered, later wins: TrainConfig defaults < the method's preset for the dataset <
--config FILE.yaml < the shortcut flags (--arch, --epochs, ...) < --set key=value. Bad input is
one line on stderr and exit code 2 (ADVFAST_DEBUG=1 shows the traceback instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

PROG = "advfast-train"
# keys a resumed run may change: where and how it runs, not what it computes
RESUMABLE_KEYS = ("device", "progress", "log_every", "ckpt_every", "keep_last", "max_steps", "data_dir", "download",
                  "out", "augment_backend")


class UsageError(ValueError):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    usage = (f"{PROG} --method METHOD --out DIR [options]\n       {PROG} --resume --out DIR [options]\n"
             f"       {PROG} --list")
    p = _Parser(prog=PROG, usage=usage,
                description="Adversarial contrastive pre-training (ACL, AMOC, MoCo-PGD/FGSM, AdvCL, "
                "RoCL and the SimCLR / MoCo baselines). Example: advfast-train --method acl --dataset digits "
                "--out runs/acl", allow_abbrev=False)
    p.add_argument("--list", action="store_true", help="list methods, variants and their presets, then exit")
    p.add_argument("--method", help="training method (see --list)")
    p.add_argument("--variant", help="method variant (default: the method's own)")
    p.add_argument("--dataset", help="cifar10, cifar100, stl10, digits (default; bundled, offline), synthetic, "
                   "imagefolder")
    p.add_argument("--data-dir", help="dataset root (default $ADVFAST_DATA or ./data)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--arch", help="resnet18, resnet50, wrn34_10, convnet")
    p.add_argument("--epochs", help="training epochs")
    p.add_argument("--batch-size", help="images per step")
    p.add_argument("--image-size", help="image side in pixels (digits, imagefolder, synthetic)")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of settings (same keys as --set, nested)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one setting, e.g. --set attack.eps=8/255 --set optim.lr=0.5 "
                        "--set method.queue_size=4096 (repeatable)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--seed", help="random seed")
    p.add_argument("--out", metavar="DIR", help="run directory (checkpoints, metrics, encoder.safetensors); "
                   "required (except with --list)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--allow-change", metavar="KEY", action="append", default=[],
                   help="with --resume: let this setting differ from the run's (e.g. --allow-change optim.lr "
                        "--set optim.lr=0.05 after a divergence); repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--break-lock", action="store_true",
                   help="take the run directory's lock even when another process or host holds it "
                        "(only when that run is known to be gone: two runs in one directory corrupt it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_set(items: list[str]) -> dict[str, Any]:
    """['attack.eps=8/255', 'method.queue_size=4096'] -> {'attack': {'eps': '8/255'}, 'method_options': {...}}."""
    from advfast.config import load_yaml, show

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set takes KEY=VALUE, got {show(item)}")
        value = load_yaml(text, f"--set {show(key, 60)}", invalid_as_text=True) if text.strip() else None
        parts = key.split(".")
        if not all(parts):
            raise UsageError(f"--set {show(key, 60)}: a key is dotted names such as attack.eps")
        if parts[0] == "method" and len(parts) > 1:
            parts[0] = "method_options"
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: {part} was already given a value")
        node[parts[-1]] = value
    return out


def _load_yaml(path: str) -> dict[str, Any]:
    from advfast.config import MAX_YAML_BYTES, load_yaml

    p = Path(path)
    try:
        if p.is_dir():
            raise UsageError(f"--config {path} is a folder; give a YAML file")
        if not p.exists():
            raise UsageError(f"--config {path}: no such file")
        if not p.is_file():
            raise UsageError(f"--config {path} is not a regular file; give a YAML file")
        with open(p, "rb") as f:  # at most one byte past the cap: a huge file is refused unread
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise UsageError(f"--config {path} cannot be read ({e.strerror})") from None
    data = load_yaml(raw, f"--config {path}") or {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold a mapping of settings, got {type(data).__name__}")
    if isinstance(data.get("method"), dict):  # method knobs may be written under "method:" when the name is elsewhere
        raise UsageError(f"--config {path}: give the method's options under method_options:, and its name as method:")
    return data


def _flag_overrides(args) -> dict[str, Any]:
    flags = {"data_dir": args.data_dir, "arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size,
             "image_size": args.image_size, "device": args.device, "seed": args.seed}
    out = {k: v for k, v in flags.items() if v is not None}
    if args.download:
        out["download"] = True
    if args.no_progress:
        out["progress"] = False
    return out


def build_train_config(args):
    """TrainConfig from parsed arguments (and, on --resume, the run's saved config)."""
    from advfast.config import apply_overrides, show, to_dict
    from advfast.engine.rundir import RUN_FILE
    from advfast.engine.trainer import build_config, load_run_config

    yaml_cfg = _load_yaml(args.config) if args.config else {}
    choice = {k: getattr(args, k) if getattr(args, k) is not None else yaml_cfg.pop(k, None)
              for k in ("method", "variant", "dataset")}
    yaml_cfg = {k: v for k, v in yaml_cfg.items() if k not in choice}
    for key, value in choice.items():
        if value is not None and not isinstance(value, str):
            example = "acl" if key == "method" else "digits"
            raise UsageError(f"{key} must be a name such as {example}, got {show(value)}")
    layers = [yaml_cfg, _flag_overrides(args), parse_set(args.set), {"out": args.out}]

    if args.allow_change and not args.resume:
        raise UsageError("--allow-change is for --resume (a new run takes any setting); drop it")
    if args.resume:
        if not (Path(args.out) / RUN_FILE).is_file():
            raise UsageError(f"nothing to resume in {args.out} (no {RUN_FILE}); start the run without --resume")
        cfg = load_run_config(args.out)
        saved = to_dict(cfg)
        for key, given in choice.items():
            if given is not None and given != saved[key]:
                raise UsageError(f"--{key} {given} differs from the run in {args.out} ({saved[key]}); "
                                 f"drop it to resume, or start a new run with another --out")
        allowed = check_allow_change(args.allow_change, cfg)
        for layer in layers:
            apply_overrides(cfg, layer)
        before, after = _flatten(saved), _flatten(to_dict(cfg))
        changed = [k for k in after if after[k] != before.get(k) and k not in RESUMABLE_KEYS and k not in allowed]
        if changed:
            raise UsageError(f"--resume continues the run as it was configured; {', '.join(changed)} cannot change "
                             f"(only {', '.join(RESUMABLE_KEYS)} can, and a setting named with --allow-change KEY)")
        return cfg
    if choice["method"] is None:
        raise UsageError("--method is required (see advfast-train --list)")
    from advfast.data.datasets import DATASETS
    from advfast.config import closest

    dataset = choice["dataset"] or "digits"
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}{closest(dataset, DATASETS)}; choose from {', '.join(DATASETS)}")
    return build_config(choice["method"], choice["variant"], dataset, layers)


def config_keys(cfg) -> list[str]:
    """Every dotted key of ``cfg``: top-level fields, attack.*, optim.*, and method.* of its method."""
    from advfast.config import to_dict
    from advfast.methods import METHODS

    keys = [k for k in _flatten({k: v for k, v in to_dict(cfg).items() if k != "method_options"})]
    cls = METHODS.get(cfg.method)
    if cls is not None:
        keys += [f"method.{f.name}" for f in dataclasses.fields(cls.Options)]
    return keys


# what picks the recipe and the checkpoint's shapes: a resume never changes these
_NEVER_CHANGE = ("method", "variant", "dataset", "arch")


def check_allow_change(keys: list[str], cfg) -> tuple[str, ...]:
    """--allow-change KEY values: real dotted keys of the run's config, none that picks the recipe."""
    from advfast.config import closest, show

    known = config_keys(cfg)
    for key in keys:
        if key in RESUMABLE_KEYS:
            raise UsageError(f"--allow-change {key} is not needed: {key} may change on any resume; drop it")
        if key not in known:
            raise UsageError(f"--allow-change {show(key, 60)} is not a setting{closest(key, known)}; "
                             f"give a dotted key such as optim.lr")
        if key in _NEVER_CHANGE:
            raise UsageError(f"--allow-change {key}: the {key} of a run never changes; start a new run with "
                             f"another --out")
    return tuple(dict.fromkeys(keys))


# ---- --list ------------------------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{'method' if k == 'method_options' else key}."))
        else:
            out[key] = v
    return out


def _fmt(v, key: str = "") -> str:
    """Attack budgets read best in pixel levels (8/255); every other number as itself."""
    if isinstance(v, float):
        k = v * 255
        if key.startswith("attack.") and v and abs(k - round(k)) < 1e-9 and v < 1:
            return f"{round(k)}/255"
        return f"{v:g}"
    return str(v)


def list_methods(file=None) -> None:
    from advfast.config import TrainConfig, to_dict
    from advfast.methods import METHODS, Method
    from advfast.methods.coreset_rcs import rcs_preset

    file = file or sys.stdout
    datasets = ("cifar10", "cifar100", "stl10", "digits")
    print("methods (advfast-train --method NAME [--variant V] --dataset D --out DIR):", file=file)
    for name in sorted(METHODS):
        cls = METHODS[name]
        variants = ", ".join(f"{v} (default)" if v == cls.default_variant else v for v in cls.variants) or "-"
        augments = {}
        for v in cls.variants or (None,):
            views = cls.augment_for(v)
            augments.setdefault(views if isinstance(views, str) else "custom views", []).append(v)
        augment = ", ".join(k if len(augments) == 1 else f"{k} ({', '.join(vs)})" for k, vs in augments.items())
        print(f"\n{name}\n  variants: {variants}\n  augment: {augment}", file=file)
        opts = {f.name: f.default for f in dataclasses.fields(cls.Options)}
        if opts:
            print("  options: " + " ".join(f"method.{k}={_fmt(v)}" for k, v in opts.items()), file=file)
        if cls.coreset_objective is not Method.coreset_objective:  # the method declares a selection objective
            print("  engine options: coreset=rcs (RCS coreset selection; rcs.* below)", file=file)
        # the plain presets, then those an option selects (preset_options: AIR's, A-InfoNCE's own settings)
        # (those for the default variant only: the options that select presets apply to it)
        selected = [{opt: value} for opt, values in cls.preset_options.items() for value in values]
        for variant in cls.variants or (None,):
            for given in [{}] + (selected if variant == cls.default_variant else []):
                groups: dict[str, list[str]] = {}
                for ds in datasets:
                    flat = _flatten(cls.preset_for(ds, variant, dict(given)))
                    line = " ".join(f"{k}={_fmt(v, k)}" for k, v in flat.items())
                    groups.setdefault(line, []).append(ds)
                for line, dss in groups.items():
                    tags = ([variant] if variant else []) + [f"method.{k}={_fmt(v)}" for k, v in given.items()]
                    print(f"  preset [{''.join(t + ', ' for t in tags)}{', '.join(dss)}]: {line}", file=file)
    # out has no default worth showing: every run names its --out
    defaults = _flatten({k: v for k, v in to_dict(TrainConfig()).items()
                         if k not in ("method", "variant", "method_options", "out")})
    rcs_digits = " ".join(f"rcs.{k}={_fmt(v)}" for k, v in rcs_preset("digits").items())
    print("\ncoreset=rcs (methods listing it above): the rcs.* defaults below are the official CIFAR ones; digits: "
          f"{rcs_digits}", file=file)
    print("\ndefaults under every preset (change with --set KEY=VALUE or --config FILE.yaml):", file=file)
    print("  " + " ".join(f"{k}={_fmt(v, k)}" for k, v in defaults.items()), file=file)


# ---- advfast-train -----------------------------------------------------------------------------------

def _fail(message: str, code: int = 2) -> int:
    if len(message) > 600:  # a message is one readable line, whatever it quotes
        message = message[:597] + "..."
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _make_trainer(cfg, args):
    """The Trainer, after every check of the CLI; its first step is config.validate (nothing touches the
    disk before it)."""
    from advfast.engine import Trainer

    return Trainer(cfg, resume=args.resume, overwrite=args.overwrite,
                   allow_change=tuple(dict.fromkeys(args.allow_change)), break_lock=args.break_lock)


def train_main(argv: list[str] | None = None) -> int:
    import yaml

    from advfast.engine.checkpoint import CheckpointError
    from advfast.engine.trainer import RunFault

    debug = bool(os.environ.get("ADVFAST_DEBUG"))
    # OverflowError: a number too large for what it sizes (checked up front where known; this is the net)
    user_errors = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError, yaml.YAMLError,
                   CheckpointError, OverflowError)
    try:
        args = _parser().parse_args(argv)
        if args.list:
            list_methods()
            return 0
        if not args.out:
            raise UsageError("--out DIR is required (the run directory)")
        from advfast.config import check_path_text

        check_path_text(args.out, "--out")
        if args.config:
            check_path_text(args.config, "--config")
        cfg = build_train_config(args)
        trainer = _make_trainer(cfg, args)
    except user_errors as e:
        if debug:
            raise
        return _fail(str(e).splitlines()[0] if str(e) else e.__class__.__name__)
    except RecursionError:  # a pathological input (a self-referencing value) that slipped past the caps
        if debug:
            raise
        return _fail("the settings are nested too deeply (a self-referencing value?); check --config and --set")
    # faults after the start (divergence, a checkpoint that cannot be written): one line, exit code 1
    try:
        summary = trainer.fit()
    except RunFault as e:
        if debug:
            raise
        return _fail(str(e), code=1)
    last = summary["last"] or {}
    loss = f", loss {last['loss']:.4f}" if "loss" in last else ""
    print(f"{PROG}: {summary['step']}/{summary['total_steps']} steps{loss}; run in {summary['out']} "
          f"(encoder: {Path(summary['out']) / 'encoder.safetensors'})", flush=True)
    if summary["stopped_by"] == "SIGINT":
        return 130
    if summary["stopped_by"] == "SIGTERM":
        return 143
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
