"""The RAG source: SQL table and JSONL drops, selection, and exactly-once ingestion through the watermark."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tunepipe.tasks.data.rag_logs import RagSourceError
from tunepipe.tasks.data.rag_source import (
    ConcurrentIngestion,
    collect_new_rows,
    commit_snapshot,
    count_new_rows,
    load_snapshot,
    mark_trained,
    read_state,
    state_dir,
)
from tunepipe.tasks.runtime.config import PipelineConfig

BASE = [{"input": f"base question {i}", "output": f"base answer {i}"} for i in range(4)]


def make_db(path: Path, rows: list[tuple]) -> Path:
    with sqlite3.connect(path) as db:
        db.execute(
            "create table rag_examples (id integer primary key, question text, context text, answer text, "
            "rating text, created_at text)"
        )
        insert(path, rows)
    return path


def insert(path: Path, rows: list[tuple]) -> None:
    with sqlite3.connect(path) as db:
        db.executemany(
            "insert into rag_examples (question, context, answer, rating, created_at) values (?, ?, ?, ?, ?)", rows
        )


def row(i: int, rating: str | None = "5", context: str | None = "retrieved passage") -> tuple:
    return (f"new question {i}", context, f"new answer {i}", rating, f"2026-11-{10 + i % 10:02d}T10:00:00")


def pipeline(tmp_path: Path, **rag) -> PipelineConfig:
    train = tmp_path / "base.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in BASE))
    return PipelineConfig.model_validate(
        {
            "name": "t",
            "workdir": str(tmp_path / "runs"),
            "data": {"train": str(train), "system_prompt": "Answer from the context."},
            "model": {"base": "unused"},
            "ollama": {"model_name": "t"},
            "rag": {"sql_url": f"sqlite:///{tmp_path / 'rag.db'}", "min_new_examples": 1, **rag},
        }
    )


def ingest(cfg: PipelineConfig):
    collected = collect_new_rows(cfg.rag, cfg.data, state_dir(cfg))
    return collected, commit_snapshot(collected, cfg.data)


def rag_lines(snapshot) -> list[dict]:
    return [json.loads(line) for line in (snapshot.folder / "rag.jsonl").open()]


def test_rows_inserted_during_a_run_are_read_by_the_next_run_exactly_once(tmp_path: Path):
    cfg = pipeline(tmp_path)
    db = make_db(tmp_path / "rag.db", [row(i) for i in range(3)])
    collected = collect_new_rows(cfg.rag, cfg.data, state_dir(cfg))
    insert(db, [row(i) for i in range(3, 5)])  # arrives while the run trains
    first = commit_snapshot(collected, cfg.data)
    assert first.new_by_source == {"sql:rag_examples": 3}
    assert read_state(state_dir(cfg)).watermark.sql_key == [3]

    collected, second = ingest(cfg)
    assert collected.n_read == 2 and second.new_by_source == {"sql:rag_examples": 2}
    refs = [line["rag"]["ref"] for line in rag_lines(second)]
    assert refs == ["1", "2", "3", "4", "5"]  # every row once, none lost
    assert second.rows_by_source == {"base": 4, "sql:rag_examples": 5}
    merged = second.data.train.read_text().splitlines()
    assert len(merged) == 9 and json.loads(merged[0])["messages"][1:] == [
        {"role": "user", "content": "base question 0"},
        {"role": "assistant", "content": "base answer 0"},
    ]
    assert collect_new_rows(cfg.rag, cfg.data, state_dir(cfg)).n_read == 0


def test_a_run_that_dies_before_the_commit_leaves_the_watermark_and_loses_nothing(tmp_path: Path, monkeypatch):
    cfg = pipeline(tmp_path)
    make_db(tmp_path / "rag.db", [row(i) for i in range(3)])
    collected = collect_new_rows(cfg.rag, cfg.data, state_dir(cfg))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # The snapshot folder is written, then the process dies before the state file is replaced.
    monkeypatch.setattr("tunepipe.tasks.data.rag_source._write_atomically", crash)
    with pytest.raises(OSError, match="disk full"):
        commit_snapshot(collected, cfg.data)
    monkeypatch.undo()
    assert read_state(state_dir(cfg)).version == 0 and read_state(state_dir(cfg)).watermark.sql_key is None

    collected, snapshot = ingest(cfg)  # the next run reads the same rows and overwrites the orphan folder
    assert collected.n_read == 3 and snapshot.version == 1
    assert [line["rag"]["ref"] for line in rag_lines(snapshot)] == ["1", "2", "3"]


def test_a_snapshot_whose_training_failed_stays_pending(tmp_path: Path):
    cfg = pipeline(tmp_path, min_new_examples=3)
    make_db(tmp_path / "rag.db", [row(i) for i in range(3)])
    _, snapshot = ingest(cfg)
    # training crashed: not marked trained, so the next run has 3 pending examples without any new row
    again = collect_new_rows(cfg.rag, cfg.data, state_dir(cfg))
    assert again.n_new == 0 and again.n_pending == 3
    mark_trained(state_dir(cfg), snapshot)
    assert collect_new_rows(cfg.rag, cfg.data, state_dir(cfg)).n_pending == 0


def test_two_runs_racing_cannot_both_commit(tmp_path: Path):
    cfg = pipeline(tmp_path)
    make_db(tmp_path / "rag.db", [row(i) for i in range(2)])
    first = collect_new_rows(cfg.rag, cfg.data, state_dir(cfg))
    second = collect_new_rows(cfg.rag, cfg.data, state_dir(cfg))
    commit_snapshot(first, cfg.data)
    with pytest.raises(ConcurrentIngestion):
        commit_snapshot(second, cfg.data)
    assert read_state(state_dir(cfg)).n_rag == 2


def test_selection_by_rating_dedupe_and_bad_rows(tmp_path: Path):
    cfg = pipeline(tmp_path, min_rating=3, keep_unrated=False, feedback_values={"up": 5, "down": 1})
    make_db(
        tmp_path / "rag.db",
        [
            row(0, rating="4"),
            row(1, rating="2"),
            row(2, rating=None),
            row(3, rating="up"),
            ("base question 1", None, "other answer", "5", "2026-11-10"),  # already in the base set
            ("new question 0", None, "a second answer", "5", "2026-11-10"),  # asked before in this batch
            ("new question 9", None, "", "5", "2026-11-10"),  # no answer
            ("new question 8", None, "answer", "meh", "2026-11-10"),  # rating that means nothing
        ],
    )
    collected, snapshot = ingest(cfg)
    assert [line["rag"]["ref"] for line in rag_lines(snapshot)] == ["1", "4"]
    assert collected.skipped == {"rating below min_rating": 1, "unrated": 1, "duplicate question": 2}
    quarantine = [json.loads(line) for line in (snapshot.folder / "quarantine.jsonl").open()]
    assert [(q["field"], q["reason"]) for q in quarantine] == [
        ("answer", "row 7: missing or empty"),
        ("rating", "row 8: 'meh' is neither a number nor one of rag.feedback_values (up, down)"),
    ]
    skipped = [json.loads(line) for line in (snapshot.folder / "skipped.jsonl").open()]
    assert {s["ref"] for s in skipped} == {"2", "3", "5", "6"}
    assert rag_lines(snapshot)[1]["rag"]["rating"] == 5.0


@pytest.mark.parametrize(
    ("mode", "system", "user"),
    [
        ("user", "Answer from the context.", "Context:\nretrieved passage\n\nnew question 0"),
        ("system", "Answer from the context.\n\nContext:\nretrieved passage", "new question 0"),
        ("omit", "Answer from the context.", "new question 0"),
    ],
)
def test_context_enters_the_prompt_as_configured(tmp_path: Path, mode: str, system: str, user: str):
    cfg = pipeline(tmp_path, context_mode=mode)
    make_db(tmp_path / "rag.db", [row(0)])
    _, snapshot = ingest(cfg)
    messages = rag_lines(snapshot)[0]["messages"]
    assert messages == [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
        {"role": "assistant", "content": "new answer 0"},
    ]


def test_jsonl_drops_are_read_by_complete_lines_and_may_grow(tmp_path: Path):
    drops = tmp_path / "drops"
    drops.mkdir()
    cfg = pipeline(tmp_path, sql_url=None, jsonl_dir=str(drops), columns={"rating": "feedback", "context": None})
    day1 = drops / "2026-11-20.jsonl"
    record = {"id": "a1", "question": "q1", "answer": "a1", "feedback": "up", "created_at": "2026-11-20"}
    day1.write_text(json.dumps(record) + "\n" + "not json\n" + '{"id": "a2", "quest')  # last line half-written
    collected, first = ingest(cfg)
    assert collected.n_read == 1 and collected.n_rejected == 1
    assert [line["rag"]["ref"] for line in rag_lines(first)] == ["2026-11-20.jsonl:1"]
    quarantine = [json.loads(line) for line in (first.folder / "quarantine.jsonl").open()]
    assert quarantine[0]["line"] == 2 and quarantine[0]["source"].endswith("2026-11-20.jsonl")

    with day1.open("a") as out:  # the writer finishes its line, and a new drop file appears
        out.write('ion": "q2", "answer": "a2"}\n')
    (drops / "2026-11-21.jsonl").write_text(json.dumps({"question": "q3", "answer": "a3"}) + "\n")
    collected, second = ingest(cfg)
    assert collected.n_read == 2
    assert [line["rag"]["ref"] for line in rag_lines(second)] == [
        "2026-11-20.jsonl:1",
        "2026-11-20.jsonl:3",
        "2026-11-21.jsonl:1",
    ]
    assert second.rows_by_source == {"base": 4, "jsonl:2026-11-20.jsonl": 2, "jsonl:2026-11-21.jsonl": 1}

    day1.write_text("")  # a drop rewritten in place would silently lose or repeat rows
    with pytest.raises(RagSourceError, match="drop files may only grow"):
        count_new_rows(cfg.rag, state_dir(cfg))


def test_created_at_watermark_breaks_ties_by_id(tmp_path: Path):
    cfg = pipeline(tmp_path, watermark_on="created_at")
    db = make_db(
        tmp_path / "rag.db",
        [("q1", None, "a1", None, "2026-11-20T10:00:00"), ("q2", None, "a2", None, "2026-11-20T10:00:00")],
    )
    ingest(cfg)
    insert(db, [("q3", None, "a3", None, "2026-11-20T10:00:00"), ("q4", None, "a4", None, "2026-11-19T09:00:00")])
    # q3 has the same time as the watermark but a larger id: new. q4 is back-dated: before the watermark.
    collected, snapshot = ingest(cfg)
    assert collected.n_read == 1 and rag_lines(snapshot)[-1]["rag"]["ref"] == "3"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def in_folder(d: Path) -> tuple[Path, list[tuple]]:
    write_jsonl(d / "base" / "a.jsonl", BASE[:2])
    write_jsonl(d / "base" / "b.jsonl", BASE[2:])
    return d / "base", [
        (d / "base" / "a.jsonl", 1),
        (d / "base" / "a.jsonl", 2),
        (d / "base" / "b.jsonl", 1),
        (d / "base" / "b.jsonl", 2),
    ]


def in_glob(d: Path) -> tuple[Path, list[tuple]]:
    write_jsonl(d / "parts" / "p1.jsonl", BASE[:3])
    write_jsonl(d / "parts" / "p2.jsonl", BASE[3:])
    first, second = d / "parts" / "p1.jsonl", d / "parts" / "p2.jsonl"
    return d / "parts" / "p*.jsonl", [(first, 1), (first, 2), (first, 3), (second, 1)]


def in_json_array(d: Path) -> tuple[Path, list[tuple]]:
    d.mkdir(parents=True)
    (d / "base.json").write_text(json.dumps(BASE))
    return d / "base.json", [(d / "base.json", n) for n in range(1, 5)]


def in_llama_factory(d: Path) -> tuple[Path, list[tuple]]:
    # Alpaca formatting with renamed columns: only dataset_info.json says which key holds the question.
    write_jsonl(d / "lf" / "qa.jsonl", [{"q": r["input"], "a": r["output"]} for r in BASE])
    (d / "lf" / "dataset_info.json").write_text(
        json.dumps(
            {"qa": {"file_name": "qa.jsonl", "formatting": "alpaca", "columns": {"prompt": "q", "response": "a"}}}
        )
    )
    return d / "lf", [(d / "lf" / "qa.jsonl", n) for n in range(1, 5)]


def in_one_file(name: str, writer):
    def make(d: Path) -> tuple[Path, list[tuple]]:
        d.mkdir(parents=True, exist_ok=True)
        return writer(d / name, BASE), [(d / name, n) for n in range(1, 5)]

    return make


# Each container `data.train` takes, holding BASE: a function of a folder -> (what to configure, (file, line
# or row) of each BASE row).
CONTAINERS = {
    "jsonl": in_one_file("base.jsonl", write_jsonl),
    "csv": in_one_file("base.csv", write_csv),
    "parquet": in_one_file("base.parquet", write_parquet),
    "json-array": in_json_array,
    "folder": in_folder,
    "glob": in_glob,
    "llama-factory": in_llama_factory,
}
ROW_UNITS = {"csv", "parquet", "json-array"}  # numbered by record; JSON Lines by line


@pytest.mark.parametrize("container", CONTAINERS)
def test_snapshot_holds_the_normalised_base_rows_of_any_container_with_their_origin(tmp_path: Path, container):
    from tunepipe.tasks.data.load import load_dataset

    train, origins = CONTAINERS[container](tmp_path / "data")
    cfg = pipeline(tmp_path)
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": train})})
    make_db(tmp_path / "rag.db", [row(0, context=None)])
    _, snapshot = ingest(cfg)

    lines = [json.loads(line) for line in snapshot.data.train.open()]
    expected = [
        {
            "messages": [
                {"role": "system", "content": "Answer from the context."},
                {"role": "user", "content": r["input"]},
                {"role": "assistant", "content": r["output"]},
            ],
            "base": {"source": str(path), "line": n, "unit": "row" if container in ROW_UNITS else "line"},
        }
        for r, (path, n) in zip(BASE, origins, strict=True)
    ]
    assert lines[:4] == expected and lines[4]["rag"]["ref"] == "1"
    assert snapshot.rows_by_source == {"base": 4, "sql:rag_examples": 1}
    # The finetune flow loads the snapshot as it is configured: every row, none rejected.
    loaded = load_dataset(snapshot.data, tmp_path / "loaded")
    assert (loaded.n_train + loaded.n_validation + loaded.n_eval, loaded.n_rejected) == (5, 0)


def test_base_rows_that_cannot_be_used_go_to_the_snapshot_quarantine(tmp_path: Path):
    cfg = pipeline(tmp_path)
    broken = tmp_path / "base.json"
    broken.write_text(json.dumps([*BASE, {"input": "no answer"}]))
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": broken})})
    make_db(tmp_path / "rag.db", [row(0)])
    _, snapshot = ingest(cfg)
    quarantine = [json.loads(line) for line in (snapshot.folder / "quarantine.jsonl").open()]
    assert [(q["source"], q["line"], q["field"]) for q in quarantine] == [(str(broken), 5, "output")]


def test_a_separate_eval_set_is_normalised_into_the_snapshot(tmp_path: Path):
    cfg = pipeline(tmp_path)
    held_out = write_csv(tmp_path / "held_out.csv", [{"instruction": "held-out question", "output": "held-out answer"}])
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval": held_out, "shape": "alpaca"})})
    make_db(tmp_path / "rag.db", [row(0)])
    _, snapshot = ingest(cfg)
    (line,) = [json.loads(line) for line in snapshot.data.eval.open()]
    assert (line["messages"][-2]["content"], line["base"]) == (
        "held-out question",
        {"source": str(held_out), "line": 1, "unit": "row"},
    )


def test_fingerprint_is_of_the_snapshots_content(tmp_path: Path):
    """The snapshot records the `dataset.fingerprint` a finetune run on it computes: a hash of what is on disk."""
    from tunepipe.tasks.data.load import data_fingerprint

    cfg = pipeline(tmp_path)
    db = make_db(tmp_path / "rag.db", [row(0)])
    _, first = ingest(cfg)
    insert(db, [row(1)])
    _, second = ingest(cfg)
    assert first.fingerprint != second.fingerprint  # one more row, another data set
    assert load_snapshot(state_dir(cfg), 1, cfg.data) == first  # the record reads back as written
    with first.data.train.open("a", encoding="utf-8") as train:
        train.write("\n")  # the same rows, one byte more: no longer the data set the record names
    assert data_fingerprint(first.data) != first.fingerprint


def test_unusable_sources_fail_with_the_config_key(tmp_path: Path):
    cfg = pipeline(tmp_path)
    with pytest.raises(RagSourceError, match="rag.sql_url: no SQLite database at"):
        collect_new_rows(cfg.rag, cfg.data, state_dir(cfg))
    make_db(tmp_path / "rag.db", [])
    bad = pipeline(tmp_path, columns={"answer": "response"})
    with pytest.raises(RagSourceError, match="rag.columns.answer: no column 'response'"):
        collect_new_rows(bad.rag, bad.data, state_dir(bad))
    with pytest.raises(RagSourceError, match="rag.table: no table 'logs'"):
        collect_new_rows(pipeline(tmp_path, table="logs").rag, cfg.data, state_dir(cfg))


def test_ratings_become_kto_rows_and_dpo_pairs_with_provenance(tmp_path: Path):
    """max_bad_rating keeps the thumbs-down: KTO rows either side, a DPO pair wherever a prompt has both."""
    from tunepipe.tasks.data.load import load_dataset

    cfg = pipeline(tmp_path, min_rating=4, max_bad_rating=2, context_mode="omit")
    make_db(
        tmp_path / "rag.db",
        [
            ("q0", None, "good answer", "5", "2026-11-01T10:00:00"),
            ("q0", None, "<p>html echoed</p>", "1", "2026-11-01T10:01:00"),
            ("q0", None, "<p>html  echoed</p>", "down", "2026-11-01T10:02:00"),  # the same bad answer again
            ("q1", None, "rambling", "2", "2026-11-01T10:03:00"),  # no good answer to pair it with
            ("q2", None, "so-so", "3", "2026-11-01T10:04:00"),
            ("base question 0", None, "wrong fields", "1", "2026-11-01T10:05:00"),  # pairs with the base answer
        ],
    )
    collected, snapshot = ingest(cfg)
    assert collected.skipped == {"duplicate question": 1, "rating between max_bad_rating and min_rating": 1}
    lines = rag_lines(snapshot)
    assert [(line["rag"]["ref"], line["label"]) for line in lines] == [
        ("1", True),
        ("2", False),
        ("4", False),
        ("6", False),
    ]
    assert lines[1]["prompt"][-1] == {"role": "user", "content": "q0"}
    assert lines[1]["completion"] == [{"role": "assistant", "content": "<p>html echoed</p>"}]
    manifest = json.loads((snapshot.folder / "manifest.json").read_text())
    assert manifest["preference"] == {"desirable": 1, "undesirable": 3, "pairs": 2, "held_out": 0}

    loaded = load_dataset(snapshot.data, tmp_path / "loaded")
    from tunepipe.tasks.chat.examples import read_examples

    examples = [
        *read_examples(loaded.train_path),
        *read_examples(loaded.validation_path),
        *read_examples(loaded.eval_path),
    ]
    pairs = sorted((e.messages[-2].content, e.answer, e.rejected) for e in examples if e.kind == "pair")
    assert pairs == [("base question 0", "base answer 0", "wrong fields"), ("q0", "good answer", "<p>html echoed</p>")]
    assert sorted(e.kind for e in examples) == ["desirable", "pair", "pair", *["sft"] * 4, *["undesirable"] * 3]
    assert loaded.n_rejected == 0


def test_rated_questions_are_held_out_by_prompt_when_eval_is_given(tmp_path: Path):
    cfg = pipeline(tmp_path, min_rating=4, max_bad_rating=2, context_mode="omit")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"input": "held question", "output": "held answer"}) + "\n")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval": eval_file, "eval_fraction": 0.99})})
    make_db(
        tmp_path / "rag.db",
        [
            ("q0", None, "good", "5", "2026-11-01T10:00:00"),
            ("q0", None, "bad", "1", "2026-11-01T10:01:00"),
            ("held question", None, "bad", "1", "2026-11-01T10:02:00"),
            ("q9", None, "unrated", None, "2026-11-01T10:03:00"),
        ],
    )
    collected, snapshot = ingest(cfg)
    # A bad answer to a base eval question is never ingested: training away from it would train on it.
    assert collected.skipped == {"question in the base validation or test set": 1}
    held = [json.loads(line) for line in (snapshot.folder / "eval.jsonl").open()][1:]
    train = [json.loads(line) for line in (snapshot.folder / "train.jsonl").open()]
    assert [(line["completion"][0]["content"], line["label"]) for line in held] == [("good", True), ("bad", False)]
    assert not any("label" in line or "chosen" in line for line in train)  # no pair: its prompt is held out


def test_every_question_keeps_its_side_across_snapshots(tmp_path: Path):
    """Night after night the training set grows, and each question stays where the split first put it: a test
    question is never trained on later, and the champion of an earlier night never trained on today's test."""
    from tunepipe.tasks.chat.examples import read_examples
    from tunepipe.tasks.data.load import load_dataset

    cfg = pipeline(tmp_path)
    cfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"eval_fraction": 0.3, "validation_fraction": 0.3})}
    )
    db = make_db(tmp_path / "rag.db", [row(i) for i in range(20)])

    def sides(snapshot) -> dict[str, str]:
        loaded = load_dataset(snapshot.data, tmp_path / f"loaded-{snapshot.version}")
        found = {}
        for side, path in (
            ("train", loaded.train_path),
            ("validation", loaded.validation_path),
            ("test", loaded.eval_path),
        ):
            found |= {e.messages[-2].content.splitlines()[-1]: side for e in read_examples(path)}
        return found

    _, first = ingest(cfg)
    insert(db, [row(i) for i in range(20, 60)])
    _, second = ingest(cfg)
    night1, night2 = sides(first), sides(second)
    assert len(night1) == 24 and len(night2) == 64  # the 4 base rows and every RAG question, once each
    assert {side: list(night1.values()).count(side) > 0 for side in ("train", "validation", "test")} == {
        "train": True,
        "validation": True,
        "test": True,
    }
    assert {question: night2[question] for question in night1} == night1
    assert not {q for q, side in night1.items() if side == "train"} & {
        q for q, side in night2.items() if side == "test"
    }


def test_a_separate_validation_set_is_normalised_into_the_snapshot(tmp_path: Path):
    cfg = pipeline(tmp_path)
    validation = tmp_path / "validation.jsonl"
    validation.write_text(json.dumps({"input": "validation question", "output": "validation answer"}) + "\n")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"validation": validation})})
    make_db(tmp_path / "rag.db", [row(0), ("validation question", "passage", "rag answer", "5", "2026-11-01T10:00")])
    collected, snapshot = ingest(cfg)
    assert collected.skipped == {"duplicate question": 1}  # a validation question is never trained on
    (line,) = [json.loads(line) for line in snapshot.data.validation.open()]
    assert (line["messages"][-2]["content"], line["base"]) == (
        "validation question",
        {"source": str(validation), "line": 1, "unit": "line"},
    )
