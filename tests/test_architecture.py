"""The house's structure, read from the code: no import circles between project modules.

Every import counts, wherever it is: module level, inside a function, under `if TYPE_CHECKING:`. A circle
through a function-level or type-only import still ties two rooms together: neither can be read, tested or
moved without the other.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "deployments", "data_checks")


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages tunepipe installs."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(("tunepipe", *(parts[:-1] if parts[-1] == "__init__" else parts)))] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The project modules `name` imports (at any depth), each with the line of its first import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from tunepipe.tasks.train import loop` imports the module tunepipe.tasks.train.loop;
            # `from x import name`, module x.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import tunepipe.tasks.a.b` names the module itself; fall back to its closest project package.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph(root: Path = REPO) -> dict[str, dict[str, int]]:
    modules = project_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None: depth-first search for an edge back onto the path."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every way out is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    modules = project_modules()
    return "\n".join(f"  {a} -> {b}  ({modules[a].relative_to(REPO)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The reader counts function-level, TYPE_CHECKING and relative imports, and the search names the circle."""
    for folder in ("tasks", "flows", "deployments", "data_checks"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "tasks" / "a.py").write_text("def f():\n    from tunepipe.tasks.b import g\n")
    (tmp_path / "tasks" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
    )
    (tmp_path / "tasks" / "c.py").write_text("import tunepipe.tasks.a\n")
    graph = import_graph(tmp_path)
    assert graph["tunepipe.tasks.a"] == {"tunepipe.tasks.b": 2} and graph["tunepipe.tasks.b"] == {"tunepipe.tasks.c": 3}
    assert graph["tunepipe.tasks.c"] == {"tunepipe.tasks.a": 1}
    assert find_cycle(graph) == ["tunepipe.tasks.a", "tunepipe.tasks.b", "tunepipe.tasks.c", "tunepipe.tasks.a"]


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 40  # the reader found the project, not an empty folder
    cycle = find_cycle(graph)
    if cycle:
        pytest.fail(f"import circle ({len(cycle) - 1} modules):\n{describe(cycle, graph)}")


# --- following the config through the finetune flow ------------------------------------------------------------
#
# A static walk, so the figure is the same on every machine and every run. From `flows/finetune.py:finetune`,
# the calls of a function are taken in source order; a call that is handed the config and whose target resolves
# through the module's own definitions or imports to a project function is followed into that function, which
# is walked the same way (each function once: a second call to it is not walked again). The files the walk is in
# make a sequence: entering a function of another file appends that file, finishing it appends the caller's file
# again. The flow's own file is left out (it is the hub: every stage is entered from it). A move is a change of
# file along the sequence; a climb back up is a move into a file the walk had already been in and left (a
# helper's return to the stage that called it counts). Method calls (`run.record(...)`)
# are not followed.
#
# "Handed the config" means handed a config object: the whole config or one of its sections (a class of
# tasks/runtime/config/, or any `...Config`), alone or inside an expression (`ollama or default`, a method of
# it such as `model_dump()`). A plain value read from it (`cfg.model.max_seq_length`, `cfg.serve.host`) is data,
# not the config: a helper given plain values does not depend on the config's shape. The type of `cfg.a.b` is
# read from the config classes' field annotations; a parameter named `cfg` / `config` without an annotation is
# taken to be a config object whose fields are all config objects (so an unknown shape is followed, not missed).
CLIMBS_TARGET = 6

FLOW = ("tunepipe.flows.finetune", "finetune")
CONFIG_MODULE = "tunepipe.tasks.runtime.config"
ANY_CONFIG = "?"  # a config object of unknown class


