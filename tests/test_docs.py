"""The users' documents (README.md, docs/*.md, recipes/README.md, bench/README.md) name only config keys, CLI
flags and repository files that exist, and their recipe commands load.

tests/test_readme.py runs the README's ```bash blocks; this covers everything else those documents write: config
keys in prose and inline code (``a.b.c=``, ``model.lora.*``, ``data.mixture[1].weight``), ``rynnscale ...``
commands shown inline or in indented blocks (each ``--flag`` against that subcommand's parser; each ``rynnscale
train|plan recipes/X.yaml key=value ...`` loaded, and planned for ``plan``), and referenced paths. Each checker
is shown to fail on a planted mistake, so none of them can pass vacuously.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "recipes" / "README.md", REPO / "bench" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
# dotted names of a config section's spelling that are not config keys
NOT_CONFIG_KEYS = {
    "train.max_step",    # README's example of the message for a misspelt key
    "model.new_cache",   # docs/model_families.md: a model method
}
PARAMETER_NAMES = ("model.visual.", "model.language_model.", "model.layers.")   # HF parameter-name patterns
PACKAGES = "|".join(sorted(p.name for p in (REPO / "rynnscale").iterdir() if (p / "__init__.py").is_file()))
FILE_SUFFIXES = {"py", "yaml", "json", "jsonl", "md", "safetensors", "tar", "png", "sh"}


def _schema_keys() -> tuple[set[str], set[str], set[str]]:
    """(every dotted key, the keys of dict fields (anything below them is the user's), the top-level sections)."""
    from rynnscale.config.schema import RootConfig

    keys: set[str] = set()
    dict_keys: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp, key = hints[f.name], prefix + f.name
            keys.add(key)
            if any(t is dict or typing.get_origin(t) is dict for t in (tp, *typing.get_args(tp))):
                dict_keys.add(key)
            for sub in (tp, *typing.get_args(tp)):   # a section, or a list of sections
                if dataclasses.is_dataclass(sub):
                    walk(sub, key + ".")

    walk(RootConfig, "")
    return keys, dict_keys, {f.name for f in dataclasses.fields(RootConfig)}


def _lines(text: str) -> list[tuple[int, str]]:
    """(number of its first line, line) with shell continuations (``\\`` at the end) joined."""
    out, pending, start = [], "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = n
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + (line.lstrip() if pending else line)))
        pending = ""
    return out


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, code) of every fenced or indented code line and every inline code span."""
    out, fenced = [], False
    for n, line in _lines(text):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    ") and not line.lstrip().startswith(("-", "|", "`")):
            out.append((n, line))
        out += [(n, span) for span in re.findall(r"`([^`\n]+)`", line)]
    return out


def unknown_config_keys(text: str, where: str) -> list[str]:
    """``where:line: key`` for every dotted name of a config section in ``text``'s code that the schema lacks."""
    keys, dict_keys, tops = _schema_keys()
    sections = "|".join(sorted(tops))
    pattern = re.compile(r"(?<![\w./$<{-])((?:" + sections + r")(?:\.(?:\w+|\*|<\w+>)(?:\[\w*\])?)+)")
    problems = []
    for n, code in _code_lines(text):
        for m in pattern.finditer(code):
            name = m.group(1)
            parts = [p for p in re.sub(r"\[\w*\]", "", name).split(".") if not p.isdigit()]
            if parts[0] == "stages" and len(parts) > 2 and parts[1] not in ("name", "overrides"):
                parts = parts[2:]   # stages.<name>.<key>: one stage's key
            while parts and (parts[-1] == "*" or parts[-1].startswith("<")):
                parts.pop()
            if not parts:   # `stages.<name>.<key>`: a placeholder
                continue
            key = ".".join(parts)
            if (name in NOT_CONFIG_KEYS or parts[-1] in FILE_SUFFIXES or name.startswith(PARAMETER_NAMES)
                    or len(parts) > 1 and (REPO / "rynnscale" / parts[0] / f"{parts[1]}.py").is_file()):   # a module
                continue
            if key not in keys and not any(key.startswith(d + ".") for d in dict_keys):
                problems.append(f"{where}:{n}: config key {name!r} is not in rynnscale/config/schema.py")
    return problems


