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
from pathlib import Path
from typing import Any, Literal

from .errors import TorchcvtError, shorten, shown
from .paths import input_file_problem

Check = Callable[[str, Any], Any]


def option(default: Any, **rules: Any) -> Any:
    """A dataclass field with value rules for check_fields: low, high, above, below (bounds, for a pair
    on each number; every count a user gives has a high one), ordered (a pair must be [low, high]; default
    true), of (what a mapping maps), check (a callable(key, value) run after the type check)."""
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=rules)
    return dataclasses.field(default=default, metadata=rules)


# ----------------------------------------------------------------------------- reading values


# A config is a few kilobytes; these bound what a hostile or mistaken one can cost before it is checked.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000  # scalars, lists and mappings, with every alias expanded

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
# YAML 1.2's core schema (plus 1_000 digit groups): 010 is ten and 1:30 no number, where YAML 1.1 reads
# octal 8 and base-60 90.
_INT_FORMS = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_FORMS = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def read_config_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML in a config file: a one-line error naming it when it is not a regular file, is larger than
    MAX_CONFIG_BYTES, is not UTF-8 or is not valid YAML."""
    path = Path(path)
    problem = input_file_problem(path)
    if problem is not None:
        raise TorchcvtError(f"{what} {path} {problem}")
    with open(path, "rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise TorchcvtError(f"{what} {path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TorchcvtError(f"{what} {path} is not UTF-8 text (byte {error.start} is not)") from None
    return read_yaml(text, f"{what} {path}")


def read_yaml(text: str, origin: str) -> Any:
    """Parse YAML text strictly; a syntax error, a repeated key or more than MAX_YAML_VALUES values (aliases
    expanded) is a one-line error naming origin. Merge keys (<<: *base) work.

    Numbers follow YAML 1.2: 1e-6 is a float, 010 is ten and 1:30 a string (which a number's check refuses,
    naming the key), where PyYAML's YAML 1.1 reads a string, 8 and 90.
    """
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise TorchcvtError(f"{origin} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise TorchcvtError(
            f"{shorten(origin, 200)} is not valid YAML: {shorten(problem, 200)}{where}") from None


@functools.cache
def _strict_loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_document(self, node: yaml.Node) -> Any:
            _count_values(node, {}, set())
            return super().construct_document(node)

        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shown(key)}", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep)

        def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
            text = self.construct_scalar(node)
            if not _INT_FORMS.match(text):
                raise yaml.constructor.ConstructorError(
                    None, None, f"{shown(text)} is not an integer", node.start_mark)
            base = {"0o": 8, "0x": 16}.get(text[:2], 10)
            return int(text[2:] if base != 10 else text.replace("_", ""), base)

    StrictLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    StrictLoader.add_implicit_resolver(_INT, _INT_FORMS, list("-+0123456789"))
    StrictLoader.add_implicit_resolver(_FLOAT, _FLOAT_FORMS, list("-+0123456789."))
    StrictLoader.add_constructor(_INT, StrictLoader.construct_yaml_int)
    return StrictLoader


def _count_values(node: Any, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values node stands for with every alias expanded; an error beyond MAX_YAML_VALUES (a
    'billion laughs' document) or for a value that contains itself."""
    import yaml

    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.constructor.ConstructorError(None, None, "a value contains itself (a recursive alias)",
                                                node.start_mark)
    open_nodes.add(key)
    children = [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else (
        node.value if isinstance(node, yaml.SequenceNode) else [])
    size = 1 + sum(_count_values(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    if size > MAX_YAML_VALUES:
        raise yaml.constructor.ConstructorError(
            None, None, f"more than {MAX_YAML_VALUES} values with aliases expanded", node.start_mark)
    sizes[key] = size
    return size


def parse_assignment(
    text: str, what: str = "override", example: str = "train.epochs=10", key_name: str = "KEY"
) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', 0.001): the value read as YAML (an empty one is None)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise TorchcvtError(f"{what} expects {key_name}=VALUE (e.g. {example}), got {shown(text)}")
    value = read_yaml(raw, f"the value of {what} {shown(text)}") if raw.strip() else None
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
    # difflib's cost grows with the key's length squared: a key longer than any real one gets no hint.
    close = difflib.get_close_matches(key, keys(cls), n=1, cutoff=0.5) if len(key) <= 100 else []
    where = f" in {origin}" if origin else ""
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return TorchcvtError(f"unknown {noun} {shown(key)}{where}{hint}")


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
                raise TorchcvtError(f"{noun} {dotted!r}{where} is a section; got {shown(value)}")
            merge(hint, tree.setdefault(key, {}), value, origin, noun, root, dotted + ".")
        elif _is_mapping(hint):
            if value is not None and not isinstance(value, Mapping):
                raise TorchcvtError(f"{noun} {dotted!r}{where} must be a mapping, got {shown(value)}")
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
        raise TorchcvtError(f"{origin or cls.__name__} must be a mapping of {noun}s, got {shown(data)}")
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
        check = _integer(rules.get("low"), rules.get("high"), optional)
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


def _integer(low: int | None, high: int | None, optional: bool) -> Check:
    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not _is_number(value, integral=True):
            raise TorchcvtError(f"{key} must be an integer{_null(optional)}, got {shown(value)}")
        if low is not None and value < low:
            raise TorchcvtError(f"{key} must be at least {low}, got {shown(value)}")
        if high is not None and value > high:
            raise TorchcvtError(f"{key} must be at most {high}, got {shown(value)}")
        return value

    return check


def _real(rules: dict[str, Any], optional: bool) -> Check:
    low, high, above, below = (rules.get(name) for name in ("low", "high", "above", "below"))

    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not _is_number(value, integral=False) or not math.isfinite(value):
            raise TorchcvtError(f"{key} must be a number{_null(optional)}, got {shown(value)}")
        if low is not None and (value < low or (above and value == low)):
            raise TorchcvtError(f"{key} must be {'above' if above else 'at least'} {low}, got {value}")
        if high is not None and (value > high or (below and value == high)):
            raise TorchcvtError(f"{key} must be {'below' if below else 'at most'} {high}, got {value}")
        return float(value)

    return check


def _flag() -> Check:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, bool):
            raise TorchcvtError(f"{key} must be true or false, got {shown(value)}")
        return value

    return check


def _text(choices: Sequence[str] | None, optional: bool) -> Check:
    def check(key: str, value: Any) -> Any:
        if value is None and optional:
            return None
        if not isinstance(value, str) or (choices is None and not value):
            raise TorchcvtError(f"{key} must be a non-empty string{_null(optional)}, got {shown(value)}")
        if choices is not None and value not in choices:
            raise TorchcvtError(
                f"{key} must be one of {', '.join(choices)}{_null(optional)}, got {shown(value)}")
        return value

    return check


def _pair(item: Check, ordered: bool) -> Check:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise TorchcvtError(f"{key} must be a list of two numbers, got {shown(value)}")
        low, high = (item(f"{key}[{i}]", v) for i, v in enumerate(value))
        if ordered and low > high:
            raise TorchcvtError(f"{key} must be [low, high] with low <= high, got {shown(list(value))}")
        return (low, high)

    return check


def _mapping(what: str) -> Check:
    def check(key: str, value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise TorchcvtError(f"{key} must be a mapping of {what}, got {shown(value)}")
        return dict(value)

    return check


# ----------------------------------------------------------------------------- comparing configs


class _Unset:
    """The value of a key one side of a comparison does not have."""

    def __repr__(self) -> str:
        return "unset"


UNSET: Any = _Unset()


def flatten(tree: Any) -> dict[str, Any]:
    """A config (a dataclass, nested sections, or dotted keys already) as {dotted key: plain value}: sections
    and mapping fields alike are opened (model.overrides.depth), tuples become lists."""
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and value:
                visit(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = {} if isinstance(value, Mapping) else to_dict(value)

    visit(to_dict(tree), "")
    return flat


def differences(old: Any, new: Any, ignore: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old value, new value)} for every key whose value differs between two configs (see
    flatten), in key order; a key one side lacks has the value UNSET there. Keys under `ignore` (a key or
    a section) are left out. The one comparison of configs: resume checks and suite records use it."""
    ours, theirs = flatten(old), flatten(new)
    skipped = tuple(ignore)
    changes = {}
    for key in sorted(set(ours) | set(theirs)):
        if any(key == prefix or key.startswith(f"{prefix}.") for prefix in skipped):
            continue
        before, after = ours.get(key, UNSET), theirs.get(key, UNSET)
        if before is UNSET and after == {} or after is UNSET and before == {}:
            continue  # an empty mapping is no setting
        if before != after:
            changes[key] = (before, after)
    return changes


def describe_changes(changes: Mapping[str, tuple[Any, Any]], limit: int | None = None) -> str:
    """The changes as 'key: old -> new; ...', values as JSON (null, true, "text"); the first `limit`
    of them and how many more."""
    import json

    def show(value: Any) -> str:
        return "unset" if value is UNSET else json.dumps(value, default=str)

    items = [f"{key}: {show(old)} -> {show(new)}" for key, (old, new) in changes.items()]
    shown = items if limit is None else items[:limit]
    more = len(items) - len(shown)
    return "; ".join(shown) + (f" and {more} more" if more else "")
