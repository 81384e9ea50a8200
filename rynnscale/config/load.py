"""Load a YAML recipe (with inheritance and dotlist overrides) into a validated ``RootConfig``.

- ``extends: other.yaml`` (or a list) at the top of a recipe merges it over its parents; paths are
  relative to the recipe that names them. Children override parents; lists are replaced, not merged.
- ``key=value`` overrides (omegaconf dotlist syntax) are applied last.
- Errors are ``ConfigError`` whose message names the key, the value and what is allowed, raised before
  any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import re
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from rynnscale.parallel.layout import LayoutError, check_layout_keys, resolve_cp_attention

from .model_args import resolve_model_args
from .schema import CHOICES, ConfigError, RootConfig

log = logging.getLogger(__name__)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        keys.append(name)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _all_keys(f.default_factory, name + ".")
    return keys


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"recipe inheritance cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    if not path.is_file():
        by = f" (named by 'extends:' in {chain[-1]})" if chain else ""
        raise ConfigError(f"recipe {path}{by} does not exist" + ("; 'extends:' paths are relative to the recipe "
                                                                  "that names them" if chain else ""))
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors; their text quotes the file: name only where it failed
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        tag = re.search(r"tag '([^']{1,80})", str(getattr(e, "problem", "") or ""))
        if tag:   # !!python/object/apply:... : yaml's safe loader refuses it; say so, never build the object
            raise ConfigError(f"recipe {path} uses the YAML tag {tag.group(1)!r}{where}: tags are not allowed in "
                              "recipes (they would build Python objects); write plain values") from None
        dup = re.fullmatch(r"found duplicate key ([A-Za-z_][A-Za-z0-9_]{0,63})", str(getattr(e, "problem", "") or ""))
        if dup:   # yaml would keep only the last; a second `train:` section dropping the first is refused
            raise ConfigError(f"recipe {path} sets the key {dup.group(1)!r} twice in one mapping{where}: merge the two "
                              "into one (the second would replace the whole first one)") from None
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {type(e).__name__}; it is not a valid "
                          "recipe mapping") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"recipe {path} is not a valid recipe mapping (its top level is a "
                          f"{'list' if isinstance(node, ListConfig) else 'scalar'}, not key: value pairs)")
    bad = [k for k in node.keys() if not (isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", k))]
    if bad:   # e.g. extends: /etc/passwd parses as one huge key: never echo a file that is not a recipe
        raise ConfigError(f"recipe {path} is not a valid recipe mapping: its top level must be section names "
                          f"({', '.join(f.name for f in dataclasses.fields(RootConfig))}, extends); "
                          f"{len(bad)} top-level key(s) are not names (content not shown)")
    _refuse_resolvers(OmegaConf.to_container(node, resolve=False), f"recipe {path}")
    parents = node.pop("extends", None)
    if parents is None:
        _check_layer(node, path)
        return node
    if isinstance(parents, ListConfig):
        parents = list(parents)
    if isinstance(parents, str):
        parents = [parents]
    if not (isinstance(parents, list) and parents and all(isinstance(p, str) and p for p in parents)):
        raise ConfigError(f"recipe {path}: 'extends:' must be a recipe path or a list of them (strings), got "
                          f"{OmegaConf.to_container(parents) if isinstance(parents, DictConfig) else parents!r}")
    _check_layer(node, path)   # before the merge over the parents, so that errors name this file
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(parent), chain + (path,)))
    return OmegaConf.merge(merged, node)


def _check_layer(node: DictConfig, path: Path) -> None:
    """One recipe file's keys, shapes and value types against the schema, so that an error names the file that
    holds the bad value (an unknown key, a list for a mapping, ``max_steps: abc``)."""
    where = f"recipe {path}"
    _coerce_lists(node, RootConfig, where)
    try:
        OmegaConf.merge(OmegaConf.structured(RootConfig), node)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {_explain(e)}") from None
    except TypeError as e:   # "Cannot merge incompatible container types" where _coerce_lists caught nothing
        raise ConfigError(f"{where}: a value has the wrong shape ({e}); a section or mapping needs key: value "
                          "pairs, a list [a, b]") from None


# ``${name:...}`` calls a resolver (``oc.env`` reads the environment, ``oc.decode`` parses strings, custom ones
# run code); plain ``${other.key}`` references have no colon after the name. ``\${`` is a literal.
_RESOLVER_CALL = re.compile(r"(?<!\\)\$\{\s*[A-Za-z_][\w.\-]*\s*:")


def _refuse_resolvers(tree: Any, where: str, prefix: str = "") -> None:
    """Refuse any value (or key) of ``tree`` that interpolates through an omegaconf resolver, naming the key."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(k, int) else f"{prefix}{'.' if prefix else ''}{k}"
        for text in (k, v):
            if isinstance(text, str) and _RESOLVER_CALL.search(text):
                m = _RESOLVER_CALL.search(text)
                raise ConfigError(f"{where}: config key '{key}' uses the interpolation resolver "
                                  f"'{m.group(0)[2:-1].strip()}' ({m.group(0)}...}}); resolvers are not allowed in "
                                  "recipes or overrides (they read the environment or run code); only plain "
                                  "${other.key} references are")
        if isinstance(v, (dict, list)):
            _refuse_resolvers(v, where, key)


