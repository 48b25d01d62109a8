"""Declared limits of a method's options: choices and ranges on the ``Options`` dataclass's fields.

    @dataclasses.dataclass
    class Options:
        loss_form: str = option("official", choices=("official", "paper"))
        leverage: float = option(0.5, low=0, high=1, rule="in [0, 1] (the paper uses 0.5)")

``check_declared(options)`` refuses a value outside its field's limits with one line,
``method.<field> must be <rule>, got <value>``; ``Method`` runs it when a method is built and when a
config is validated (``Method.check_options``, after config.validate's own type and finiteness checks).
None always passes (an optional field's "not set").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_KEY = "advfast_limits"


def option(default: Any, *, choices: tuple | None = None, low: float | None = None, above: float | None = None,
           high: float | None = None, rule: str | None = None):
    """A dataclass field with ``default`` whose value must be one of ``choices``, or >= ``low``,
    > ``above`` and <= ``high`` (each optional). ``rule`` replaces the generated text of the error
    ("must be <rule>"), e.g. to say what the value means."""
    if choices is None and low is None and above is None and high is None:
        raise ValueError("option() needs choices or a bound (low, above, high)")
    if choices is not None and (low, above, high) != (None, None, None):
        raise ValueError("option() takes choices or bounds, not both")
    limits = {"choices": tuple(choices) if choices is not None else None, "low": low, "above": above,
              "high": high, "rule": rule or _rule(choices, low, above, high)}
    return dataclasses.field(default=default, metadata={_KEY: limits})


def _rule(choices, low, above, high) -> str:
    if choices is not None:
        shown = [repr(c) for c in choices]
        return " or ".join(shown) if len(shown) <= 2 else "one of " + ", ".join(shown)
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    parts = [f">= {low}" if low is not None else None, f"> {above}" if above is not None else None,
             f"<= {high}" if high is not None else None]
    return " and ".join(p for p in parts if p)


def _within(value: Any, limits: dict) -> bool:
    if limits["choices"] is not None:
        return value in limits["choices"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return ((limits["low"] is None or value >= limits["low"]) and (limits["above"] is None or value > limits["above"])
            and (limits["high"] is None or value <= limits["high"]))


def check_declared(options: Any) -> None:
    """Raise ValueError naming the first field of ``options`` (a dataclass) outside its declared limits."""
    for f in dataclasses.fields(options):
        limits = f.metadata.get(_KEY)
        value = getattr(options, f.name)
        if limits is None or value is None or _within(value, limits):
            continue
        shown = repr(value) if isinstance(value, str) else value
        raise ValueError(f"method.{f.name} must be {limits['rule']}, got {shown}")


def declared_limits(options_class: type) -> dict[str, dict]:
    """{field: its limits} of an Options dataclass (for docs and tests)."""
    return {f.name: dict(f.metadata[_KEY]) for f in dataclasses.fields(options_class) if _KEY in f.metadata}