def _options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], set[str]]:
    out = {path: {s for a in parser._actions for s in a.option_strings}}
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                out.update(_options(sub, path + (name,)))
    return out


def _rynnscale_commands(text: str) -> list[tuple[int, list[str]]]:
    """(line, argv after ``rynnscale``) of every ``rynnscale ...`` / ``-m rynnscale ...`` command in the code."""
    out = []
    for n, code in _code_lines(text):
        code = code.split(" # ")[0]
        for m in re.finditer(r"(?:^|\s|-m )rynnscale ([a-z][^`|;&]*)", code):
            try:
                argv = shlex.split(m.group(1).replace("[", " ").replace("]", " ").replace("...", " "))
            except ValueError:
                continue
            out.append((n, argv))
    return out


def unknown_cli_flags(text: str, where: str) -> list[str]:
    """``where:line: ...`` for every ``--flag`` of a ``rynnscale`` command that its subcommand does not accept."""
    from rynnscale.cli import build_parser

    table = _options(build_parser())
    problems = []
    for n, argv in _rynnscale_commands(text):
        path: tuple[str, ...] = ()
        for tok in argv:
            if path + (tok,) in table:
                path += (tok,)
            else:
                break
        if not path:
            continue   # prose such as "rynnscale is ..."
        subcommands = {k[len(path)] for k in table if len(k) > len(path) and k[:len(path)] == path}
        rest = argv[len(path):]
        if subcommands and rest and re.fullmatch(r"[a-z][\w-]*", rest[0]):   # not `synth|convert`, `{a,b}`, a flag
            problems.append(f"{where}:{n}: `rynnscale {' '.join(path)}` has no subcommand {rest[0]!r} "
                            f"(it has {sorted(subcommands)})")
        for tok in argv:
            flag = tok.split("=")[0]
            if flag.startswith("--") and flag not in table[path]:
                problems.append(f"{where}:{n}: `rynnscale {' '.join(path)}` has no option {flag} "
                                f"(it takes {sorted(table[path] - {'-h', '--help'})})")
    return problems


def recipe_commands(text: str) -> list[tuple[int, str, str, list[str]]]:
    """(line, train | plan, recipe, key=value overrides) of every ``rynnscale train|plan recipes/...`` command."""
    out = []
    for n, argv in _rynnscale_commands(text):
        if len(argv) >= 2 and argv[0] in ("train", "plan") and argv[1].startswith("recipes/"):
            out.append((n, argv[0], argv[1], [a for a in argv[2:] if "=" in a and not a.startswith("-")]))
    return out


