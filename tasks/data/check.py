"""Check the three splits with the Great Expectations suite; rows that fail go to quarantine, not to training.

The check formats every example with the real tokenizer and chat template to judge its length (and hands
the clean examples' token ids to the format stage, so nothing is tokenized twice), compares
the splits for leakage (the same prompt in train and a held-out split: the train copy is set aside, so the
held-out sets stay comparable across runs; in validation and test: the validation copy, so nothing chosen on
validation has seen a test question), writes GX's Data Docs and a machine-readable summary, and accounts for
every row read: per file, rows kept + rows quarantined = rows read. Then `data.on_invalid`, `data.max_invalid_fraction`
and `data.min_rows` decide whether the run may go on; when it may not, `DataCheckError` says why and where
every set-aside row is, before any model is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

from prefect import task

from tunepipe.data_checks import chat_suite
from tunepipe.tasks.chat.examples import Example, read_examples, write_jsonl
from tunepipe.tasks.chat.metrics import required_keys
from tunepipe.tasks.chat.template import ChatContext
from tunepipe.tasks.data.files import Rejection
from tunepipe.tasks.data.format import FormatRefused, tokenize_pieces, tokenizer_key, tokens_line
from tunepipe.tasks.data.results import CheckedData, DataCheckReport, FileAccount, LoadedData, TokenizedSplits
from tunepipe.tasks.runtime.base_model import BaseModelRef, load_tokenizer
from tunepipe.tasks.runtime.caching import StageCache, stage_dir
from tunepipe.tasks.runtime.config import DataConfig, ModelConfig

ROWS_SHOWN = 5  # set-aside rows quoted in a failure message
SPLIT_NAMES = {"train": "train", "validation": "validation", "eval": "test"}  # `eval` holds the test split


class DataCheckError(ValueError):
    """The data may not go on to training; `checked` holds the full report."""

    def __init__(self, message: str, checked: CheckedData) -> None:
        super().__init__(message, checked)  # both in args, so the error survives pickling by Prefect
        self.checked = checked

    def __str__(self) -> str:
        return self.args[0]


def formatted_tokens(
    examples: list[Example], tokenizer, chat: ChatContext
) -> tuple[list[int | None], list[str | None], list[str | None]]:
    """Token count of each example as the format stage will write it, its token ids as a line of a
    `TokenizedSplits` file (kept as text: about 8 bytes a token, against 36 as a list of Python ints), and
    why the chat template cannot train it; None for the first two where its roles cannot be formatted or
    the template refuses it."""
    roles = re.compile(chat_suite.ROLES_REGEX)
    valid = [i for i, e in enumerate(examples) if roles.match(",".join(m.role for m in e.messages))]
    lengths: list[int | None] = [None] * len(examples)
    lines: list[str | None] = [None] * len(examples)
    refusals: list[str | None] = [None] * len(examples)
    found = tokenize_pieces(tokenizer, [examples[i] for i in valid], chat=chat, refusals=True)
    for i, pieces in zip(valid, found, strict=True):
        if isinstance(pieces, FormatRefused):
            refusals[i] = pieces.reason
            continue
        lengths[i] = sum(len(ids) for ids, _ in pieces)
        lines[i] = tokens_line(examples[i], pieces)
    return lengths, lines, refusals


def check_dataset(
    loaded: LoadedData, cfg: DataConfig, base: BaseModelRef, model: ModelConfig, out_dir: Path
) -> CheckedData:
    """Validate the splits, write clean rows, quarantine, Data Docs and summary; raise if the run may not go on."""
    splits = {
        "train": list(read_examples(loaded.train_path)),
        "validation": list(read_examples(loaded.validation_path)),
        "eval": list(read_examples(loaded.eval_path)),
    }
    tokenizer = load_tokenizer(base, model.chat_template)
    # Every later stage renders with this: training's texts are made here.
    chat = ChatContext.today(cfg.reasoning, str(tokenizer.chat_template))
    # Where a split's prompts are kept when they also appear in a split later in `splits`: test over all,
    # validation over train.
    later = {"train": ("validation", "eval"), "validation": ("eval",), "eval": ()}
    prompts: dict[str, dict[str, str]] = {split: {} for split in splits}
    for split, examples in splits.items():
        for example in examples:
            prompts[split].setdefault(chat_suite.prompt_key(example), f"{SPLIT_NAMES[split]}: {example.where}")
    # Without configured keys, the held-out answers must carry the keys every training answer shares.
    held_out_keys = cfg.required_keys or required_keys(
        example.answer for example in splits["train"] if example.kind != "undesirable"
    )
    keys = {"train": cfg.required_keys, "validation": held_out_keys, "eval": held_out_keys}
    frames, suites, token_lines = {}, {}, {}
    for split, examples in splits.items():
        kept_there = [prompts[other] for other in reversed(later[split]) if prompts[other]]
        copies = (
            [
                next((where[key] for where in kept_there if key in where), None)
                for key in map(chat_suite.prompt_key, examples)
            ]
            if kept_there
            else None
        )
        lengths, token_lines[split], refusals = formatted_tokens(examples, tokenizer, chat)
        frames[split] = chat_suite.examples_frame(examples, lengths, copies, refusals)
        suites[split] = chat_suite.build_suite(
            f"tunepipe_{split}",
            cfg.max_chars,
            model.max_seq_length,
            cfg.output_format == "json",
            keys[split],
            leakage=bool(kept_there),
        )
    docs_dir = out_dir / "data_docs"
    shutil.rmtree(docs_dir, ignore_errors=True)  # Data Docs list every validation in the folder: this run's only
    results = chat_suite.validate(frames, suites, docs_dir)

    reports, set_aside = {}, []
    tokens = TokenizedSplits(
        train=out_dir / "train_tokens.jsonl",
        validation=out_dir / "validation_tokens.jsonl",
        eval=out_dir / "eval_tokens.jsonl",
        tokenizer=tokenizer_key(base, model.chat_template, chat),
        chat=chat,
    )
    for split, examples in splits.items():
        failures = chat_suite.failed_rows(results[split], frames[split], examples, cfg.max_chars, model.max_seq_length)
        set_aside += [
            Rejection(
                source=examples[i].source,
                line=examples[i].line,
                unit=examples[i].unit,
                field=",".join(dict.fromkeys(f.column for f in row_failures)),
                reason="; ".join(f.reason for f in row_failures),
                raw=examples[i].model_dump_json(),
                stage="check",
            )
            for i, row_failures in failures.items()
        ]
        passed = [i for i in range(len(examples)) if i not in failures]
        kept = [i for i in passed if examples[i].kind != "undesirable"]
        bad = [examples[i] for i in passed if examples[i].kind == "undesirable"]
        clean = [examples[i] for i in passed]
        reports[split] = DataCheckReport(
            success=bool(results[split].success),
            n_checked=len(examples),
            n_passed=len(clean),
            n_quarantined=len(failures),
            expectations=chat_suite.expectation_summary(results[split]),
            clean_path=out_dir / f"{split}_clean.jsonl",
            n_undesirable=len(bad),
            undesirable_path=out_dir / f"{split}_undesirable.jsonl" if bad else None,
        )
        write_jsonl(reports[split].clean_path, [examples[i] for i in kept])
        if bad:
            write_jsonl(reports[split].undesirable_path, bad)
        # A kept row always has token ids: a row whose roles cannot be formatted fails the roles expectation.
        getattr(tokens, split).write_text("".join(token_lines[split][i] + "\n" for i in kept), encoding="utf-8")
        splits[split] = clean

    loaded_rejections = loaded.quarantine_path.read_text(encoding="utf-8").splitlines()
    rejections = [Rejection.model_validate_json(line) for line in loaded_rejections] + set_aside
    quarantine_path = out_dir / "quarantine.jsonl"
    write_jsonl(quarantine_path, rejections)
    files = account_for_rows(loaded, splits, rejections)
    rows_read = sum(f.rows_read for f in files)
    checked = CheckedData(
        train=reports["train"],
        validation=reports["validation"],
        eval=reports["eval"],
        files=files,
        rows_read=rows_read,
        rows_quarantined=len(rejections),
        quarantine_path=quarantine_path,
        data_docs=docs_dir / "index.html",
        summary_path=out_dir / "data_check_summary.json",
        tokens=tokens,
        problems=policy_problems(cfg, reports, rows_read, len(rejections)),
        first_rejections=[r.message for r in rejections[:ROWS_SHOWN]],
        fingerprint=loaded.fingerprint,
    )
    summary = {
        **checked.model_dump(mode="json"),
        "set_aside_by_stage_and_field": dict(Counter(f"{r.stage}: {r.field}" for r in rejections).most_common()),
        "great_expectations": {split: chat_suite.result_json(result) for split, result in results.items()},
    }
    checked.summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if checked.problems:
        raise DataCheckError(failure_message(checked), checked)
    return checked


def account_for_rows(
    loaded: LoadedData, splits: dict[str, list[Example]], rejections: list[Rejection]
) -> list[FileAccount]:
    """Per input file, where its rows went (`splits`: the kept rows of train, validation and eval); a row
    counted twice or lost is a bug, so it raises."""
    kept = {split: Counter(e.source for e in examples) for split, examples in splits.items()}
    quarantined = Counter(r.source for r in rejections)
    files = [
        FileAccount(
            source=f.source,
            unit=f.unit,
            rows_read=f.rows_read,
            kept_train=kept["train"][f.source],
            kept_validation=kept["validation"][f.source],
            kept_eval=kept["eval"][f.source],
            quarantined=quarantined[f.source],
        )
        for f in loaded.files
    ]
    for f in files:
        if f.kept_train + f.kept_validation + f.kept_eval + f.quarantined != f.rows_read:
            raise RuntimeError(f"{f.source}: rows do not add up: {f.model_dump()}")
    return files


def policy_problems(
    cfg: DataConfig, reports: dict[str, DataCheckReport], rows_read: int, rows_quarantined: int
) -> list[str]:
    """Why the run may not go on (empty: it may), from data.on_invalid, max_invalid_fraction and min_rows."""
    problems = []
    if cfg.on_invalid == "fail" and rows_quarantined:
        problems.append(f"{rows_quarantined} of {rows_read} rows are invalid and data.on_invalid is fail")
    elif rows_read and rows_quarantined / rows_read > cfg.max_invalid_fraction:
        problems.append(
            f"{rows_quarantined} of {rows_read} rows ({rows_quarantined / rows_read:.1%}) were set aside, more "
            f"than data.max_invalid_fraction {cfg.max_invalid_fraction:.1%}"
        )
    if reports["train"].n_passed < cfg.min_rows:
        problems.append(f"{reports['train'].n_passed} training rows passed, data.min_rows is {cfg.min_rows}")
    for split, key, fraction in (
        ("validation", "validation", cfg.validation_fraction),
        ("eval", "eval", cfg.eval_fraction),
    ):
        name = SPLIT_NAMES[split]
        if getattr(cfg, key) is None and reports[split].n_checked == 0:  # the split held out nothing: say why
            problems.append(
                f"too few rows to hold out a {name} split: {reports['train'].n_checked} valid row(s) reached the "
                f"split (data.{key}_fraction {fraction}, at least 3 distinct rows needed for train, validation "
                f"and test); add rows, or give held-out rows as data.{key}"
            )
        elif reports[split].n_passed < 1:
            problems.append(f"no {name} row passed")
    return problems


def failure_message(checked: CheckedData) -> str:
    lines = [f"data check failed: {'; '.join(checked.problems)}."]
    if checked.first_rejections:
        lines.append("First rows set aside:")
        lines += [f"  {message}" for message in checked.first_rejections]
    lines.append(f"All {checked.rows_quarantined} set-aside rows with their reasons: {checked.quarantine_path}")
    lines.append(f"Great Expectations Data Docs: {checked.data_docs}")
    return "\n".join(lines)


# The suite and the tokenization (the token ids handed to the format stage) decide the result as much as this module.
@task(
    name="check_data",
    cache_policy=StageCache(sources=("tunepipe.data_checks.chat_suite", "tunepipe.tasks.data.format")),
    persist_result=True,
)
def check_data(
    loaded: LoadedData, cfg: DataConfig, base: BaseModelRef, model: ModelConfig, workdir: Path
) -> CheckedData:
    return check_dataset(loaded, cfg, base, model, stage_dir(workdir, "check_data", loaded, cfg, base, model))
