"""Methods: one module each, registered by name."""

from advfast.methods.base import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


__all__ = ["METHODS", "Method", "register"]