# ----------------------------------------------------------------------------- types against the schema


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _schema_type(key: str) -> Any:
    """The schema's type hint of dotted ``key`` (list indices ``[i]`` stepped into), or None if not a schema key."""
    tp: Any = RootConfig
    for part in re.sub(r"\[\d+\]", "", key).split("."):
        while typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)) or part not in _hints(tp):
            return None
        tp = _hints(tp)[part]
    return tp


def _example(key: str, tp: Any) -> str:
    """What to write for ``key`` of type ``tp``: a short phrase and a command-line example."""
    leaf = key.rsplit(".", 1)[-1]
    if typing.get_origin(tp) is list:
        (elem,) = typing.get_args(tp)
        if dataclasses.is_dataclass(elem):
            fields = ", ".join(f"{f.name}: ..." for f in dataclasses.fields(elem))
            return f"a list of mappings ({elem.__name__}), e.g. {key}=[{{{fields}}}]"
        sample = {"train_shards": "data/shards", "shards": "data/shards"}.get(leaf, "pattern")
        return (f"a list of strings (one string means a one-element list), e.g. {key}=[{sample}/a-*.tar,"
                f"{sample}/b.tar] or {key}={sample}/a-*.tar" if "shards" in leaf else
                f"a list of strings (one string means a one-element list), e.g. {key}=['model.visual.*']")
    base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp] if typing.get_origin(tp) else [tp]
    t = base[0]
    default = _schema_default(key)
    if t is bool:
        return f"expected true or false, e.g. {key}={'false' if default else 'true'}"
    if t is int:
        return f"expected an integer, e.g. {key}={default if isinstance(default, int) else 1}"
    if t is float:
        return f"expected a number, e.g. {key}={default if isinstance(default, float) else 1.0}"
    if t is str:
        return f"expected a string, e.g. {key}={default or 'value'}"
    return f"expected {getattr(t, '__name__', t)}"