def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def _bindings(name: str, path: Path, tree: ast.Module, modules: dict[str, Path]) -> dict[str, tuple[str, str | None]]:
    """Local name -> (project module, attribute or None for the module itself), from every import in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    bound: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = (f"{base}.{alias.name}", None)
                elif base in modules:
                    bound[alias.asname or alias.name] = (base, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in modules:
                    bound[alias.asname] = (alias.name, None)
    return bound


class ConfigTypes:
    """The config classes (tasks/runtime/config/) and their members' annotations, to type `cfg.a.b` chains."""

    def __init__(self, tree: ast.Module | None):
        classes = [node for node in (tree.body if tree else []) if isinstance(node, ast.ClassDef)]
        self.members: dict[str, dict[str, str]] = {}
        for cls in classes:  # in source order, so a base class is known before its subclasses
            members = {}
            for base in cls.bases:
                members.update(self.members.get(ast.unparse(base), {}))
            for item in cls.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members[item.target.id] = ast.unparse(item.annotation)
                elif isinstance(item, ast.FunctionDef):
                    members[item.name] = ast.unparse(item.returns) if item.returns else ANY_CONFIG
            if members or any(
                ast.unparse(base) in self.members or ast.unparse(base) == "BaseModel" for base in cls.bases
            ):
                self.members[cls.name] = members

    def of_annotation(self, annotation: str) -> str | None:
        """The config class an annotation names (`OllamaConfig | None`, `list[MetricRule]`), or None."""
        for word in re.findall(r"[A-Za-z_]\w*", annotation):
            if word == ANY_CONFIG or word in self.members or word.endswith("Config"):
                return word
        return ANY_CONFIG if annotation == ANY_CONFIG else None

    def of_member(self, cls: str, name: str) -> str | None:
        known = self.members.get(cls)
        if known is None or name not in known:  # an unknown class, or a pydantic method such as model_dump
            return ANY_CONFIG
        return self.of_annotation(known[name])


def _chain(node: ast.AST) -> tuple[str, list[str]] | None:
    """`cfg.a.b` as ("cfg", ["a", "b"]); None for anything else."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.insert(0, node.attr)
        node = node.value
    return (node.id, attrs) if isinstance(node, ast.Name) else None


def _type_of(node: ast.AST, carried: dict[str, str], types: ConfigTypes) -> str | None:
    """The config class a name or attribute chain holds, ANY_CONFIG when unknown, None for a plain value."""
    chain = _chain(node)
    if chain is None or chain[0] not in carried:
        return None
    current = carried[chain[0]]
    for attr in chain[1]:
        current = types.of_member(current, attr)
        if current is None:
            return None
    return current


def _hands_config(node: ast.AST, carried: dict[str, str], types: ConfigTypes) -> bool:
    if _chain(node) is not None:
        return _type_of(node, carried, types) is not None
    return any(_hands_config(child, carried, types) for child in ast.iter_child_nodes(node))


def _config_names(function: ast.FunctionDef, types: ConfigTypes) -> dict[str, str]:
    """The function's names that hold a config object, each with its class."""
    names = {}
    for arg in [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs]:
        cls = types.of_annotation(ast.unparse(arg.annotation)) if arg.annotation else None
        if cls is None and arg.arg in ("cfg", "config"):
            cls = ANY_CONFIG
        if cls is not None:
            names[arg.arg] = cls
    for node in ast.walk(function):  # `cfg = config`, `data = cfg.data`: the same config under another name
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and (cls := _type_of(node.value, names, types)) is not None
        ):
            names[node.targets[0].id] = cls
    return names


def _calls_in_order(function: ast.FunctionDef) -> list[ast.Call]:
    calls = [node for node in ast.walk(function) if isinstance(node, ast.Call)]
    return sorted(calls, key=lambda call: (call.lineno, call.col_offset))


