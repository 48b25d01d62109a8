"""Writing an advfast encoder in the layout the RobustSSL benchmark's fine-tuning script loads.

GodXuxilie/RobustSSL_Benchmark, Finetuning_Methods/Vanilla_Finetuning/utils.py ``get_model`` reads
``torch.load(f)['state_dict']`` and, for ``--pretraining ACL`` / ``DynACL`` (and DynACL++ / -AIR / -RCS),
expects ACL's dual-BN ResNet keys (models/resnet_multi_bn.py): every BatchNorm as
``<layer>.bn_list.0.*`` ('normal') and ``<layer>.bn_list.1.*`` ('pgd'), downsample as
``downsample.conv`` / ``downsample.bn``, and the input normalisation as ``normalize.mean/std``
buffers. SLF/ALF keep ``bn_list.1`` (``cvt_state_dict`` with bnNameCnt 1) in a single-BN
models/resnet.py; AFF (``--dualBN 1``) loads both branches into the dual-BN model. Both models
normalise inside (``do_normalize=1``) with the buffers loaded from the file, so an encoder without
normalisation is written with mean 0 and std 1.

That model is a torchvision-style CIFAR ResNet-18/34/50 with a 3x3 padding-1 stem and 3 input
channels: any other encoder is refused with one line.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from advfast.interop.errors import InteropError

EXPORTABLE_ARCHS = {"resnet18": "r18", "resnet50": "r50"}  # advfast arch -> the benchmark's --model


def check_exportable(encoder: nn.Module) -> str:
    """The benchmark's --model name for ``encoder``; InteropError if its layout cannot hold it."""
    arch = getattr(encoder, "arch", type(encoder).__name__)
    if arch not in EXPORTABLE_ARCHS:
        raise InteropError(f"the RobustSSL benchmark loads torchvision-style CIFAR ResNet-18/50 (models/resnet.py, "
                           f"3x3 padding-1 stem); a {arch} encoder cannot be written in its layout")
    if getattr(encoder, "in_channels", 3) != 3:
        raise InteropError(f"the RobustSSL benchmark's ResNet takes 3-channel images; this encoder takes "
                           f"{encoder.in_channels} (pre-trained on a grayscale dataset?)")
    if len(getattr(encoder, "branches", ("normal",))) != 1:
        raise InteropError("give single-branch encoders (one per BN branch), e.g. from advfast.models.to_single_branch")
    return EXPORTABLE_ARCHS[arch]


def robustssl_state_dict(eval_encoder: nn.Module, normal_encoder: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """ACL-layout state dict: ``eval_encoder``'s BN statistics as branch 'pgd' (bn_list.1, what SLF/ALF
    and the adversarial half of AFF use), ``normal_encoder``'s as 'normal' (bn_list.0; default: the same)."""
    check_exportable(eval_encoder)
    if normal_encoder is None:
        normal_encoder = eval_encoder
    else:
        check_exportable(normal_encoder)
    bn_names = {name for name, m in eval_encoder.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    pgd, normal = eval_encoder.state_dict(), normal_encoder.state_dict()
    if pgd.keys() != normal.keys():
        raise InteropError("the two BN branches come from encoders of different architectures")
    out: dict[str, torch.Tensor] = {}
    for key, value in pgd.items():
        module, _, field = key.rpartition(".")
        if key.startswith("normalize."):
            continue
        target = module.replace("downsample.0", "downsample.conv").replace("downsample.1", "downsample.bn")
        if module in bn_names:
            out[f"{target}.bn_list.0.{field}"] = _cpu(normal[key])
            out[f"{target}.bn_list.1.{field}"] = _cpu(value)
        else:
            if not torch.equal(value, normal[key]):
                raise InteropError(f"the BN branches disagree on the shared weight {key}; "
                                   "export branches of one encoder")
            out[f"{target}.{field}"] = _cpu(value)
    norm = getattr(eval_encoder, "normalize", None)
    if isinstance(norm, nn.Identity) or norm is None:
        out["normalize.mean"] = torch.zeros(3)
        out["normalize.std"] = torch.ones(3)
    else:
        out["normalize.mean"] = _cpu(norm.mean)
        out["normalize.std"] = _cpu(norm.std)
    return out


def _cpu(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu", copy=True).contiguous()
    return t.float() if t.is_floating_point() else t


def save_robustssl(state: dict[str, torch.Tensor], out, info: dict | None = None) -> Path:
    """Write ``{'state_dict': state, 'advfast': info}`` atomically (a crash leaves no half file)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save({"state_dict": state, "advfast": dict(info or {})}, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def export_run_to_robustssl(run_dir, out, bn_branch: str | None = None) -> tuple[Path, dict]:
    """Export an advfast-train run directory's encoder for the benchmark. The evaluation branch (or
    ``bn_branch``) becomes 'pgd'; the run's 'normal' branch, when it has one, becomes 'normal'.
    Returns (file written, info: arch, the benchmark's --model, branches used)."""
    import advfast
    from advfast.models.export import load_encoder

    eval_encoder, meta = load_encoder(run_dir, bn_branch)
    model = check_exportable(eval_encoder)
    normal_name = "normal" if "normal" in meta.get("branches", []) and meta["bn_branch"] != "normal" else None
    normal_encoder = load_encoder(run_dir, normal_name)[0] if normal_name else None
    state = robustssl_state_dict(eval_encoder, normal_encoder)
    info = {"advfast_version": advfast.__version__, "arch": meta["arch"], "model": model,
            "method": meta.get("method"), "dataset": meta.get("dataset"), "pgd_branch": meta["bn_branch"],
            "normal_branch": normal_name or meta["bn_branch"], "source": str(meta.get("run_dir", run_dir))}
    return save_robustssl(state, out, info), info
