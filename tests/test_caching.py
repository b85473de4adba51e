"""Stage cache keys: stable content hashes, and a real Prefect cache that re-runs when outputs are deleted."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
from pydantic import BaseModel

from tunepipe.tasks.export.parity import PARITY_CACHE
from tunepipe.tasks.runtime.caching import STAGE_CACHE, StageCache, outputs_exist, stable_hash, stage_dir
from tunepipe.tasks.runtime.config import EvalConfig, OllamaConfig

REPO = Path(__file__).resolve().parent.parent

# --- stable_hash ----------------------------------------------------------------------------------------


def test_stable_hash_is_sha256_of_canonical_json() -> None:
    expected = hashlib.sha256(json.dumps(["a", 1, {"x": "p/q"}], sort_keys=True).encode()).hexdigest()
    assert stable_hash("a", 1, {"x": Path("p/q")}) == expected


def test_stable_hash_is_the_same_in_another_process() -> None:
    parts = "('stage', {'b': [1, 2], 'a': 'x'}, EvalConfig(max_new_tokens=7))"
    code = (
        "from tunepipe.tasks.runtime.caching import stable_hash; "
        f"from tunepipe.tasks.runtime.config import EvalConfig; print(stable_hash{parts})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert other == stable_hash("stage", {"b": [1, 2], "a": "x"}, EvalConfig(max_new_tokens=7))


def test_stable_hash_order_sensitivity() -> None:
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})  # mapping order is irrelevant
    assert stable_hash(1, 2) != stable_hash(2, 1)  # argument order matters
    assert stable_hash([1, 2]) != stable_hash([2, 1])  # list order matters
    assert stable_hash((1, 2)) == stable_hash([1, 2])
    assert stable_hash(1, 2) != stable_hash([1, 2])  # grouping matters
    assert stable_hash("1") != stable_hash(1)


def test_stage_dir(tmp_path: Path) -> None:
    first = stage_dir(tmp_path, "format_data", "fp", EvalConfig())
    assert first.parent == tmp_path / "format_data"
    assert first.name == stable_hash("fp", EvalConfig())[:16]
    assert stage_dir(tmp_path, "format_data", "fp", EvalConfig()) == first
    assert stage_dir(str(tmp_path), "format_data", "fp", EvalConfig()) == first  # a str workdir works too
    assert stage_dir(tmp_path, "format_data", "other") != first
    assert stage_dir(tmp_path, "train", "fp", EvalConfig()).name == first.name  # stage is the folder, not the key
    assert not first.exists()  # computing a place does not create it


# --- outputs_exist -----------------------------------------------------------------------------------------


class Split(BaseModel):
    path: Path
    n_rows: int


class Result(BaseModel):
    train: Split
    extra: list[Path]
    optional: Path | None = None
    label: str = "not/a/path"


def _result(tmp_path: Path) -> Result:
    for name in ("train.jsonl", "a.bin", "b.bin"):
        (tmp_path / name).write_text("x")
    return Result(train=Split(path=tmp_path / "train.jsonl", n_rows=1), extra=[tmp_path / "a.bin", tmp_path / "b.bin"])


def test_outputs_exist_when_every_path_does(tmp_path: Path) -> None:
    assert outputs_exist(_result(tmp_path))
    assert outputs_exist(tmp_path)
    assert outputs_exist(None) and outputs_exist("missing/file") and outputs_exist(3)  # not paths


@pytest.mark.parametrize("missing", ["train.jsonl", "b.bin"])
def test_outputs_exist_notices_a_deleted_nested_path(tmp_path: Path, missing: str) -> None:
    result = _result(tmp_path)
    (tmp_path / missing).unlink()
    assert not outputs_exist(result)


def test_outputs_exist_on_a_tuple(tmp_path: Path) -> None:
    assert outputs_exist((tmp_path, [tmp_path]))
    assert not outputs_exist((tmp_path, [tmp_path / "gone"]))


# --- STAGE_CACHE with a real Prefect server ------------------------------------------------------------------


class Written(BaseModel):
    path: Path
    execution: int  # which execution wrote it: a record and the files it names must come from one execution


@task(cache_policy=STAGE_CACHE, persist_result=True)
def write_output(out_dir: Path, counter: Path, text: str) -> Written:
    """A stage: writes one file and counts its real executions in `counter`."""
    runs = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(runs + 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "output.txt"
    path.write_text(text)
    return Written(path=path, execution=runs + 1)


@flow
def stage_flow(out_dir: Path, counter: Path, text: str) -> tuple[str, Written]:
    """The task's final state name (Completed or Cached) and its result."""
    state = write_output(out_dir, counter, text, return_state=True)
    return state.name, state.result()


