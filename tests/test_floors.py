"""Floors in pipeline order: a module imports modules of its own floor or of floors below it, never above.

The ground floor is what every stage uses: run machinery (tasks/runtime: config, caching, tracking, workers,
records), the guarded patches of other libraries (tasks/patches), the other tools tunepipe talks to
(tasks/integrations: Ollama, llama.cpp, the MLflow model registry) and what every stage shares about
conversations (tasks/chat: the example shape, the chat template, greedy answers and their scores). Above it the
stages in the order data flows through them, then the demo's inputs, the flows and the CLI. So following a run
through the code only ever goes down to a floor below, never back up to a stage that comes later.

Every import counts, wherever it is (module level, inside a function, under `if TYPE_CHECKING:`), as in
test_architecture.py, whose reader this test uses.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_architecture import REPO, imported_modules, project_modules

# Bottom to top, each floor with its packages.
FLOORS = (
    (
        "ground",
        ("tunepipe.tasks.runtime", "tunepipe.tasks.patches", "tunepipe.tasks.integrations", "tunepipe.tasks.chat"),
    ),
    ("data", ("tunepipe.tasks.data", "tunepipe.data_checks")),
    ("model", ("tunepipe.tasks.model",)),
    ("train", ("tunepipe.tasks.train",)),
    ("evaluate", ("tunepipe.tasks.evaluate",)),
    ("export", ("tunepipe.tasks.export",)),
    ("serve", ("tunepipe.tasks.serve",)),
    ("demo", ("tunepipe.tasks.demo",)),
    ("flows", ("tunepipe.flows",)),
    ("deployments", ("tunepipe.deployments",)),
)


def floor_of(module: str) -> int | None:
    """The floor's number (0: ground), or None for a module of a package no floor names."""
    if module == "tunepipe.tasks":  # the top package itself, empty
        return 0
    for number, (_, packages) in enumerate(FLOORS):
        if any(module == package or module.startswith(package + ".") for package in packages):
            return number
    return None


def upward_imports(root: Path = REPO) -> list[str]:
    """Every import of a higher floor, as `file:line: module (floor) imports module (floor)`, and every module
    that no floor names."""
    modules = project_modules(root)
    problems = []
    for name, path in sorted(modules.items()):
        floor = floor_of(name)
        where = path.relative_to(root)
        if floor is None:
            problems.append(f"{where}: {name} is on no floor: add its package to FLOORS")
            continue
        for target, line in sorted(imported_modules(name, path, modules).items(), key=lambda item: item[1]):
            above = floor_of(target)
            if above is not None and above > floor:
                problems.append(
                    f"{where}:{line}: {name} ({FLOORS[floor][0]}) imports {target} "
                    f"({FLOORS[above][0]}), a floor above it"
                )
    return problems


def test_an_import_of_a_higher_floor_is_named_with_its_file_and_line(tmp_path):
    for folder in (
        "tasks",
        "tasks/runtime",
        "tasks/data",
        "tasks/serve",
        "tasks/elsewhere",
        "flows",
        "deployments",
        "data_checks",
    ):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "tasks" / "runtime" / "config.py").write_text("def load():\n    from tunepipe.tasks.data import load\n")
    (tmp_path / "tasks" / "data" / "load.py").write_text("from tunepipe.tasks.runtime.config import load\n")
    (tmp_path / "tasks" / "serve" / "task.py").write_text(
        "import tunepipe.tasks.data.load\nfrom tunepipe.flows import finetune\n"
    )
    (tmp_path / "flows" / "finetune.py").write_text("from tunepipe.tasks.serve.task import plan\n")

    assert upward_imports(tmp_path) == [
        "tasks/elsewhere/__init__.py: tunepipe.tasks.elsewhere is on no floor: add its package to FLOORS",
        "tasks/runtime/config.py:2: tunepipe.tasks.runtime.config (ground) imports tunepipe.tasks.data.load (data),"
        " a floor above it",
        "tasks/serve/task.py:2: tunepipe.tasks.serve.task (serve) imports tunepipe.flows.finetune (flows),"
        " a floor above it",
    ]


def test_no_module_imports_a_higher_floor():
    assert len(project_modules()) > 40  # the reader found the project, not an empty folder
    if problems := upward_imports():
        pytest.fail(f"{len(problems)} import(s) of a higher floor:\n" + "\n".join(problems))
