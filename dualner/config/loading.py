"""Loading a config: a YAML (or JSON) file and dotted overrides into the schema's dataclasses.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=3e-5", "data.dev.de=path/dev.tsv"])

Unknown keys are rejected with the valid ones listed; values are checked against the field types and
ranges; `validate` (dualner.config.rules) then checks the rules across fields.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Collection, Literal

import yaml

from dualner.config.rules import EngineRules, validate
from dualner.config.schema import Config
from dualner.errors import ConfigError


def _check_range(value: Any, limits: tuple, key: str) -> None:
    minimum, maximum, above, below = limits
    if value is None or isinstance(value, bool):
        return
    wrong = ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)
             or (above is not None and value <= above) or (below is not None and value >= below))
    if wrong:
        parts = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
                 f"<= {maximum}" if maximum is not None else "", f"< {below}" if below is not None else ""]
        raise ConfigError(f"{key}: {value!r} is out of range (must be {' and '.join(p for p in parts if p)})")



def _check_value(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        choices = [option for option in options if option is not type(None)]
        for option in choices:
            try:
                return _check_value(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        if len(choices) == 1:
            raise ConfigError(errors[0])
        expected = " or ".join(" or ".join(map(repr, typing.get_args(option))) if typing.get_origin(option) is Literal
                               else getattr(option, "__name__", str(option)) for option in choices)
        raise ConfigError(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_check_value(k, key_type, f"{key}.{k}"): _check_value(v, value_type, f"{key}.{k}")
                for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_value(item, item_type, f"{key}[{i}]") for i, item in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads `5e-3` (no dot) as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got str {value!r}") from None
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: {value} is not a finite number")
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a language code or path that YAML read as a number
    if value is None and annotation in (int, float, str, bool):
        raise ConfigError(f"{key}: no value given (expected {annotation.__name__})")
    if annotation in (int, float, str, bool) and not isinstance(value, annotation) or (
            annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}"
                          + (f" (write {_whole(value)})" if annotation is int and _whole(value) is not None else ""))
    return value


def _whole(value: Any) -> int | None:
    """The whole number a float or a string such as YAML's '1e3' stands for, if it is one."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and not isinstance(value, bool) else None


def _renamed_section(prefix: str, key: str, engine_kinds: Collection[str]) -> str:
    """A top-level section named after an engine kind is an earlier version's engine section."""
    if prefix or key not in engine_kinds:
        return ""
    return f" (a '{key}:' section is now 'engine:' with 'kind: {key}' and the same keys)"


def _build(cls: type, values: dict, prefix: str, engine_kinds: Collection[str] = ()) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    unknown = [key for key in values if key not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; valid keys under "
                          f"'{prefix or '<top>'}': {', '.join(names)}" + _renamed_section(prefix, unknown[0], engine_kinds))
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value or {}, key)
        else:
            kwargs[name] = _check_value(value, hints[name], key)
            if "range" in fields[name].metadata:
                _check_range(kwargs[name], fields[name].metadata["range"], key)
    return cls(**kwargs)


def build_dataclass(cls: type, tree: dict, source: str | Path | None = None, prefix: str = "",
                    engine_kinds: Collection[str] = ()) -> Any:
    """A (nested) dataclass from a tree of YAML values: unknown keys refused with the valid ones,
    types and ranges checked; errors name the key (under `prefix`, a section) and `source`, a file."""
    try:
        return _build(cls, tree, prefix, engine_kinds)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree["a"]["b"]["c"] = value for key "a.b.c", creating the sections on the way."""
    parts = key.strip().split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:  # absent, or a YAML section with nothing under it (`train:`)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:depth + 1])} is a value ({node!r}), not a section")
    node[parts[-1]] = value


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    dotted, raw = override.split("=", 1)
    if not all(part.strip() for part in dotted.split(".")):
        raise ConfigError(f"override {override!r}: no key before '=' (or an empty part in it); "
                          f"it must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({problem}); fix its "
                          f"brackets or quotes") from None
    try:
        set_dotted(tree, dotted, value)
    except ConfigError as error:
        raise ConfigError(f"{error} (command-line override)") from None


def _yaml_error_line(path: Path, text: str, error: yaml.YAMLError) -> str:
    """PyYAML's several lines as one: the file, line and column, the problem, and the fix for a tab."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    if mark is None:
        return f"{path}: not valid YAML: {problem}"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    if "'\\t'" in problem or "tab" in problem:
        line = text.splitlines()[mark.line] if mark.line < len(text.splitlines()) else ""
        indentation = line[:len(line) - len(line.lstrip(" \t"))]
        if "\t" in indentation:
            return f"{where}: a tab: YAML does not allow tabs for indentation; use spaces"
        return f"{where}: a tab where YAML needs a space (after ':' or '-'); use spaces"
    return f"{where}: not valid YAML: {f'{context}: ' if context else ''}{problem}"


