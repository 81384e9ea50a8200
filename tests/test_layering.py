"""The package's layers import downward only, function-local and TYPE_CHECKING imports included
(docs/architecture.md has the picture). A new subpackage must be given its place in ``LAYERS``. Model
families sit behind the registry: nothing outside ``rynnscale/models/`` imports a family's package.

Parsing, not importing: every ``import rynnscale.x`` / ``from rynnscale.x import`` / relative import in
every module is an edge from the importing module's layer to the imported one's."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rynnscale"

# bottom first; a layer may import only layers strictly before it (and itself)
LAYERS = [
    ("batch", "fsutil"),       # the batch contract, crash-safe file writes: import nothing of ours
    ("ops",),                  # kernels with a CPU path
    ("parallel",),             # mesh, layout rules, FSDP2 helpers, all-to-all, activation checkpointing, compile
    ("models",),               # the model registry and its families, each with its own parallel plan
    ("config",),               # recipe schema, loading, the recipe -> architecture resolver
    ("data",),                 # online data path, manifest and tag formats
    ("data_pipelines",),       # offline writers and converters
    ("checkpoint",),           # DCP manager, HF import / export
    ("train",),                # the one build path, setup, step, loop, hooks, evaluation
    ("plan",),                 # the planner and the memory measurement
    ("cli", "__main__", "__init__"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def layer_of(module: str) -> str:
    """``rynnscale.train.build`` -> ``train``; ``rynnscale`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every rynnscale import in ``path``, wherever it sits in the file."""
    mod = module_name(path)
    return imports_in(path.read_text(), mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0])


def imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every rynnscale import in ``source`` of a module in ``package``; a
    ``from X import y`` also counts as an import of ``X.y`` (y may be a submodule)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names if a.name != "*"]
    return [(line, t) for line, t in out if t == "rynnscale" or t.startswith("rynnscale.")]


def family_packages() -> set[str]:
    """Model family packages: the subpackages of ``rynnscale/models``."""
    models = PACKAGE / "models"
    return {p.name for p in models.iterdir() if p.is_dir() and (p / "__init__.py").exists()}


def family_imports_outside_models(families: set[str]) -> list[str]:
    """'file:line -> module' of every import of a family package by a module outside ``rynnscale/models``."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "models") in path.parents:
            continue
        for line, target in imported_modules(path):
            parts = target.split(".")
            if len(parts) >= 3 and parts[1] == "models" and parts[2] in families:
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line} -> {target}")
    return out


def edges() -> list[tuple[str, str, str]]:
    """(from layer, to layer, 'file:line -> module') for every cross-layer import."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = layer_of(module_name(path)) if path.parent != PACKAGE else path.stem
        for line, target in imported_modules(path):
            dst = layer_of(target)
            if dst != src:
                out.append((src, dst, f"{path.relative_to(PACKAGE.parent)}:{line} -> {target}"))
    return out


def test_every_subpackage_has_a_layer() -> None:
    names = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    names |= {p.stem for p in PACKAGE.glob("*.py")}
    assert names <= set(RANK), f"place these in tests/test_layering.py LAYERS: {sorted(names - set(RANK))}"


def test_imports_point_downward_only() -> None:
    upward = [where for src, dst, where in edges() if RANK[dst] > RANK[src]]
    assert not upward, "imports reaching an upper layer (a cycle in disguise):\n" + "\n".join(upward)


def test_only_models_imports_a_model_family() -> None:
    """The rest of the code asks the registry (``rynnscale.models``) for a family's spec."""
    families = family_packages()
    assert "qwen3_vl" in families
    found = family_imports_outside_models(families)
    assert not found, "modules outside rynnscale/models import a model family's package:\n" + "\n".join(found)


def test_the_family_checker_sees_every_form(tmp_path, monkeypatch) -> None:
    """A plain, a from-, a submodule-as-name and a function-local import of a family are all found."""
    pkg = tmp_path / "rynnscale"
    (pkg / "models" / "fam").mkdir(parents=True)
    (pkg / "train").mkdir()
    for d in (pkg, pkg / "models", pkg / "models" / "fam", pkg / "train"):
        (d / "__init__.py").write_text("")
    (pkg / "models" / "registry.py").write_text("from rynnscale.models.fam import x\n")   # inside models: allowed
    (pkg / "train" / "a.py").write_text("import rynnscale.models.fam.model\n")
    (pkg / "train" / "b.py").write_text("from rynnscale.models import fam\n")
    (pkg / "train" / "c.py").write_text("def f():\n    from ..models.fam.args import A\n")
    (pkg / "train" / "d.py").write_text("from rynnscale.models import family_of\n")          # the registry: allowed
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    found = family_imports_outside_models(family_packages())
    assert sorted({f.split(":")[0] for f in found}) == ["rynnscale/train/a.py", "rynnscale/train/b.py",
                                                     "rynnscale/train/c.py"], found


def test_subpackage_graph_is_acyclic() -> None:
    """Implied by the ranks, checked directly so the message names the cycle if the ranks are edited."""
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_every_kind_of_import() -> None:
    """Function-local, TYPE_CHECKING and relative imports are edges too (they used to hide the cycles)."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import rynnscale.ops.loss\n"
        "from . import tags\n"
        "from ..checkpoint.dcp import CheckpointManager\n"
        "if TYPE_CHECKING:\n    from rynnscale.plan import Plan\n"
        "def f():\n    from rynnscale.train.trainer import run_training\n"
    )
    found = sorted(t for _, t in imports_in(source, "rynnscale.data"))
    assert found == ["rynnscale.checkpoint.dcp", "rynnscale.checkpoint.dcp.CheckpointManager", "rynnscale.data",
                     "rynnscale.data.tags", "rynnscale.ops.loss", "rynnscale.plan", "rynnscale.plan.Plan",
                     "rynnscale.train.trainer", "rynnscale.train.trainer.run_training"]


def test_module_docstrings_are_short_summaries() -> None:
    """A module docstring says what and why in at most ~40 lines; longer design notes belong in docs/ (a module
    that grew one moves it there and keeps a summary pointing at it)."""
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
        if doc.count("\n") + 1 > 40:
            long[str(path.relative_to(PACKAGE.parent))] = doc.count("\n") + 1
    assert not long, f"module docstrings over 40 lines (move the design note to docs/): {long}"