@pytest.mark.slow
def test_stage_cache_across_flow_runs_and_after_deletion(prefect_server: None, tmp_path: Path) -> None:
    out_dir, counter = tmp_path / "out", tmp_path / "executions.txt"

    def run() -> tuple[str, Written, int]:
        name, result = stage_flow(out_dir, counter, "hello")
        return name, result, int(counter.read_text())

    # Results go to this test's folder, so no other test (or an earlier session) can answer from its cache.
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        name, first, executions = run()
        assert (name, executions) == ("Completed", 1)
        assert first.path.read_text() == "hello"

        name, second, executions = run()  # a new flow run: the key must not depend on the flow run id
        assert (name, executions) == ("Cached", 1)
        assert second == first

        first.path.unlink()
        name, third, executions = run()  # the cached result points at a deleted file: run again
        assert (name, executions) == ("Completed", 2)
        assert third.path.read_text() == "hello"

        name, fourth, executions = run()  # the first record names the rewritten file too: the newest one answers
        assert (name, executions, fourth) == ("Cached", 2, third)

        name, _ = stage_flow(out_dir, counter, "other input")  # different inputs: a different key
        assert (name, int(counter.read_text())) == ("Completed", 3)
        assert any((tmp_path / "results").iterdir())  # results were stored in this test's folder


@pytest.mark.slow
def test_stage_cache_misses_when_a_declared_source_module_changes(
    prefect_server: None, tmp_path: Path, monkeypatch
) -> None:
    """A stage whose work is done by another module (a worker's entry point) re-runs when that module changes."""
    helper = tmp_path / "stage_helper_module.py"
    helper.write_text("VERSION = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    counter = tmp_path / "executions.txt"

    @task(cache_policy=StageCache(sources=("stage_helper_module",)), persist_result=True)
    def helped(counter: Path) -> int:
        runs = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(runs + 1))
        return runs + 1

    @flow
    def helped_flow() -> str:
        return helped(counter, return_state=True).name

    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        assert (helped_flow(), counter.read_text()) == ("Completed", "1")
        assert (helped_flow(), counter.read_text()) == ("Cached", "1")
        helper.write_text("VERSION = 2\n")
        assert (helped_flow(), counter.read_text()) == ("Completed", "2")


def test_the_train_cache_hashes_every_module_of_the_training_package_the_worker_imports() -> None:
    """Editing any module the training worker runs from tasks/train/ (the head, data parallel) must
    retrain: each one the loop imports, directly or through another, is a declared source of the train stage.
    The task's module and its result type's are hashed by the cache itself; the base model's reference
    (tasks/runtime/base_model.py) is an input, hashed by value."""
    import ast
    import importlib.util

    from tunepipe.tasks.train.task import TRAIN_CACHE

    def imported(module: str) -> set[str]:
        tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
        return {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith(("tunepipe.tasks.train.", "tunepipe.tasks.model."))
        }

    reached, todo = set(), ["tunepipe.tasks.train.loop"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += imported(module) - {"tunepipe.tasks.train.task", "tunepipe.tasks.train.results"}
    assert "tunepipe.tasks.train.head_loss" in reached  # the walk follows imports made inside functions
    assert reached - {"tunepipe.tasks.runtime.base_model"} <= set(TRAIN_CACHE.sources)


@pytest.mark.slow
def test_parity_is_keyed_on_the_served_prompt_settings_only(prefect_server: None, tmp_path: Path) -> None:
    """Moving Ollama (host, timeout, smoke test) must not measure parity again; a new TEMPLATE or SYSTEM must."""
    counter = tmp_path / "executions.txt"

    @task(cache_policy=PARITY_CACHE, persist_result=True)
    def served(ollama_cfg: OllamaConfig) -> int:
        runs = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(runs + 1))
        return runs + 1

    @flow
    def parity_flow(ollama_cfg: OllamaConfig) -> str:
        return served(ollama_cfg, return_state=True).name

    first = OllamaConfig(model_name="shop", host="http://127.0.0.1:11434", system="Answer in JSON.")
    moved = first.model_copy(
        update={"host": "http://gpu-box:11434", "timeout_s": 60, "smoke_examples": 1, "num_ctx": 8192}
    )
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "results"}):
        assert (parity_flow(first), counter.read_text()) == ("Completed", "1")
        assert (parity_flow(moved), counter.read_text()) == ("Cached", "1")
        assert (parity_flow(first.model_copy(update={"system": "Answer in YAML."})), counter.read_text()) == (
            "Completed",
            "2",
        )
        assert (parity_flow(first.model_copy(update={"template": "{{ .Prompt }}"})), counter.read_text()) == (
            "Completed",
            "3",
        )