def _schema_default(key: str) -> Any:
    node: Any = RootConfig()
    for part in key.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _coerce_lists(node: DictConfig, cls: type, where: str, prefix: str = "") -> None:
    """In one layer (recipe or command line), make a scalar given for a list-typed schema field a one-element list
    (``data.train_shards=path/*.tar``), generically over the schema, lists of sections included
    (``data.mixture[i].shards``). A value of the wrong kind (a mapping for a list of strings, a scalar for a list
    of sections, a number for a boolean, a list or scalar for a mapping) is a ConfigError naming the key, the type
    expected and an example. An unknown key is a ConfigError naming it (list items included:
    ``data.mixture[0].weigth``), the closest key and ``where`` (the recipe file that holds it); interpolations are
    kept as they are."""
    hints = _hints(cls)
    for k in list(node.keys()):
        if isinstance(k, str) and k not in hints:
            raise ConfigError(f"{where}: {_unknown_key(prefix + k, sorted(hints))}")
        if not isinstance(k, str):
            continue
        tp, key = hints[k], f"{prefix}{k}"
        child = node._get_node(k)
        if tp is bool and isinstance(child._value(), (int, float)) and not isinstance(child._value(), bool):
            # omegaconf would read model.compile=2 as true and logging.progress=0 as false
            raise ConfigError(f"{where}: config key '{key}' = {child._value()!r} is a number; "
                              f"{_example(key, tp)}")
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
                _coerce_lists(child, tp, where, key + ".")
            elif not isinstance(child, DictConfig) and child._value() is None:
                del node[k]   # `train:` with every key commented out: sets nothing (was "'train' is not Optional")
            elif isinstance(child, ListConfig) or (not isinstance(child, DictConfig)
                                                   and not child._is_interpolation()):
                shown = "a list" if isinstance(child, ListConfig) else f"{child._value()!r}"
                fields = ", ".join(f.name for f in dataclasses.fields(tp))
                raise ConfigError(f"{where}: config key '{key}' is {shown}; it is a section: give its keys "
                                  f"({fields}), e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
            continue
        if _is_mapping(tp):   # model.arch, rl.reward.weights, stages[i].overrides: merging a list would TypeError
            if isinstance(child, ListConfig) or (not isinstance(child, DictConfig) and child._value() is not None
                                                 and not child._is_interpolation()):
                shown = "a list" if isinstance(child, ListConfig) else f"{child._value()!r}"
                raise ConfigError(f"{where}: config key '{key}' is {shown}; expected a mapping (key: value pairs), "
                                  f"e.g. {key}={{name: value}}")
            continue
        if typing.get_origin(tp) is not list:
            continue
        (elem,) = typing.get_args(tp)
        is_section = isinstance(elem, type) and dataclasses.is_dataclass(elem)
        if isinstance(child, ListConfig):
            if is_section and not child._is_none() and not child._is_interpolation():
                for i, item in enumerate(child):
                    if isinstance(item, DictConfig):
                        _coerce_lists(item, elem, where, f"{key}[{i}].")
            continue
        if isinstance(child, DictConfig):
            if is_section and not child._is_none():
                node[k] = [child]
                _coerce_lists(node[k][0], elem, where, f"{key}[0].")
                continue
            raise ConfigError(f"{where}: config key '{key}' is a mapping; expected {_example(key, tp)}")
        value = child._value()
        if value is None or (isinstance(value, str) and value.startswith("${") and value.endswith("}")
                             and value.count("${") == 1):
            continue   # null, or a whole-value reference to another list
        if is_section:
            raise ConfigError(f"{where}: config key '{key}' = {value!r} is not a list; expected {_example(key, tp)}")
        node[k] = [value]


def _is_mapping(tp: Any) -> bool:
    """Whether schema type ``tp`` is a free-form mapping (``dict[...]``, optionally ``| None``)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (typing.Union,
                                                                                              types.UnionType) else [tp]
    return len(args) == 1 and (args[0] is dict or typing.get_origin(args[0]) is dict)


def _unknown_key(key: str, allowed: list[str] | None = None) -> str:
    """'unknown config key ...' for dotted ``key``, with the closest schema key and what its section allows
    (``allowed``: the section's field names; by default looked up in the schema, which cannot step into a list
    item such as ``data.mixture[0].weigth``: there the item's fields are suggested)."""
    parent, _, leaf = key.rpartition(".")
    if allowed is None:
        allowed = sorted(k.rsplit(".", 1)[-1] for k in _all_keys(RootConfig)
                         if (k.rsplit(".", 1)[0] if "." in k else "") == parent)
    if "[" in key:
        close = [f"{parent}.{c}" for c in difflib.get_close_matches(leaf, allowed, n=1, cutoff=0.6)]
    else:
        close = difflib.get_close_matches(key, _all_keys(RootConfig), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{key}'{hint} (allowed under '{parent or '<root>'}': {', '.join(allowed)})"


def _explain(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError) and key:
        return _unknown_key(key)
    if isinstance(e, ValidationError) and key:
        tp = _schema_type(key)
        return f"config key '{key}': {msg}" + (f"; {_example(key, tp)}" if tp is not None else "")
    return f"{key + ': ' if key else ''}{msg}"


def load_config(recipe: str | Path | None, overrides: Iterable[str] = (), *, check_paths: bool = True) -> RootConfig:
    """Recipe file + dotlist overrides -> validated RootConfig (a plain dataclass tree).

    ``check_paths=False`` skips the checks that need this machine's files (``model.init_from``'s
    config.json, ``checkpoint.resume``): for planning a run off-cluster (the architecture then comes
    from ``model.preset``)."""
    schema = OmegaConf.structured(RootConfig)
    try:
        layers = [schema]
        if recipe is not None:
            layers.append(_read_yaml(Path(recipe)))
            _coerce_lists(layers[-1], RootConfig, f"recipe {Path(recipe)}")
        overrides = list(overrides)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key=value")
        overrides, per_stage = _split_stage_overrides(overrides)
        overrides, per_item = _split_item_overrides(overrides)
        if overrides:
            cli = _from_dotlist(overrides)
            _refuse_resolvers(OmegaConf.to_container(cli, resolve=False), "override")
            _coerce_lists(cli, RootConfig, "override")
            _replace_recipe_sources(layers, cli)
            layers.append(cli)
        merged = OmegaConf.merge(*layers)
        _apply_item_overrides(merged, per_item)
        references = _references(OmegaConf.to_container(merged, resolve=False))
        cfg: RootConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e)) from None
    except TypeError as e:   # omegaconf's "Cannot merge incompatible container types" where no check above caught it
        raise ConfigError(f"{f'recipe {recipe} or ' if recipe is not None else ''}the overrides: a value has the "
                          f"wrong shape ({e}); a section or mapping needs key: value pairs, a list [a, b]") from None
    if cfg.stages:
        _stages_under_command_line(cfg, overrides, per_stage)
        _refuse_stage_overrides_of_references(cfg, references)
    validate(cfg, check_paths=check_paths)
    return cfg


# a plain ``${a.b}`` reference (no resolver; ``\${`` is a literal)
_REFERENCE = re.compile(r"(?<!\\)\$\{\s*([A-Za-z_][\w.]*)\s*\}")


def _references(tree: Any, prefix: str = "", out: dict[str, str] | None = None) -> dict[str, str]:
    """{referenced key: the first key whose value refers to it} over an unresolved config tree."""
    out = {} if out is None else out
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(k, int) else f"{prefix}{'.' if prefix else ''}{k}"
        if isinstance(v, str):
            for ref in _REFERENCE.findall(v):
                out.setdefault(ref, key)
        else:
            _references(v, key, out)
    return out


def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted keys of the leaves (lists included) of a nested dict."""
    keys = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        keys += _leaf_keys(v, key + ".") if isinstance(v, dict) and v else [key]
    return keys


def _refuse_stage_overrides_of_references(cfg: RootConfig, references: dict[str, str]) -> None:
    """A stage cannot change a key that other values refer to (``data.root`` in ``${data.root}/x/*.tar``): the
    references were resolved once, for the whole recipe, so the stage's value would reach only the key itself."""
    for i, st in enumerate(cfg.stages):
        for key in _leaf_keys(st.overrides):
            for ref, by in references.items():
                if ref == key or ref.startswith(key + ".") or key.startswith(ref + "."):
                    raise ConfigError(f"config key 'stages[{i}].overrides.{key}' ({st.name}): '{by}' refers to "
                                      f"'{ref}' (${{{ref}}}), resolved once for the whole recipe, so the stage's "
                                      f"value would not reach it; set the keys that refer to it in the stage instead, "
                                      f"or '{ref}' for the whole recipe")


def _split_stage_overrides(overrides: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``stages.<name or index>.<key>=value`` (one stage's setting) apart from the rest of the command line."""
    rest, per_stage = [], []
    for item in overrides:
        key, value = item.split("=", 1)
        parts = key.split(".", 2)
        if parts[0] == "stages" and len(parts) == 3:
            per_stage.append((parts[1], f"{parts[2]}={value}"))
        else:
            rest.append(item)
    return rest, per_stage


def _stages_under_command_line(cfg: RootConfig, overrides: list[str], per_stage: list[tuple[str, str]]) -> None:
    """The command line is laid over every stage too: a key it sets leaves the stages' own overrides (so
    ``train.max_steps=4`` shortens every stage), and ``stages.<name or index>.<key>=value`` sets one stage's."""
    keys = [item.split("=", 1)[0] for item in overrides if not item.startswith("stages=")]
    for given, replaced in _COMMAND_LINE_REPLACES:   # a command-line source replaces the stages' own sources too
        if given in keys and _get(cfg, given) not in (None, []):
            keys += [key for key, _, keep in replaced if not any(k == keep or k.startswith(keep + ".") for k in keys)]
    for st in cfg.stages:
        for key in keys:
            _drop_key(st.overrides, key.split("."))
    names = [st.name for st in cfg.stages]
    stage_keys: dict[int, list[str]] = {}
    for sel, item in per_stage:
        i = names.index(sel) if sel in names else int(sel) if sel.isdigit() and int(sel) < len(names) else None
        if i is None:
            raise ConfigError(f"override 'stages.{sel}.{item}': no stage {sel!r} (stages: {', '.join(names)}; name one "
                              "or give its index)")
        if item.startswith("overrides."):   # the long form stages.<i>.overrides.<key>
            item = item[len("overrides."):]
        try:
            one = OmegaConf.to_container(_from_dotlist([item]), resolve=False)
            cfg.stages[i].overrides = OmegaConf.to_container(OmegaConf.merge(cfg.stages[i].overrides, one))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override 'stages.{sel}.{item}': {_explain(e)}") from None
        stage_keys.setdefault(i, []).append(item.split("=", 1)[0])
    for i, given_keys in stage_keys.items():   # stages.<s>.data.train_shards=X: that stage trains on X only
        over = OmegaConf.create(cfg.stages[i].overrides)
        for given, replaced in _COMMAND_LINE_REPLACES:
            if given not in given_keys or OmegaConf.select(over, given, default=None) in (None, []):
                continue
            for key, off, keep in replaced:
                if not any(k == keep or k.startswith(keep + ".") for k in given_keys):
                    OmegaConf.update(over, key, off, force_add=True, merge=False)
                    log.info("command-line stages.%s.%s replaces the stage's %s -> %r", cfg.stages[i].name, given,
                             key, off)
        cfg.stages[i].overrides = OmegaConf.to_container(over)


def _drop_key(tree: dict, path: list[str]) -> None:
    """Remove ``a.b.c`` from a nested dict (and the mappings it leaves empty)."""
    head, *rest = path
    if head not in tree:
        return
    if not rest:
        del tree[head]
    elif isinstance(tree[head], dict):
        _drop_key(tree[head], rest)
        if not tree[head]:
            del tree[head]


def _from_dotlist(overrides: list[str]) -> DictConfig:
    """omegaconf's dotlist parsing, except that a value YAML cannot parse as a scalar is the plain string it reads
    as (``model.lora.targets=*.q_proj``: a leading ``*`` is a YAML alias); a broken ``[...]`` / ``{...}`` or a YAML
    tag is an error naming the override."""
    cli = OmegaConf.create()
    for item in overrides:
        OmegaConf.update(cli, item.split("=", 1)[0], _override_value(item))
    return cli


def _override_value(item: str) -> Any:
    """The value of override ``key=value`` as YAML reads it (see ``_from_dotlist``)."""
    import yaml
    try:   # omegaconf's loader: yaml's SafeLoader plus its float / key rules (no tags that build objects)
        from omegaconf._yaml import get_yaml_loader
    except ImportError:   # omegaconf < 2.4
        from omegaconf._utils import get_yaml_loader  # type: ignore[attr-defined,no-redef]

    key, text = item.split("=", 1)
    try:
        return yaml.load(text, Loader=get_yaml_loader())
    except yaml.YAMLError as e:
        if text.lstrip()[:1] in ("[", "{", "!"):
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({type(e).__name__}: "
                              f"{getattr(e, 'problem', None) or e}); write lists as key=[a,b] and mappings as "
                              "key={a: 1}, and quote a value that starts with a special character: "
                              f"{key}='\"{text}\"'") from None
        return text


# ``data.mixture[1].weight=2`` or ``data.mixture.1.weight=2``: one field of one item of a list of sections
_ITEM_KEY = re.compile(r"([A-Za-z_][\w.]*?)(?:\[(\d+)\]|\.(\d+))\.(.+)")


def _split_item_overrides(overrides: list[str]) -> tuple[list[str], list[tuple[str, int, str, str]]]:
    """``<list of sections>[i].<field>=value`` overrides, as (list key, i, field, item), apart from the rest."""
    rest, items = [], []
    for item in overrides:
        m = _ITEM_KEY.fullmatch(item.split("=", 1)[0])
        tp = _schema_type(m.group(1)) if m else None
        elem = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if m and m.group(1) != "stages" and dataclasses.is_dataclass(elem):
            items.append((m.group(1), int(m.group(2) or m.group(3)), m.group(4), item))
        else:
            rest.append(item)
    return rest, items


def _apply_item_overrides(merged: DictConfig, items: list[tuple[str, int, str, str]]) -> None:
    """Set one field of one item of a list the recipe (and command line) built, e.g. a mixture source's weight;
    an index past the list's end or a field the item does not have is a ConfigError naming the override."""
    for key, i, field, item in items:
        n = len(OmegaConf.select(merged, key) or [])
        if i >= n:
            raise ConfigError(f"override {item!r}: '{key}' has {n} item(s){f' (indices 0 to {n - 1})' if n else ''}; "
                              f"to add or replace items give the whole list, e.g. {key}=[{{...}}, ...]")
        full = f"{key}[{i}].{field}"
        tp = _schema_type(full)
        if tp is None:
            elem = typing.get_args(_schema_type(key))[0]
            raise ConfigError(f"override: {_unknown_key(full, sorted(f.name for f in dataclasses.fields(elem)))}")
        value = _override_value(item)
        _refuse_resolvers({full: value}, "override")
        if typing.get_origin(tp) is list and value is not None and not isinstance(value, list):
            value = [value]   # as _coerce_lists: one string means a one-element list
        OmegaConf.update(merged, full, value, merge=False)


# A command-line key replaces the recipe's sources of the same thing: (command-line key, [(recipe key, value that
# switches it off, command-line prefix that keeps it)]). ``rynnscale train demo.yaml model.init_from=DIR``
# fine-tunes DIR instead of failing on two architectures; ``data.train_shards=OUT`` trains on OUT only instead of
# silently mixing in the recipe's synthetic set (unless the command line also sets ``data.synthetic.*``).
_COMMAND_LINE_REPLACES: tuple[tuple[str, tuple[tuple[str, Any, str], ...]], ...] = (
    ("model.init_from", (("model.arch", None, "model.arch"),)),
    ("model.arch", (("model.init_from", None, "model.init_from"), ("model.preset", None, "model.preset"))),
    ("data.train_shards", (("data.mixture", [], "data.mixture"),
                           ("data.synthetic.num_samples", 0, "data.synthetic"))),
    ("data.mixture", (("data.train_shards", [], "data.train_shards"),
                      ("data.synthetic.num_samples", 0, "data.synthetic"))),
)


def _replace_recipe_sources(layers: list, cli: DictConfig) -> None:
    """Apply ``_COMMAND_LINE_REPLACES`` to the recipe layers (``layers[1:]``; ``layers[0]`` is the schema's
    defaults) and log one line per command-line key that replaced something. Setting two sources of the same
    thing on the command line is still an error (``validate``)."""
    for given, replaced in _COMMAND_LINE_REPLACES:
        value = OmegaConf.select(cli, given, default=None)
        if value is None or (isinstance(value, ListConfig) and len(value) == 0):
            continue
        changes = []
        for key, off, keep_prefix in replaced:
            if OmegaConf.select(cli, keep_prefix, default=None) is not None:
                continue
            for layer in layers[1:]:
                old = OmegaConf.select(layer, key, default=None)
                if old is None or old == off or (isinstance(old, ListConfig) and len(old) == 0):
                    continue
                shown = (f"{len(old)} item(s)" if isinstance(old, ListConfig) else
                         "inline architecture" if isinstance(old, DictConfig) else repr(old))
                keep = f"; any {keep_prefix}.* on the command line keeps it" if keep_prefix != key else ""
                changes.append(f"{key} ({shown}) -> {off!r}{keep}")
                OmegaConf.update(layer, key, off, force_add=True, merge=False)
        if changes:
            log.info("command-line %s replaces the recipe's %s", given, ", ".join(changes))


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# Numeric keys that may be negative (everything else numeric must be >= 0; every float must be finite).
_SIGNED_KEYS = {"run.seed", "data.seed", "data.synthetic.seed", "parallel.dp_shard", "train.max_grad_norm"}
# Numeric keys that must be >= 1 (sizes and counts where 0 means nothing sensible) or > 0 (rates, times).
_AT_LEAST_ONE = {"train.max_nonfinite_steps", "data.video_min_frames", "data.video_max_frames",
                 "data.image_min_pixels", "data.image_max_pixels", "data.video_min_pixels", "data.video_max_pixels",
                 "data.max_member_bytes", "data.max_sample_bytes", "data.shuffle_buffer_bytes",
                 "data.max_image_pixels", "data.synthetic.frames", "data.synthetic.width", "data.synthetic.height",
                 "data.synthetic.samples_per_shard", "eval.max_new_tokens", "logging.progress_every"}
# optim.lr may be 0 (a dry run, checking a pipeline, exporting an unchanged model): the trainer warns once.
_POSITIVE = {"data.video_fps", "data.synthetic.fps", "parallel.timeout_s", "optim.eps"}
_UNIT_OPEN = {"optim.beta1", "optim.beta2"}   # in [0, 1)
_MAX_INT = 2**62


def _numeric_fields(node: Any, prefix: str = ""):
    """(dotted key, schema key, value) of every int / float field of the config tree, lists of sections included
    (``data.mixture[0].weight``); free-form dicts (``model.arch``) are left to their own validation."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numeric_fields(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from ((k, s.replace(f"{key}[{i}]", key), v)
                                for k, s, v in _numeric_fields(item, f"{key}[{i}]."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, key, value


def validate_numbers(cfg: RootConfig) -> None:
    """Every numeric key, generically over the schema: floats finite (``optim.lr=inf`` or ``nan`` would train
    NaN checkpoints), integers of a sane magnitude, non-negative unless signed, and the ranges above."""

    for key, schema_key, v in _numeric_fields(cfg):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}' = {v} must be a finite number")
        if isinstance(v, int) and abs(v) > _MAX_INT:
            raise ConfigError(f"config key '{key}' = {v} is out of range (|value| must be <= 2**62)")
        if schema_key not in _SIGNED_KEYS and v < 0:
            raise ConfigError(f"config key '{key}' = {v} must be >= 0")
        if schema_key in _AT_LEAST_ONE and v < 1:
            raise ConfigError(f"config key '{key}' = {v} must be >= 1")
        if schema_key in _POSITIVE and not v > 0:
            raise ConfigError(f"config key '{key}' = {v} must be > 0")
        if schema_key in _UNIT_OPEN and not 0 <= v < 1:
            raise ConfigError(f"config key '{key}' = {v} must be in [0, 1)")


def validate(cfg: RootConfig, check_paths: bool = True) -> None:
    """Checks omegaconf cannot express: every numeric key generically (``validate_numbers``), enums, then each
    section's own rules (its ``validate()``), then the rules that join sections."""
    validate_numbers(cfg)
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' = {value!r} is not allowed; choose one of {list(allowed)}")
    for section in (cfg.train, cfg.optim, cfg.data, cfg.model, cfg.parallel, cfg.plan, cfg.checkpoint, cfg.eval,
                    cfg.rl):
        section.validate()
    if cfg.train.objective == "grpo" and cfg.parallel.cp > 1:
        raise ConfigError(f"config key 'parallel.cp' = {cfg.parallel.cp}: GRPO (train.objective=grpo) runs whole rows "
                          "(generation and per-token log-probs); use parallel.cp=1")
    if cfg.train.objective == "grpo":
        cfg.rl.validate_rewards()
    if cfg.train.objective == "grpo" and cfg.train.grad_accum != 1:   # GRPO never reads it
        raise ConfigError(f"config key 'train.grad_accum' = {cfg.train.grad_accum}: GRPO (train.objective=grpo) "
                          "does not accumulate; each rollout batch (rl.prompts_per_step x rl.group_size answers) is "
                          "split into rl.policy_steps optimiser steps: set train.grad_accum=1 and use rl.policy_steps "
                          "/ rl.prompts_per_step")
    _validate_stages(cfg)
    ckpt_resume = cfg.checkpoint.resume
    if check_paths and ckpt_resume not in ("auto", "none") and not Path(ckpt_resume).exists():
        raise ConfigError(f"config key 'checkpoint.resume' = {ckpt_resume!r}: expected auto, none or an existing "
                          "checkpoint directory")
    tok = cfg.data.tokenizer   # the file load_tokenizer reads: DIR/tokenizer.json, or the file itself
    if check_paths and tok and not ((Path(tok) / "tokenizer.json").is_file() or Path(tok).is_file()):
        raise ConfigError(f"config key 'data.tokenizer' = {tok!r}: no tokenizer there (expected a directory with "
                          "tokenizer.json, or that file)")
    # model: one source of architecture, resolved the way the build and the planner resolve it
    arch = resolve_model_args(cfg.model, check_paths=check_paths, required=False)
    _validate_layout(cfg, arch.args.text.num_experts if arch is not None else None)
    if arch is not None and cfg.parallel.cp > 1:   # the build's rule, before any rank starts
        try:
            resolve_cp_attention(cfg.model.cp_attention, arch.args.text.num_attention_heads, cfg.parallel.cp)
        except LayoutError as e:
            raise ConfigError(f"config key 'model.cp_attention': {e}") from None
    if not cfg.data.train_shards and not cfg.data.mixture and cfg.data.synthetic.num_samples <= 0:
        raise ConfigError("no training data: set 'data.train_shards' (paths/globs/brace patterns), 'data.mixture' "
                          "or 'data.synthetic.num_samples' > 0")
    e = cfg.eval
    if e.every_steps > 0 and not e.shards and (cfg.data.synthetic.num_samples <= 0 or e.synthetic_samples <= 0):
        raise ConfigError(f"config key 'eval.every_steps' = {e.every_steps} enables evaluation but there is no "
                          "held-out data: set 'eval.shards' (paths/globs/brace patterns), or use "
                          "'data.synthetic.num_samples' > 0 with 'eval.synthetic_samples' > 0")
    # plan.* are the planner's assumptions: `rynnscale plan` checks them against train.* (plan_recipe); a run that
    # lowers train.micro_batch_tokens below the recipe's visual budget must still start


def _validate_stages(cfg: RootConfig) -> None:
    names = [st.name for st in cfg.stages]
    for i, st in enumerate(cfg.stages):
        if not st.name or not st.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"config key 'stages[{i}].name' = {st.name!r} must be a non-empty name of letters, digits, "
                              "'-' and '_' (the stage's directory under run.output_dir)")
        if st.name in names[:i]:
            raise ConfigError(f"config key 'stages[{i}].name' = {st.name!r} is used by another stage")
        if "stages" in st.overrides:
            raise ConfigError(f"config key 'stages[{i}].overrides' cannot hold 'stages'")
        for key in _chain_keys(cfg, i):
            if OmegaConf.select(OmegaConf.create(dict(st.overrides)), key, default=None) is not None:
                raise ConfigError(f"config key 'stages[{i}].overrides.{key}': the chain sets it for every stage "
                                  f"({_CHAIN_KEYS_WHY[key]}); set it for the whole recipe instead")
        stage_config(cfg, i, check_paths=False)   # every stage's recipe is valid before the first one starts
    resume = cfg.checkpoint.resume
    if cfg.stages and resume not in ("auto", "none") and _stage_of(cfg, resume) is None:
        raise ConfigError(f"config key 'checkpoint.resume' = {resume!r}: in a staged recipe it must be a checkpoint "
                          f"of one of its stages ({Path(cfg.run.output_dir)}/<stage>/checkpoints/step_N), which then "
                          "continues from there; to start a chain from another model, set model.init_from")


# what the chain sets in each stage's recipe (``stage_config``), and why a stage may not set it itself
_CHAIN_KEYS_WHY = {
    "run.output_dir": "each stage runs in <run.output_dir>/<stage name>",
    "data.synthetic.output_dir": "the stages share one synthetic data set",
    "checkpoint.export_hf": "every stage but the last exports its result for the next one",
    "checkpoint.resume": "give checkpoint.resume=PATH on the command line: it applies to the stage holding PATH",
    "model.init_from": "a stage starts from the previous stage's export",
    "model.arch": "a stage starts from the previous stage's export",
    "model.preset": "a stage starts from the previous stage's export",
}


def _chain_keys(cfg: RootConfig, i: int) -> list[str]:
    """The keys the chain sets in stage ``i``'s recipe."""
    keys = ["run.output_dir", "data.synthetic.output_dir", "checkpoint.resume"]
    if i < len(cfg.stages) - 1:
        keys.append("checkpoint.export_hf")
    if i > 0:
        keys += ["model.init_from", "model.arch", "model.preset"]
    return keys


def _stage_of(cfg: RootConfig, path: str) -> int | None:
    """The index of the stage whose directory holds checkpoint ``path`` (None: no stage's)."""
    target = Path(path).resolve()
    root = Path(cfg.run.output_dir).resolve()
    for i, st in enumerate(cfg.stages):
        if (root / st.name) in target.parents:
            return i
    return None


def stage_config(cfg: RootConfig, i: int, *, check_paths: bool = True) -> RootConfig:
    """Stage ``i`` of a staged recipe as a plain run: the recipe with ``stages[i].overrides`` laid over it, run in
    ``<run.output_dir>/<name>`` named ``<run.name>/<name>`` (unless the stage sets its own ``run.name``), the
    synthetic sets shared by the stages (``<run.output_dir>/synthetic_data``; a stage that changes
    ``data.synthetic`` has its own, ``synthetic_data_<name>``), and
    after the first stage ``model.init_from`` = the previous stage's export (``<dir>/hf``, written because every
    stage but the last exports). Errors name ``stages[i]``."""
    st = cfg.stages[i]
    root = Path(cfg.run.output_dir)
    base = OmegaConf.structured(dataclasses.replace(cfg, stages=[]))
    chain: dict[str, Any] = {"run": {"output_dir": str(root / st.name)}}
    if "name" not in (st.overrides.get("run") or {}):   # wandb (and the model card) tell the stages apart
        chain["run"]["name"] = f"{cfg.run.name or root.name}/{st.name}"
    if cfg.data.synthetic.output_dir is None:
        # one set for the stages that generate it alike; a stage whose overrides change it gets its own
        own = "synthetic" in (st.overrides.get("data") or {})
        chain["data"] = {"synthetic": {"output_dir": str(root / (f"synthetic_data_{st.name}" if own else
                                                                 "synthetic_data"))}}
    # checkpoint.resume=PATH continues the stage that holds PATH; the others resume as usual
    resume = cfg.checkpoint.resume
    chain["checkpoint"] = {"resume": resume if resume in ("auto", "none") or _stage_of(cfg, resume) == i else "auto"}
    if i < len(cfg.stages) - 1:
        chain["checkpoint"]["export_hf"] = True
    if i > 0:
        chain["model"] = {"init_from": str(root / cfg.stages[i - 1].name / "hf"), "arch": None, "preset": None}
    try:
        over = OmegaConf.create(dict(st.overrides))
        _coerce_lists(over, RootConfig, f"stages[{i}].overrides")
        merged = OmegaConf.merge(base, over, OmegaConf.create(chain))
        out: RootConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(f"stages[{i}] ({st.name}): {_explain(e)}") from None
    except ConfigError as e:   # _coerce_lists: names the key under stages[i].overrides
        raise ConfigError(f"stages[{i}] ({st.name}): {e}") from None
    try:
        validate(out, check_paths=check_paths)
    except ConfigError as e:
        raise ConfigError(f"stages[{i}] ({st.name}): {e}") from None
    return out


def _validate_layout(cfg: RootConfig, num_experts: int | None) -> None:
    """The layout rules that hold for every world size (``rynnscale.parallel.layout``; the world size
    itself is checked at launch)."""
    p = cfg.parallel
    try:
        check_layout_keys(p.dp_replicate, p.dp_shard, p.ep, num_experts, p.cp)
    except LayoutError as e:
        raise ConfigError(f"config key 'parallel': {e}") from None


def to_yaml(cfg: RootConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: RootConfig, path: str | Path) -> None:
    """Write the fully resolved config (what the run actually used) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