def _duplicate_keys(node: yaml.Node, path: Path, prefix: str = "", seen: set[int] | None = None) -> None:
    """Refuse a key given twice in one mapping, at any depth: YAML loaders keep the last silently (a
    second `train:` section would replace the whole first). Merge keys (`<<: *base`) may be overridden."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already walked
        return
    seen.add(id(node))
    children = node.value if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) else []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in children:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if key_node.value in first_line:
                raise ConfigError(f"{path}:{line}: duplicate key '{key}' (first at line {first_line[key_node.value]}): "
                                  f"YAML would keep only the second; merge them into one")
            first_line[key_node.value] = line
            _duplicate_keys(value_node, path, f"{key}.", seen)
    else:
        for index, child in enumerate(children):
            _duplicate_keys(child, path, f"{prefix.rstrip('.')}[{index}].", seen)


def read_config_file(path: str | Path, engine: EngineRules | None = None) -> dict:
    """A config file (YAML; JSON where the name ends in .json) as a tree of sections: one line naming the
    file (and line) for a folder, a file that is not UTF-8, empty, not YAML (a tab) or JSON, with a key
    given twice, or not a mapping; or an engine's own config file (`engine` tells them)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--config {path} is a folder; name a YAML file (configs/*.yaml)")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    tree = _parse_json(path, text) if path.suffix.lower() == ".json" and text.strip() else _parse_yaml(path, text)
    if tree is None:
        raise ConfigError(f"{path} is empty: no settings in it (a config is a YAML mapping of sections: run:, "
                          f"model:, data:, train:, ...)")
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config is a YAML mapping of sections (run:, model:, data:, train:, ...), "
                          f"found a {type(tree).__name__}")
    mistake = engine.file_mistake(tree, path) if engine is not None else None
    if mistake:
        raise ConfigError(mistake)
    return tree


def _parse_yaml(path: Path, text: str) -> Any:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _duplicate_keys(node, path)
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error_line(path, text, error)) from None
    finally:
        loader.dispose()


def _parse_json(path: Path, text: str) -> Any:
    """JSON is the YAML subset most tools write, but with tabs YAML refuses: read it as JSON."""
    try:
        return json.loads(text, object_pairs_hook=functools.partial(unique_keys, path))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}:{error.lineno}:{error.colno}: not valid JSON: {error.msg}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                stage: int | None = None, world_size: int | None = None,
                engine: EngineRules | None = None) -> Config:
    """The config of `path` with `overrides`, checked by `validate` (the rules of training `stage`
    on `world_size` ranks when given; the `engine:` section's where `engine` gives its rules)."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        tree = read_config_file(path, engine)
    file_tree = copy.deepcopy(tree)
    for override in overrides:
        _apply_override(tree, override)
    engine_kinds = engine.kinds if engine is not None else ()
    try:
        cfg = build_dataclass(Config, tree, engine_kinds=engine_kinds)
        # where the config came from, so that a later validation (the job's) names it the same way
        object.__setattr__(cfg, "origin", ConfigOrigin(path, file_tree, tuple(overrides)))
        validate(cfg, stage, world_size, engine)
    except ConfigError as error:
        raise attributed(error, ConfigOrigin(path, file_tree, tuple(overrides)), stage, world_size, engine) from None
    return cfg


@dataclasses.dataclass(frozen=True)
class ConfigOrigin:
    """A loaded config's file (its own tree) and command-line overrides."""

    path: Path | None
    file_tree: dict
    overrides: tuple[str, ...]


def attributed(error: ConfigError, origin: "ConfigOrigin | None", stage: int | None, world_size: int | None,
               engine: EngineRules | None) -> ConfigError:
    """`error` naming the YAML file when the mistake is in it (the file alone fails the same way),
    else saying it comes from a command-line override."""
    if origin is None:
        return error
    alone = origin.path and _fails_alone(origin.file_tree, str(error), stage, world_size, engine)
    return ConfigError(f"{origin.path}: {error}" if alone
                       else f"{error} (command-line override)" if origin.overrides else str(error))


def _fails_alone(tree: dict, message: str, stage: int | None, world_size: int | None,
                 engine: EngineRules | None) -> bool:
    try:
        validate(build_dataclass(Config, tree, engine_kinds=engine.kinds if engine is not None else ()),
                 stage, world_size, engine)
    except ConfigError as error:
        return str(error) == message
    return False


def unique_keys(path: Path, pairs: list[tuple[str, Any]]) -> dict:
    """One JSON object, refused where a key comes twice (json keeps the last silently)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ConfigError(f"{path}: key '{key}' given twice in one object (JSON would keep only the "
                              f"second); keep one")
        seen.add(key)
    return dict(pairs)


def config_to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")

