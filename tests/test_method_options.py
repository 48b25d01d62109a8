"""Declared option limits (advfast.methods.options): one-line errors when a method is built and when a config
is validated, the same text either way."""

import dataclasses

import pytest

from advfast.config import validate
from advfast.engine import build_config, method_class
from advfast.methods.options import check_declared, declared_limits, option


@dataclasses.dataclass
class Demo:
    form: str = option("a", choices=("a", "b"))
    mode: str = option("x", choices=("x", "y", "z"))
    weight: float = option(0.5, low=0, high=1)
    temp: float = option(0.1, above=0, rule="> 0 (a temperature)")
    width: int | None = option(None, low=1)
    free: int = 3


@pytest.mark.parametrize("change, message", [
    ({"form": "c"}, "method.form must be 'a' or 'b', got 'c'"),
    ({"mode": "w"}, "method.mode must be one of 'x', 'y', 'z', got 'w'"),
    ({"weight": 1.5}, r"method.weight must be in \[0, 1\], got 1.5"),
    ({"weight": float("nan")}, r"method.weight must be in \[0, 1\], got nan"),
    ({"temp": 0.0}, r"method.temp must be > 0 \(a temperature\), got 0.0"),
    ({"temp": float("inf")}, r"method.temp must be > 0 \(a temperature\), got inf"),
    ({"width": 0}, "method.width must be >= 1, got 0"),
])
def test_values_outside_their_limits_are_one_line_errors(change, message):
    check_declared(Demo())  # the defaults pass, None passes
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_declared(dataclasses.replace(Demo(), **change))


def test_limits_are_readable_and_bad_declarations_refused():
    assert set(declared_limits(Demo)) == {"form", "mode", "weight", "temp", "width"}
    with pytest.raises(ValueError, match="needs choices or a bound"):
        option(1)
    with pytest.raises(ValueError, match="not both"):
        option(1, choices=(1,), low=0)


@pytest.mark.parametrize("method, key, value, message", [
    ("rocl", "loss_form", "eq3", "method.loss_form must be 'official' or 'paper', got 'eq3'"),
    ("amoc", "leverage", 2, r"method.leverage must be in \[0, 1\] \(the paper uses 0.5\), got 2.0"),
    ("moco-adv", "clean_weight", -0.5, r"method.clean_weight must be in \[0, 1\], got -0.5"),
    ("acl", "input_stats", "cifar", "method.input_stats must be 'imagenet' or 'dataset', got 'cifar'"),
    ("advcl", "base_temperature", 0, r"method.base_temperature must be > 0 \(SupConLoss's 0.07\), got 0.0"),
])
def test_methods_refuse_the_same_way_when_built_and_when_validated(method, key, value, message):
    cfg = build_config(method, None, "digits", overrides=[{"device": "cpu", "method_options": {key: value}}])
    with pytest.raises(ValueError, match=f"^{message}$"):
        validate(cfg)
    with pytest.raises(ValueError, match=f"^{message}$"):
        method_class(method)(cfg, 10, (0.5,) * 3, (0.25,) * 3)
