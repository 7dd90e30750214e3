"""Dataclass configs from mappings and KEY=VALUE text: one parser and one set of checks for every config.

Serves the model config (CvtConfig, `--set FIELD=VALUE`) and the training config (YAML files and dotted
`section.key=VALUE` overrides). Imports nothing of torchcvt.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from .errors import TorchcvtError

Check = Callable[[str, Any], Any]


def option(default: Any, **rules: Any) -> Any:
    """A dataclass field with value rules for check_fields: low, high, above, below (bounds, for a pair
    on each number), ordered (a pair must be [low, high]; default true), of (what a mapping maps), check
    (a callable(key, value) run after the type check)."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=rules)
    return dataclasses.field(default=default, metadata=rules)


# ----------------------------------------------------------------------------- reading values


def read_yaml(text: str, origin: str) -> Any:
    """Parse YAML text strictly; a syntax error or a repeated key is a one-line ValueError naming origin.

    1e-6 reads as a float (as in YAML 1.2), not as the string PyYAML's YAML 1.1 makes of it.
    """
    import yaml

    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise TorchcvtError(f"{origin} is not valid YAML: {problem}{where}") from None


@functools.cache
def _strict_loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

    # YAML 1.1 wants a dot and a signed exponent in a float, so it reads 1e-6 and 5e3 as strings.
    StrictLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
    )
    return StrictLoader


def parse_assignment(
    text: str, what: str = "override", example: str = "train.epochs=10", key_name: str = "KEY"
) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001): the value read as YAML (an empty one is None)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TorchcvtError(f"{what} expects {key_name}=VALUE (e.g. {example}), got {text!r}")
    value = read_yaml(raw, f"the value of {what} {text!r}") if raw.strip() else None
    return key.strip(), value


# ----------------------------------------------------------------------------- structure


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Each field's resolved type annotation."""
    resolved = typing.get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls)}


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _is_mapping(hint: Any) -> bool:
    return hint is dict or typing.get_origin(hint) is dict


def keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of cls: sections, then (depth first) their keys. A mapping's own keys are free."""
    found = []
    for name, hint in _hints(cls).items():
        found.append(prefix + name)
        if _is_section(hint):
            found += keys(hint, f"{prefix}{name}.")
    return found


def unknown_key(key: str, cls: type, origin: str | None, noun: str = "config key") -> TorchcvtError:
    """A TorchcvtError naming key, where it came from and the closest key cls knows."""
    close = difflib.get_close_matches(key, keys(cls), n=1, cutoff=0.5)
    where = f" in {origin}" if origin else ""
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TorchcvtError(f"unknown {noun} {key!r}{where}{hint}")


def merge(
    cls: type, tree: dict[str, Any], update: Mapping[str, Any], origin: str | None,
    noun: str = "config key", root: type | None = None, prefix: str = "",
) -> None:
    """Merge a nested mapping (a YAML file) into tree, a plain-dict image of cls; unknown keys are errors."""
    root = root or cls
    hints = _hints(cls)
    where = f" in {origin}" if origin else ""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise unknown_key(dotted, root, origin, noun)
        hint = hints[key]
        if _is_section(hint):
            if not isinstance(value, Mapping):
                raise TorchcvtError(f"{noun} {dotted!r}{where} is a section; got {value!r}")
            merge(hint, tree.setdefault(key, {}), value, origin, noun, root, dotted + ".")
        elif _is_mapping(hint):
            if value is not None and not isinstance(value, Mapping):
                raise TorchcvtError(f"{noun} {dotted!r}{where} must be a mapping, got {value!r}")
            current = tree.get(key)
            tree[key] = {**(current if isinstance(current, Mapping) else {}), **(value or {})}
        else:
            tree[key] = value


def set_path(
    cls: type, tree: dict[str, Any], key: str, value: Any, origin: str | None = "the command line",
    noun: str = "config key",
) -> None:
    """tree['a']['b'] = value for the key 'a.b' of cls; a key inside a mapping field sets that mapping's
    entry ('model.overrides.depth'). An unknown key is an error naming the closest known one."""
    parts = key.split(".")
    node, level = tree, cls
    for i, part in enumerate(parts):
        hint = _hints(level).get(part)
        last = i == len(parts) - 1
        if hint is None or (not last and not (_is_section(hint) or _is_mapping(hint))):
            raise unknown_key(key, cls, origin, noun)
        if _is_section(hint):
            if last:
                example = next(iter(_hints(hint)))
                raise TorchcvtError(
                    f"{noun} {key!r} in {origin} is a section, not a value; set one of its keys "
                    f"(e.g. {key}.{example}=...)"
                )
            node, level = node.setdefault(part, {}), hint
        elif _is_mapping(hint) and not last:
            current = node.get(part)
            entry = ".".join(parts[i + 1 :])
            node[part] = {**(current if isinstance(current, Mapping) else {}), entry: value}
            return
        else:
            node[part] = value


