"""``load_published(path, fmt)``: a published robust-SSL checkpoint as an advfast encoder.

The file is read without running code from it (advfast.interop.safe_unpickle), the encoder's
weights are found in the payload, its keys are mapped onto advfast's CIFAR ResNet (one BN branch
kept: the one the method's paper evaluates, or ``bn_branch``), and every key and shape is checked
before loading, so a file that does not fit fails with one line naming what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from advfast.interop.errors import InteropError
from advfast.interop.formats import PublishedFormat, describe_layout, get_format
from advfast.interop.safe_unpickle import load_checkpoint

_ENCODER_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.", "normalize.")
_BN_LIST = re.compile(r"^(.*)\.bn_list\.(\d+)\.([^.]+)$")
_BN_LIST_SINGLE = re.compile(r"^(.*)\.bn_list\.([^.]+)$")  # batch_norm_multiple built with bn_names=None
_TRIGGER = re.compile(r"^(.*)\.bn_(clean|adv)\.([^.]+)$")
_RENAMES = ((".downsample.conv.", ".downsample.0."), (".downsample.bn.", ".downsample.1."),
            (".shortcut.", ".downsample."))


def load_published(path, fmt: str, bn_branch: str | None = None, dataset: str = "cifar10",
                   image_size: int = 32, keep_branches: bool = False):
    """(advfast encoder in eval mode on the CPU, metadata) from a checkpoint saved by an official code base.

    ``fmt`` is one of advfast.interop.FORMATS (acl, dynacl, advcl, a-infonce, deacl, solo-learn, rocl,
    amoc, robustssl); ``bn_branch`` overrides the format's evaluation branch for dual-BN files
    ('normal'/'pgd'/'pgd_ce' for bn_list layouts, 'clean'/'adv' for AMOC). ``dataset`` and
    ``image_size`` describe the pre-training data (the published checkpoints are CIFAR, 32x32).
    With ``keep_branches`` a multi-BN file gives a multi-branch encoder holding all its branches (named as
    the official code names them, e.g. ('normal', 'pgd')), for dual-BN fine-tuning such as the RobustSSL
    benchmark's AFF; ``meta['bn_branch']`` is then the evaluation branch.
    The metadata has the keys advfast-eval reads from an advfast export (dataset, image_size,
    bn_branch, arch, mean, std, feat_dim) plus format, method, source, epoch, branches and dropped_keys.
    """
    from advfast.models import build_encoder

    spec = get_format(fmt)
    path = Path(path)
    payload = load_checkpoint(path)
    state = _find_state_dict(payload, spec, path)
    state = {_strip_module(k): v for k, v in state.items()}
    prefix = _encoder_prefix(state, spec, path)
    encoder_state, dropped = {}, 0
    for key, value in state.items():
        if key.startswith(prefix) and key[len(prefix):].startswith(_ENCODER_ROOTS):
            encoder_state[key[len(prefix):]] = value
        else:
            dropped += 1  # heads, projectors, classifiers, the other encoder of a momentum pair
    shared, per_branch, file_branches = _split_branches(encoder_state, spec, bn_branch, path)
    branch = bn_branch or (spec.eval_branch if per_branch else "normal")
    if keep_branches and per_branch:
        single = _rename(shared)
        for name in file_branches:
            for key, value in _rename(per_branch[name]).items():
                module, _, leaf = key.rpartition(".")
                single[f"{module}.bns.{name}.{leaf}"] = value
        encoder_branches = file_branches
    else:
        single = _rename(dict(shared, **per_branch.get(branch, {})))
        encoder_branches = (branch,)
    mean, std = _normalisation(single, spec)
    arch = _arch(single, spec, path)
    encoder = build_encoder(arch, bn_branches=encoder_branches, mean=mean, std=std)
    encoder = encoder.to(torch.float32)
    _check_and_load(encoder, single, spec, path, arch)
    meta = {
        "format": spec.name, "method": spec.method, "source": str(path), "arch": arch,
        "build_args": dict(encoder.build_args), "bn_branch": branch, "branches": list(file_branches),
        "encoder_branches": list(encoder_branches),
        "feat_dim": int(encoder.feat_dim), "mean": None if mean is None else list(mean),
        "std": None if std is None else list(std), "dataset": dataset, "image_size": int(image_size),
        "epoch": _epoch(payload), "encoder_prefix": prefix, "dropped_keys": dropped,
    }
    return encoder.eval(), meta


def _find_state_dict(payload, spec: PublishedFormat, path: Path) -> dict:
    if not isinstance(payload, Mapping):
        raise InteropError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary")
    for key in spec.containers:
        if isinstance(payload.get(key), Mapping):
            payload = payload[key]
            break
    else:
        # a state dict under another format's key (RoCL's 'model' read as ACL) is named, with the format it
        # looks like; a payload's loose tensors (an RNG state) are not an encoder
        nested = {str(k): v for k, v in payload.items()
                  if isinstance(v, Mapping) and any(isinstance(t, torch.Tensor) for t in v.values())}
        has_encoder = any(str(k).endswith("conv1.weight") for k in payload)
        if nested and not has_encoder:
            key, inner = next(iter(nested.items()))
            looks = describe_layout(str(k) for k in inner)
            hint = f"; it looks like --from {looks}" if looks and not looks.startswith(spec.name) else ""
            raise InteropError(f"{path} is not a {spec.name} checkpoint: no state dict under "
                               f"{' / '.join(repr(k) for k in spec.containers)}, one under {key!r}{hint}")
        if not any(isinstance(v, torch.Tensor) for v in payload.values()):
            raise InteropError(f"{path} is not a {spec.name} checkpoint: no state dict under "
                               f"{' / '.join(repr(k) for k in spec.containers)} (top-level keys: "
                               f"{', '.join(map(str, list(payload)[:8]))})")
    state = {str(k): v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise InteropError(f"{path}: the state dict holds no tensors")
    return state


def _strip_module(key: str) -> str:
    # DataParallel / DistributedDataParallel wrappers prefix every key with "module."
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def _encoder_prefix(state: dict, spec: PublishedFormat, path: Path) -> str:
    for prefix in spec.encoder_prefixes:
        if f"{prefix}conv1.weight" in state:
            return prefix
    looks = describe_layout(state)
    hint = f"; it looks like --from {looks}" if looks and not looks.startswith(spec.name) else ""
    wanted = " or ".join(f"{p}conv1.weight" for p in spec.encoder_prefixes)
    raise InteropError(f"{path} is not a {spec.name} checkpoint: no {wanted} key{hint}")


def _split_branches(state: dict, spec: PublishedFormat, bn_branch: str | None, path: Path):
    """(entries shared by all branches, {branch: its BN entries}, branch names in the file's order);
    BN entries are keyed without their branch segment, other names are still the file's."""
    per_branch: dict[str, dict] = {}
    shared: dict = {}
    for key, value in state.items():
        m = _BN_LIST.match(key)
        if m and spec.bn == "bn_list":
            index = int(m.group(2))
            if index >= len(spec.branches):
                raise InteropError(f"{path}: {key} is BN branch {index}, but a {spec.name} model has "
                                   f"{len(spec.branches)} ({', '.join(spec.branches)}); is this another format?")
            per_branch.setdefault(spec.branches[index], {})[f"{m.group(1)}.{m.group(3)}"] = value
            continue
        m = _TRIGGER.match(key)
        if m and spec.bn == "trigger":
            per_branch.setdefault(m.group(2), {})[f"{m.group(1)}.{m.group(3)}"] = value
            continue
        m = _BN_LIST_SINGLE.match(key)
        shared[f"{m.group(1)}.{m.group(2)}" if m else key] = value
    if per_branch:
        branches = tuple(b for b in spec.branches if b in per_branch)
        branch = bn_branch or spec.eval_branch
        if branch not in per_branch:
            raise InteropError(f"{path}: BN branch {branch!r} is not in this {spec.name} file (it has "
                               f"{', '.join(branches)})")
        return shared, per_branch, branches
    if spec.bn != "plain" and any(".bn_" in k for k in state):
        looks = describe_layout(state)
        hint = f"; it looks like --from {looks}" if looks else ""
        raise InteropError(f"{path}: its BN keys are not {spec.name}'s{hint}")
    if bn_branch not in (None, "normal"):
        raise InteropError(f"{path} has a single BatchNorm per layer; there is no branch {bn_branch!r} to pick")
    return shared, {}, ("normal",)


def _rename(state: dict) -> dict:
    """The official downsample / shortcut names -> advfast's (torchvision's) downsample.0 / .1."""
    out = {}
    for key, value in state.items():
        key = "." + key
        for old, new in _RENAMES:
            key = key.replace(old, new)
        out[key[1:]] = value
    return out


def _normalisation(state: dict, spec: PublishedFormat):
    # buffers saved with the model win over the format's constants (they are what the model used)
    mean, std = state.pop("normalize.mean", None), state.pop("normalize.std", None)
    if mean is not None and std is not None:
        return tuple(float(v) for v in mean.flatten()), tuple(float(v) for v in std.flatten())
    return spec.mean, spec.std


def _arch(state: dict, spec: PublishedFormat, path: Path) -> str:
    blocks = []
    for layer in range(1, 5):
        indices = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{layer}.") and k.split(".")[1].isdigit()}
        blocks.append(len(indices))
    bottleneck = any(k.endswith(".conv3.weight") for k in state)
    stem = state.get("conv1.weight")
    if stem is None or stem.dim() != 4 or tuple(stem.shape[:2]) != (64, 3):
        shape = "missing" if stem is None else f"of shape {tuple(stem.shape)}"
        raise InteropError(f"{path}: the stem conv1.weight is {shape}; a CIFAR ResNet has (64, 3, 3, 3)")
    if tuple(blocks) == (2, 2, 2, 2) and not bottleneck:
        arch = "resnet18"
    elif tuple(blocks) == (3, 4, 6, 3) and bottleneck:
        arch = "resnet50"
    else:
        kind = "Bottleneck" if bottleneck else "BasicBlock"
        raise InteropError(f"{path}: a ResNet with {tuple(blocks)} {kind}s per stage; advfast imports ResNet-18 "
                           "(2, 2, 2, 2 BasicBlocks) and ResNet-50 (3, 4, 6, 3 Bottlenecks)")
    if spec.stem_padding == 2:
        if arch != "resnet18":
            raise InteropError(f"{path}: a {spec.name} {arch} (padding-2 stem) has no advfast arch; only ResNet-18")
        return "resnet18_solo"
    return arch


def _check_and_load(encoder, state: dict, spec: PublishedFormat, path: Path, arch: str) -> None:
    expected = encoder.state_dict()
    for key, value in expected.items():
        # files from before PyTorch 0.4.1 have no BN step counters; they do not affect the forward
        if key not in state and key.endswith("num_batches_tracked"):
            state[key] = value.clone()
        if key.startswith("normalize.") and key not in state:
            state[key] = value.clone()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} {arch} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
        raise InteropError(f"{path} does not fit the {spec.name} layout: {'; '.join(parts)}")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise InteropError(f"{path}: {key} has shape {tuple(state[key].shape)}, a {arch} encoder expects "
                               f"{tuple(value.shape)}")
    encoder.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _epoch(payload):
    value = payload.get("epoch") if isinstance(payload, Mapping) else None
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None
