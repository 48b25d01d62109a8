"""torch.compile of an encoder, one compiled variant per way the methods call it.

Methods call one encoder in several ways within a step: per BN branch, in train or eval mode,
with or without grad mode (clean features under no_grad), on inputs that need a gradient (the
attack) or not, with trainable or frozen parameters (attacks freeze them: see
:func:`advfast.attacks.input_only_gradients`). Each is a different graph, and ``module.compile``
would keep them all as cache entries of one code object: AdvCL reaches torch's recompile limit
(8) within its first step, and every further variant then silently runs eagerly.

:func:`compile_encoder` instead dispatches on that call signature in Python and gives every
variant its own ``torch.compile`` of its own copy of the calling code, so each variant has its own
cache and recompile budget (left for real changes: a new batch size marks the batch dimension
dynamic once), and the guard check of one call looks at one variant's entries, not all of them.
Image inputs are put in the model's memory layout first (contiguous, or channels_last for a
channels_last model), so that their strides (an FFT's real view, an NCHW batch for an NHWC model)
do not become another guard. Compilation is in place: state-dict keys do not change.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


def _call_module(module: nn.Module, *args, **kwargs):
    return module._call_impl(*args, **kwargs)


def _fresh_code_copy(n: int):
    """A function with the body of _call_module on its own code object: dynamo keeps its compiled
    entries (and counts recompiles) per code object, so each variant gets a separate cache."""
    code = _call_module.__code__.replace(co_name=f"encoder_variant_{n}")
    return types.FunctionType(code, _call_module.__globals__, code.co_name)


def _model_layout(module: nn.Module) -> torch.memory_format:
    """channels_last when the model's first conv weight is (module.to(memory_format=...)), else contiguous."""
    weight = next((p for p in module.parameters() if p.dim() == 4), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class CompiledVariants:
    """The callable ``compile_encoder`` installs as ``module._compiled_call_impl``."""

    def __init__(self, module: nn.Module, **compile_kwargs: Any):
        self.module = module
        self.compile_kwargs = compile_kwargs
        self.variants: dict[tuple, Any] = {}

    def signature(self, args: tuple, kwargs: dict) -> tuple:
        """What changes the traced graph beyond shapes: the non-tensor arguments (the BN branch),
        train/eval, grad mode, whether the input needs a gradient, whether the parameters do."""
        x = args[0] if args else next(iter(kwargs.values()), None)
        param = next(self.module.parameters(), None)
        extra = tuple(a for a in args[1:] if not isinstance(a, torch.Tensor))
        named = tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor)))
        return (extra, named, self.module.training, torch.is_grad_enabled(),
                isinstance(x, torch.Tensor) and x.requires_grad, param is not None and param.requires_grad)

    def __call__(self, *args, **kwargs):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 4:  # images in the model's layout: one set of strides
            layout = _model_layout(self.module)
            if not x.is_contiguous(memory_format=layout):
                args = (x.contiguous(memory_format=layout),) + args[1:]
        try:
            key = self.signature(args, kwargs)
            compiled = self.variants.get(key)
        except TypeError:  # an unhashable argument: one shared variant for such calls
            key, compiled = None, self.variants.get(None)
        if compiled is None:
            compiled = self.variants[key] = torch.compile(_fresh_code_copy(len(self.variants)), **self.compile_kwargs)
        return compiled(self.module, *args, **kwargs)


def compile_encoder(module: nn.Module, backend: str = "inductor", **compile_kwargs: Any) -> nn.Module:
    """Compile ``module`` in place (as ``module.compile``), one compiled variant per call signature."""
    module._compiled_call_impl = CompiledVariants(module, backend=backend, **compile_kwargs)
    return module
