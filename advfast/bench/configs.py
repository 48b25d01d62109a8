"""The engine configurations the benchmarks compare: "eager", "fast", and the ablation rows.

"eager" is what the official codes do: fp32, per-image torchvision augmentation on the CPU in
DataLoader workers, the plain-torch version of every op, attack gradients by ``loss.backward()``
(weight gradients computed and thrown away), contiguous (NCHW) tensors, no compilation.
"fast" turns every optimisation on. Each ablation row is "fast" with one optimisation off, so the
loss of speed in that row is what the optimisation buys on its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from advfast.config import closest

# name -> what it means, in the order the table lists the ablation rows
OPTIMISATIONS = {
    "bf16": "bf16 autocast (fp32 master weights and perturbations)",
    "channels_last": "channels_last memory format for images and weights",
    "input_grads": "attack gradients w.r.t. the input only (torch.autograd.grad) instead of loss.backward()",
    "gpu_augment": "batched augmentation on the device (torch backend) instead of torchvision in CPU workers",
    "fused_ops": "fused ops (pgd_step_, info_nce/nt_xent, ema_update_) on their fastest backend instead of torch",
    "compile": "torch.compile of the encoder (CUDA only: on a CPU compiling costs more than it saves here)",
}


@dataclass(frozen=True)
class Switches:
    bf16: bool
    channels_last: bool
    input_grads: bool
    gpu_augment: bool
    fused_ops: bool
    compile: bool
    cuda_graph_attack: bool = False  # not in "fast": it excludes compile (see the "fast-graphs" row)

    def off(self, name: str) -> "Switches":
        return dataclasses.replace(self, **{name: False})

    def on_device(self, device_type: str) -> "Switches":
        """What actually runs on ``device_type``: compile only pays on a GPU, CUDA graphs need one."""
        return self if device_type == "cuda" else dataclasses.replace(self, compile=False, cuda_graph_attack=False)

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


EAGER = Switches(bf16=False, channels_last=False, input_grads=False, gpu_augment=False, fused_ops=False,
                 compile=False)
FAST = Switches(bf16=True, channels_last=True, input_grads=True, gpu_augment=True, fused_ops=True, compile=True)
# FLOPs are counted once per method with these: plain fp32 ops the counter knows, input-only attack
# gradients (the model FLOPs of the algorithm, whatever a configuration spends on top).
COUNTING = Switches(bf16=False, channels_last=False, input_grads=True, gpu_augment=True, fused_ops=False,
                    compile=False)

# "fast-graphs": fast with each attack replayed as one CUDA graph instead of a compiled encoder (the
# two are exclusive); an extra row, not an ablation
FAST_GRAPHS = dataclasses.replace(FAST, compile=False, cuda_graph_attack=True)
CONFIGS: dict[str, Switches] = {"eager": EAGER, "fast": FAST,
                                **{f"fast-no-{name}": FAST.off(name) for name in OPTIMISATIONS},
                                "fast-graphs": FAST_GRAPHS}
ABLATION = tuple(f"fast-no-{name}" for name in OPTIMISATIONS)


def expand_configs(names) -> list[str]:
    """Config names in order, "ablation" expanded to its rows, duplicates dropped.

    Accepts a comma-separated string or a list; unknown names raise ValueError naming the choices.
    """
    if isinstance(names, str):
        names = [n for n in (part.strip() for part in names.split(",")) if n]
    if not names:
        raise ValueError("--configs is empty; give e.g. eager,fast or eager,fast,ablation")
    out: list[str] = []
    for name in names:
        expanded = ABLATION if name == "ablation" else (name,)
        for n in expanded:
            if n not in CONFIGS:
                choices = list(CONFIGS) + ["ablation"]
                raise ValueError(f"unknown config {n!r}{closest(n, choices)}; choose from {', '.join(choices)}")
            if n not in out:
                out.append(n)
    return out