def from_mapping(
    cls: type, data: Mapping[str, Any], origin: str | None = None, noun: str = "config key"
) -> Any:
    """cls (a dataclass, sections nested) from a nested mapping; missing keys keep their defaults."""
    if not isinstance(data, Mapping):
        raise TorchcvtError(f"{origin or cls.__name__} must be a mapping of {noun}s, got {data!r}")
    tree: dict[str, Any] = {}
    merge(cls, tree, data, origin, noun)
    return build(cls, tree)


def build(cls: type, tree: dict[str, Any]) -> Any:
    """cls from a plain-dict image whose keys merge or set_path checked; the values are checked by cls."""
    hints = _hints(cls)
    return cls(**{key: build(hints[key], value) if _is_section(hints[key]) else value
                  for key, value in tree.items()})


def to_dict(value: Any) -> Any:
    """A dataclass as plain nested dicts and lists (for YAML, JSON and checkpoints)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_dict(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_dict(item) for item in value]
    if isinstance(value, Mapping):
        return {key: to_dict(item) for key, item in value.items()}
    return value


# ----------------------------------------------------------------------------- value checks


def check_fields(instance: Any, prefix: str = "") -> Any:
    """A copy of a dataclass instance with every field checked against its annotation and option rules
    (ints as floats where a float is meant); a ValueError names the first wrong key and its value."""
    values = {}
    for name, check in _checks(type(instance)):
        key = f"{prefix}.{name}" if prefix else name
        values[name] = check(key, getattr(instance, name))
    return dataclasses.replace(instance, **values)


@functools.cache
def _checks(cls: type) -> list[tuple[str, Check]]:
    hints = _hints(cls)
    return [(f.name, _check_for(hints[f.name], dict(f.metadata))) for f in dataclasses.fields(cls)]


def _check_for(hint: Any, rules: dict[str, Any]) -> Check:
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        optional = len(options) < len(typing.get_args(hint))
        if len(options) != 1:
            raise TypeError(f"no check for the annotation {hint}")
        hint = options[0]
    origin = typing.get_origin(hint)
    if hint is bool:
        check = _flag()
    elif hint is int:
        check = _integer(rules.get("low"), optional)
    elif hint is float:
        check = _real(rules, optional)
    elif hint is str or origin is Literal:
        check = _text(typing.get_args(hint) if origin is Literal else None, optional)
    elif origin is tuple and len(typing.get_args(hint)) == 2:
        item_rules = {name: rule for name, rule in rules.items() if name != "check"}
        check = _pair(_check_for(typing.get_args(hint)[0], item_rules), rules.get("ordered", True))
    elif _is_mapping(hint):
        check = _mapping(rules.get("of", "keys to values"))
    else:
        raise TypeError(f"no check for the annotation {hint}")
    extra = rules.get("check")
    if extra is None:
        return check

    def checked(key: str, value: Any) -> Any:
        value = check(key, value)
        extra(key, value)
        return value

    return checked


def _null(optional: bool) -> str:
    return " or null" if optional else ""


def _is_number(value: Any, integral: bool) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if integral else isinstance(value, (int, float))


def _integer(low: int | None, optional: bool) -> Check:
    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not _is_number(value, integral=True):
            raise TorchcvtError(f"{key} must be an integer{_null(optional)}, got {value!r}")
        if low is not None and value < low:
            raise TorchcvtError(f"{key} must be at least {low}, got {value}")
        return value

    return check


def _real(rules: dict[str, Any], optional: bool) -> Check:
    low, high, above, below = (rules.get(name) for name in ("low", "high", "above", "below"))

    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not _is_number(value, integral=False) or not math.isfinite(value):
            raise TorchcvtError(f"{key} must be a number{_null(optional)}, got {value!r}")
        if low is not None and (value < low or (above and value == low)):
            raise TorchcvtError(f"{key} must be {'above' if above else 'at least'} {low}, got {value}")
        if high is not None and (value > high or (below and value == high)):
            raise TorchcvtError(f"{key} must be {'below' if below else 'at most'} {high}, got {value}")
        return float(value)

    return check


def _flag() -> Check:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise TorchcvtError(f"{key} must be true or false, got {value!r}")
        return value

    return check


def _text(choices: Sequence[str] | None, optional: bool) -> Check:
    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str) or (choices is None and not value):
            raise TorchcvtError(f"{key} must be a non-empty string{_null(optional)}, got {value!r}")
        if choices is not None and value not in choices:
            raise TorchcvtError(f"{key} must be one of {', '.join(choices)}{_null(optional)}, got {value!r}")
        return value

    return check


def _pair(item: Check, ordered: bool) -> Check:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise TorchcvtError(f"{key} must be a list of two numbers, got {value!r}")
        low, high = (item(f"{key}[{i}]", v) for i, v in enumerate(value))
        if ordered and low > high:
            raise TorchcvtError(f"{key} must be [low, high] with low <= high, got {list(value)!r}")
        return (low, high)

    return check


def _mapping(what: str) -> Check:
    def check(key: str, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TorchcvtError(f"{key} must be a mapping of {what}, got {value!r}")
        return dict(value)

    return check