def config_walk(root: Path = REPO) -> list[str]:
    """The sequence of files (module names) the walk is in, the flow's own file left out."""
    modules = project_modules(root)
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in modules.items()}
    functions = {name: _functions(tree) for name, tree in trees.items()}
    bindings = {name: _bindings(name, modules[name], trees[name], modules) for name in modules}
    # The config is a module or a package of one module per section: its classes, from every one of them.
    config_trees = [
        tree for name, tree in sorted(trees.items()) if name == CONFIG_MODULE or name.startswith(CONFIG_MODULE + ".")
    ]
    types = ConfigTypes(ast.Module(body=[node for tree in config_trees for node in tree.body], type_ignores=[]))
    walked: set[tuple[str, str]] = set()
    sequence: list[str] = []

    def target(module: str, func: ast.expr) -> tuple[str, str] | None:
        while isinstance(func, ast.Call):  # `resolve_base.with_options(...)(...)` calls resolve_base
            func = func.func
        if isinstance(func, ast.Attribute) and func.attr in ("with_options", "fn", "submit"):
            func = func.value
        if isinstance(func, ast.Name):
            if func.id in functions[module]:
                return module, func.id
            bound = bindings[module].get(func.id)
            if bound and bound[1] in functions[bound[0]]:
                return bound[0], bound[1]
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):  # `chat_suite.build(...)`
            bound = bindings[module].get(func.value.id)
            if bound and bound[1] is None and func.attr in functions[bound[0]]:
                return bound[0], func.attr
        return None

    def walk(module: str, name: str) -> None:
        walked.add((module, name))
        function = functions[module][name]
        carried = _config_names(function, types)
        for call in _calls_in_order(function):
            callee = target(module, call.func)
            if (
                callee is None
                or callee in walked
                or not any(
                    _hands_config(arg, carried, types) for arg in [*call.args, *(k.value for k in call.keywords)]
                )
            ):
                continue
            if callee[0] != module:
                sequence.append(callee[0])
            walk(*callee)
            if callee[0] != module:
                sequence.append(module)

    walk(*FLOW)
    return [module for module in sequence if module != FLOW[0]]


def climbs(sequence: list[str]) -> tuple[int, list[tuple[str, str]]]:
    """The number of moves along a walk's sequence of files, and the moves that climb back up."""
    moves = [(a, b) for a, b in zip(sequence, sequence[1:]) if a != b]
    been, back = set(sequence[:1]), []
    for a, b in moves:
        if b in been:
            back.append((a, b))
        been.add(b)
    return len(moves), back


def test_the_walk_follows_the_config_and_counts_the_climbs(tmp_path):
    for folder in ("tasks", "tasks/runtime", "flows", "deployments", "data_checks"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "tasks" / "runtime" / "config.py").write_text(
        "class Section(BaseModel):\n    pass\n"
        "class DataConfig(Section):\n    path: str\n    rules: dict[str, Rule]\n"
        "class Rule(Section):\n    min: float\n"
        "class PipelineConfig(Section):\n    data: DataConfig\n"
    )
    (tmp_path / "flows" / "finetune.py").write_text(
        "from tunepipe.tasks.a import first\nfrom tunepipe.tasks.b import second\n"
        "def finetune(config: PipelineConfig):\n    first(config.data)\n    second(config)\n    second(config)\n"
        "    first(1)\n"
    )
    (tmp_path / "tasks" / "a.py").write_text(
        "from tunepipe.tasks import c\n"
        "def first(cfg: DataConfig):\n    c.plain(cfg.path.upper())\n    c.helper(cfg.rules)\n    c.other(0)\n"
    )
    (tmp_path / "tasks" / "b.py").write_text(
        "from tunepipe.tasks.a import first\ndef second(cfg):\n    data = cfg.data\n    first(data)\n"
    )
    (tmp_path / "tasks" / "c.py").write_text(
        "def helper(rules):\n    pass\ndef other(n):\n    pass\ndef plain(path):\n    pass\n"
    )
    sequence = config_walk(tmp_path)
    # a (from the flow), c for the rules (a section; the plain path and the 0 are not followed), back to a;
    # b; a is walked already
    assert sequence == ["tunepipe.tasks.a", "tunepipe.tasks.c", "tunepipe.tasks.a", "tunepipe.tasks.b"]
    assert climbs(sequence) == (3, [("tunepipe.tasks.c", "tunepipe.tasks.a")])


def test_the_config_climbs_back_up_no_more_than_measured():
    moves, back = climbs(config_walk())
    assert moves > 10  # the walk went through the stages, not nowhere
    assert len(back) <= CLIMBS_TARGET, f"{len(back)} climbs back up in {moves} moves: " + ", ".join(
        f"{a} -> {b}" for a, b in back
    )
