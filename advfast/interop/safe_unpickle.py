"""Reading published checkpoints without running code from them.

Published files carry more than tensors: optimizer state, epochs, accuracies as numpy scalars,
argparse Namespaces and, in PyTorch Lightning ``.ckpt`` files, an ``AttributeDict`` of
hyper-parameters and callback states keyed by Lightning classes. ``torch.load(weights_only=True)``
refuses the last two, and plain unpickling would run whatever the file names. :func:`load_checkpoint`
tries ``weights_only=True`` first and falls back to :class:`AllowListUnpickler`, which resolves only
the globals listed here: torch's tensor rebuilders, a few builtins and numpy scalar/array types,
``argparse.Namespace``, and inert stand-ins for Lightning classes (Lightning is never imported).
Anything else fails with one line naming the refused global.
"""

from __future__ import annotations

import argparse
import collections
import pickle
from pathlib import Path

import torch

from advfast.interop.errors import InteropError

_TORCH_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"), ("torch", "device"), ("torch.nn.parameter", "Parameter"), ("torch", "Tensor"),
}
_BUILTINS = {("builtins", n) for n in ("set", "frozenset", "slice", "complex", "bytearray", "range")}
_CODECS = {("_codecs", "encode")}  # protocol-2 pickles spell bytes (numpy scalars' payload) as encode(str, "latin1")
_NUMPY = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("scalar", "_reconstruct")}
_NUMPY |= {("numpy", "ndarray"), ("numpy", "dtype")}
_OTHERS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
}
# Lightning's hyper-parameter container; loaded as a plain dict subclass
_ATTRIBUTE_DICTS = {("pytorch_lightning.utilities.parsing", "AttributeDict"),
                    ("lightning_fabric.utilities.data", "AttributeDict"),
                    ("lightning.fabric.utilities.data", "AttributeDict")}
_LIGHTNING_ROOTS = ("pytorch_lightning", "lightning", "lightning_fabric")


class AttributeDict(dict):
    """Stand-in for Lightning's AttributeDict: a dict whose keys are also attributes."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class LightningStandIn:
    """Inert stand-in for any other Lightning class a checkpoint names (callback classes used as
    dictionary keys, enum-like states): it keeps its qualified name and the data it was given, and
    runs nothing."""

    qualname = ""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<{self.qualname} (not loaded)>"


_STAND_INS: dict[str, type] = {}


def _lightning_stand_in(module: str, name: str) -> type:
    qualname = f"{module}.{name}"
    if qualname not in _STAND_INS:
        _STAND_INS[qualname] = type(name, (LightningStandIn,), {"qualname": qualname})
    return _STAND_INS[qualname]


def _numpy_global(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def resolve_global(module: str, name: str):
    """The object the allow-list maps ``module.name`` to; UnpicklingError for anything else."""
    key = (module, name)
    if key in _TORCH_REBUILDERS:
        obj = torch
        for part in module.split(".")[1:] + [name]:
            obj = getattr(obj, part)
        return obj
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if key in _BUILTINS:
        import builtins

        return getattr(builtins, name)
    if key in _CODECS:
        import _codecs

        return _codecs.encode
    if key in _OTHERS:
        return _OTHERS[key]
    if key in _NUMPY or (module == "numpy.dtypes" and name.endswith("DType")):
        try:
            return _numpy_global(module, name)
        except (ImportError, AttributeError):
            pass
    if key in _ATTRIBUTE_DICTS:
        return AttributeDict
    if module.split(".")[0] in _LIGHTNING_ROOTS:
        return _lightning_stand_in(module, name)
    raise pickle.UnpicklingError(f"refused global {module}.{name} "
                                 "(not on advfast's allow-list of checkpoint payload types)")


class AllowListUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals (see :func:`resolve_global`)."""

    def find_class(self, module, name):
        return resolve_global(module, name)


class _AllowListPickleModule:
    """The ``pickle_module`` handed to torch.load: torch subclasses ``Unpickler`` and keeps our find_class."""

    Unpickler = AllowListUnpickler
    UnpicklingError = pickle.UnpicklingError
    __name__ = "advfast.interop.safe_unpickle"

    @staticmethod
    def load(file, **kwargs):
        return AllowListUnpickler(file, **kwargs).load()


def load_checkpoint(path) -> object:
    """The payload of a torch checkpoint file on the CPU, never running code from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # a non-tensor payload weights_only does not know: try the allow-list
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InteropError(f"{path} is not a readable torch checkpoint ({_first_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_AllowListPickleModule)
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refused global"):
            raise InteropError(f"{path}: {_first_line(exc)}") from None
        raise InteropError(f"{path} is not a readable torch checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as exc:
        raise InteropError(f"{path} is not a readable torch checkpoint ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
