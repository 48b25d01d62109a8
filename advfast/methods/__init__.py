"""Methods: one module each, registered by name (``METHODS[name] -> class``).

simclr and acl (simclr.py, acl.py); moco, amoc and moco-adv (moco.py, amoc.py, moco_adv.py);
advcl and rocl (advcl.py, rocl.py). Each module registers its class with ``@register`` on import.
"""

from advfast.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if getattr(cls, "name", None) in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


# in the order the benchmark and digits tables list them (registration order): clean, then adversarial
from advfast.methods import simclr, moco, acl, amoc, moco_adv, advcl, rocl, dynacl, deacl  # noqa: E402,F401,I001  (registration)

__all__ = ["METHODS", "Method", "register"]
