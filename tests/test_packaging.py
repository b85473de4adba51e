"""Installed, tunepipe is one name in site-packages, and a Prefect project with its own `flows/` and `tasks/`
keeps them beside it."""

import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("data_checks", "deployments", "flows", "tasks")


def test_the_package_list_names_every_folder_with_an_init():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {
        "tunepipe." + str(init.parent.relative_to(REPO)).replace("/", ".")
        for top in TOP_LEVEL
        for init in (REPO / top).rglob("__init__.py")
    }
    assert sorted(setuptools["packages"]) == sorted(folders)
    assert setuptools["package-dir"] == {f"tunepipe.{top}": top for top in TOP_LEVEL}


USER_TASK = """
def greeting(model: str) -> str:
    return f"hello from the project's own tasks, for {model}"
"""

USER_FLOW = """
import sys

from prefect import flow, task

from tasks.notify import greeting  # the project's own tasks/
from tunepipe.tasks.runtime.config import load_config


@task
def base_model(config_path: str) -> str:
    return load_config(config_path).model.base


@flow
def nightly(config_path: str) -> str:
    return greeting(base_model(config_path))


if __name__ == "__main__":
    print(nightly(sys.argv[1]))
"""


@pytest.mark.slow
def test_the_wheel_beside_a_project_with_its_own_flows_and_tasks(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
    )
    [wheel] = (tmp_path / "dist").glob("tunepipe-*.whl")

    env = tmp_path / "env"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies come from the test's own environment: a path line in a .pth file adds the folder only,
    # so that environment's editable tunepipe (activated by its own .pth files) stays out.
    (site / "dependencies.pth").write_text("".join(path + "\n" for path in sys.path if path.endswith("site-packages")))
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
    )
    installed = {path.name for path in site.iterdir()} - {"dependencies.pth", "__pycache__"}
    assert installed == {"tunepipe", wheel.name.split("-py3")[0] + ".dist-info"}
    assert (site / "tunepipe" / "tasks" / "chat" / "general_prompts.jsonl").is_file()
    assert (site / "tunepipe" / "tasks" / "integrations" / "ollama" / "gotemplate" / "main.go").is_file()

    project = tmp_path / "project"
    for folder, name, code in (("flows", "nightly.py", USER_FLOW), ("tasks", "notify.py", USER_TASK)):
        (project / folder).mkdir(parents=True)
        (project / folder / "__init__.py").write_text("")
        (project / folder / name).write_text(code)
    (project / "tunepipe.yaml").write_text((REPO / "configs" / "demo.yaml").read_text())
    env_vars = {
        "PATH": f"{env / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    done = subprocess.run(
        [python, "-m", "flows.nightly", "tunepipe.yaml"],
        cwd=project,
        env=env_vars,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    base = subprocess.run(
        [python, "-c", "import tunepipe.tasks.runtime.config as c; print(c.load_config('tunepipe.yaml').model.base)"],
        cwd=project,
        env=env_vars,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert done.stdout.strip().endswith(f"hello from the project's own tasks, for {base}")

    cli = subprocess.run(
        [env / "bin" / "tunepipe", "--help"], cwd=project, env=env_vars, capture_output=True, text=True, timeout=300
    )
    assert cli.returncode == 0 and "usage: tunepipe" in cli.stdout, cli.stderr[-2000:]