def missing_paths(text: str, where: str, base: Path) -> list[str]:
    """Repository paths (``rynnscale/...``, ``recipes/...``, ``tests/...``, ...) and relative links that do not exist."""
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        cands = set(re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", line))
        cands |= set(re.findall(r"(?<![\w/.$~-])((?:rynnscale|recipes|tests|bench|docs|launchers|\.ci)/[\w./{},-]*\w)",
                                line))
        cands |= {"rynnscale/" + m for m in re.findall(rf"(?<![\w/.$~-])((?:{PACKAGES})/[\w/]*\.py)\b", line)}
        for cand in cands:
            m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", cand)
            for path in ([m.group(1) + x + m.group(3) for x in m.group(2).split(",")] if m else [cand]):
                if not ((base / path).exists() or (REPO / path).exists()
                        or (REPO / "recipes" / path).exists() or (REPO / "rynnscale" / "models" / path).exists()):
                    problems.append(f"{where}:{n}: {path} does not exist")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_keys_in_the_docs_exist(doc: Path) -> None:
    assert not (problems := unknown_config_keys(doc.read_text(), str(doc.relative_to(REPO)))), "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_cli_flags_in_the_docs_exist(doc: Path) -> None:
    assert not (problems := unknown_cli_flags(doc.read_text(), str(doc.relative_to(REPO)))), "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_paths_in_the_docs_exist(doc: Path) -> None:
    problems = missing_paths(doc.read_text(), str(doc.relative_to(REPO)), doc.parent)
    assert not problems, "\n".join(problems)


def refused_recipe_commands(text: str, where: str) -> tuple[int, list[str]]:
    """(how many ``rynnscale train|plan recipes/...`` commands, ``where:line: ...`` for each that does not load as
    ``train`` would load it (paths unchecked: ``/mnt/...`` is the user's) or, for ``plan``, does not plan)."""
    from rynnscale.config.load import load_config
    from rynnscale.plan import plan_recipe

    commands, problems = recipe_commands(text), []
    for n, cmd, recipe, overrides in commands:
        overrides = [o for o in overrides if "<" not in o]   # `model.init_from=<Qwen3.5-MoE dir>`
        try:
            cfg = load_config(REPO / recipe, overrides, check_paths=False)
            if cmd == "plan":
                plan_recipe(cfg, recipe)
        except Exception as e:   # noqa: BLE001 - every refusal is the finding
            problems.append(f"{where}:{n}: rynnscale {cmd} {recipe} {' '.join(overrides)}: {type(e).__name__}: {e}")
    return len(commands), problems


def test_recipe_commands_in_the_docs_load_and_plan() -> None:
    """Every ``rynnscale train|plan recipes/...`` command outside the README's bash blocks (tests/test_readme.py runs
    those) loads, and a ``plan`` plans."""
    seen, problems = 0, []
    for doc in DOCS:
        text = doc.read_text()
        if doc == REPO / "README.md":   # blank out the bash blocks test_readme.py runs (keeping line numbers)
            text = re.sub(r"```bash\n.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
        n, found = refused_recipe_commands(text, str(doc.relative_to(REPO)))
        seen, problems = seen + n, problems + found
    assert seen >= 5, f"only {seen} recipe commands found in the docs"
    assert not problems, "\n".join(problems)


def test_the_checkers_find_planted_mistakes(tmp_path: Path) -> None:
    """A misspelt key, an unknown flag or subcommand, a missing path and a refused override are each reported."""
    text = ("Set `optim.lr_max=1e-3` or `model.lora.rnk`, run `rynnscale data convert jsonl F OUT --media-dir D`\n"
            "or `rynnscale ckpt export CKPT OUT`; see `recipes/finetune/no_such.yaml` and `train/no_such.py`:\n\n"
            "    rynnscale plan recipes/base/qwen3_vl_8b.yaml train.micro_batch_tokens=8192 --nodes 2\n")
    assert [p.split(": ", 1)[1] for p in unknown_config_keys(text, "t")] == [
        "config key 'optim.lr_max' is not in rynnscale/config/schema.py",
        "config key 'model.lora.rnk' is not in rynnscale/config/schema.py"]
    flags = unknown_cli_flags(text, "t")
    assert len(flags) == 2 and "t:1: `rynnscale data convert jsonl` has no option --media-dir" in flags[0], flags
    assert "t:2: `rynnscale ckpt` has no subcommand 'export' (it has ['export-hf', 'inspect'])" in flags[1], flags
    assert sorted(missing_paths(text, "t", tmp_path)) == ["t:2: recipes/finetune/no_such.yaml does not exist",
                                                          "t:2: rynnscale/train/no_such.py does not exist"]
    assert recipe_commands(text) == [(4, "plan", "recipes/base/qwen3_vl_8b.yaml", ["train.micro_batch_tokens=8192"])]
    n, refused = refused_recipe_commands(text, "t")
    assert n == 1 and len(refused) == 1 and "PlanError: plan.visual_tokens_per_micro_batch=10240" in refused[0], refused
