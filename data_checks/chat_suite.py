"""The Great Expectations suite for canonical chat examples: one frame per split, one suite, Data Docs.

Each example becomes one row of a pandas frame with the columns the expectations judge (roles, answer,
token count, duplicate and leakage keys). GX validates the frame in an ephemeral context, writes its own
Data Docs (HTML) and names every failing row (`result_format="COMPLETE"` → `unexpected_index_list`), which
`failed_rows` turns into one message per row: where it is and what is wrong.
Great Expectations and pandas are imported inside the functions: importing them costs seconds, and a
cached re-run that never checks data must not pay for that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from tunepipe.tasks.chat.examples import Example, split_reasoning
from tunepipe.tasks.chat.metrics import parse_json_object

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations import ExpectationSuite
    from great_expectations.core import ExpectationSuiteValidationResult

ROLES_REGEX = r"^(?:system,)?(?:user,assistant,)*user,assistant$"
KEY_SEPARATOR = "\x1f"  # joins an answer's keys; cannot occur in a key a user would write
COLUMN_TYPES = {
    "id": "str",
    "normalized_id": "str",
    "prompt_key": "str",
    "roles": "str",
    "prompt": "object",
    "answer": "object",
    "answer_keys": "object",
    "first_empty_turn": "object",
    "chars": "int64",
    "n_tokens": "Int64",
    "eval_copy": "object",
    "chat_template": "object",
    "kind": "str",
    "rejected": "object",
}
EXAMPLES_SHOWN = 5  # unexpected values per expectation in the summary
DOCS_SITE = "tunepipe"


class Failure(NamedTuple):
    column: str
    expectation: str
    reason: str


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def _digest(parts: Sequence[str]) -> str:
    return hashlib.blake2b("\x1e".join(parts).encode("utf-8"), digest_size=8).hexdigest()


def prompt_key(example: Example) -> str:
    """The prompt up to case and whitespace, without system messages: equal on both sides means leakage."""
    return _digest([f"{m.role}:{_normal(m.content)}" for m in example.prompt if m.role != "system"])


def _first_empty_turn(example: Example) -> str | None:
    for i, message in enumerate(example.messages):
        # An answer that is all reasoning and no answer is empty too.
        text = split_reasoning(message.content)[1] if message.role == "assistant" else message.content
        if not text.strip():
            return f"messages[{i}] ({message.role})"
    return None


def _rejected_problem(example: Example) -> str | None:
    """What is wrong with a DPO row's rejected answer, if anything."""
    if example.rejected is None:
        return None
    if not split_reasoning(example.rejected)[1].strip():
        return "empty"
    if _normal(example.rejected) == _normal(example.answer):
        return "the same as the chosen answer"
    return None


def examples_frame(
    examples: list[Example],
    n_tokens: Sequence[int | None],
    eval_copies: Sequence[str | None] | None = None,
    template_refusals: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """One row per example, in order, with the columns the suite checks.

    `n_tokens` is each example's formatted length (None where its roles cannot be formatted, named by the
    roles expectation, or where the chat template cannot train it, named by `template_refusals`);
    `eval_copies` names the row of a later held-out split (validation, test) with the same prompt.
    """
    import pandas as pd

    rows = []
    for example in examples:
        # The answer as scored: after a leading reasoning block (data.reasoning keep/wrap leave one there).
        answers = [split_reasoning(m.content)[1] for m in example.messages if m.role == "assistant"]
        prompts = [m.content for m in example.messages if m.role == "user"]
        parsed = parse_json_object(answers[-1]) if answers else None
        preference = [] if example.kind == "sft" else [f"{example.kind}:{_normal(example.rejected or '')}"]
        rows.append(
            {
                "id": example.id,
                "normalized_id": _digest([f"{m.role}:{_normal(m.content)}" for m in example.messages] + preference),
                "prompt_key": prompt_key(example),
                "roles": ",".join(message.role for message in example.messages),
                "prompt": prompts[-1] if prompts else None,
                "answer": answers[-1] if answers else None,
                "answer_keys": KEY_SEPARATOR.join(parsed) if parsed is not None else None,
                "first_empty_turn": _first_empty_turn(example),
                "chars": sum(len(message.content) for message in example.messages) + len(example.rejected or ""),
                "kind": example.kind,
                "rejected": _rejected_problem(example),
            }
        )
    frame = pd.DataFrame(rows, columns=list(COLUMN_TYPES))
    frame["n_tokens"] = list(n_tokens)
    frame["eval_copy"] = list(eval_copies) if eval_copies is not None else None
    frame["chat_template"] = list(template_refusals) if template_refusals is not None else None
    # Explicit types so that an empty frame still has string columns for the regex expectations.
    return frame.astype(COLUMN_TYPES)


def keys_regex(keys: Sequence[str]) -> str:
    """Matches a KEY_SEPARATOR-joined key list that contains every key in `keys`."""
    sep = re.escape(KEY_SEPARATOR)
    return "^" + "".join(f"(?=(?:.*{sep})?{re.escape(key)}(?:{sep}|$))" for key in keys)


def build_suite(
    name: str, max_chars: int, max_seq_length: int, json_answers: bool, required_keys: Sequence[str], leakage: bool
) -> ExpectationSuite:
    """The expectations for one split; each `description` says what is expected, for the Data Docs.

    `max_chars` is data.max_chars; `json_answers` says data.output_format is json.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    # The answer rules (valid JSON, required keys) are what a good answer must meet; a rated-bad one is data too.
    good_answers = Column("kind") != "undesirable"
    expectations = [
        gxe.ExpectColumnValuesToNotBeNull(column="prompt", description="a user turn is present"),
        gxe.ExpectColumnValuesToNotBeNull(column="answer", description="an assistant turn is present"),
        gxe.ExpectColumnValuesToBeNull(column="first_empty_turn", description="no turn is empty"),
        gxe.ExpectColumnValuesToMatchRegex(
            column="roles",
            regex=ROLES_REGEX,
            description="an optional system message, then user/assistant turns alternating, ending with the assistant",
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="rejected", description="a DPO row's rejected answer has text and differs from the chosen one"
        ),
        gxe.ExpectColumnValuesToBeUnique(column="id", description="no exact duplicate (the first copy is kept)"),
        gxe.ExpectColumnValuesToBeUnique(
            column="normalized_id", description="no duplicate up to case and whitespace (the first copy is kept)"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="chars",
            min_value=1,
            max_value=max_chars,
            description=f"all messages together at most {max_chars} characters (data.max_chars)",
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="n_tokens",
            min_value=1,
            max_value=max_seq_length,
            description=f"formatted with the chat template, at most {max_seq_length} tokens (model.max_seq_length)",
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="chat_template",
            description="the chat template trains every answer as evaluation and serving read it (data.reasoning)",
        ),
    ]
    if leakage:
        expectations.append(
            gxe.ExpectColumnValuesToBeNull(
                column="eval_copy", description="the prompt does not also appear in a later held-out split (leakage)"
            )
        )
    if json_answers:
        expectations += [
            gxe.ExpectColumnValuesToBeJsonParseable(
                column="answer",
                description="the answer is valid JSON (data.output_format: json; not asked of rated-bad answers)",
                row_condition=good_answers,
            ),
            gxe.ExpectColumnValuesToNotBeNull(
                column="answer_keys",
                description="the answer is a JSON object, not an array or a scalar",
                row_condition=good_answers,
            ),
        ]
        if required_keys:
            expectations.append(
                gxe.ExpectColumnValuesToMatchRegex(
                    column="answer_keys",
                    regex=keys_regex(required_keys),
                    description=f"the answer carries the keys {', '.join(required_keys)}",
                    row_condition=good_answers,
                )
            )
    return gx.ExpectationSuite(name=name, expectations=expectations)


def validate(
    frames: dict[str, pd.DataFrame], suites: dict[str, ExpectationSuite], docs_dir: Path
) -> dict[str, ExpectationSuiteValidationResult]:
    """Validate each split's frame with its suite in one throwaway GX context and build its Data Docs."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # GX announces the temporary folder of its default docs site at INFO on every run; ours is in docs_dir.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    # GX's own tqdm bars would interleave with the pipeline's output.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    # Only our site: the ephemeral context's default one renders into a temporary folder nobody reads.
    context.variables.data_docs_sites = {}
    context.add_data_docs_site(
        DOCS_SITE,
        {
            "class_name": "SiteBuilder",
            # GX writes the site only under an absolute folder; a relative workdir (the demo's `runs`) must be resolved.
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = context.data_sources.add_pandas("examples")
    results = {}
    for split, frame in frames.items():
        batch = source.add_dataframe_asset(split).add_batch_definition_whole_dataframe("all_rows")
        suite = context.suites.add(suites[split])
        validation = context.validation_definitions.add(gx.ValidationDefinition(name=split, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"tunepipe_{split}",
                validation_definitions=[validation],
                result_format="COMPLETE",
                actions=[UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
            )
        )
        (results[split],) = checkpoint.run(batch_parameters={"dataframe": frame}).run_results.values()
    return results


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _short(value: object, limit: int = 80) -> object:
    if hasattr(value, "item"):  # a numpy scalar from the frame
        value = value.item()
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    return value


def failed_rows(
    result: ExpectationSuiteValidationResult,
    frame: pd.DataFrame,
    examples: list[Example],
    max_chars: int,
    max_seq_length: int,
) -> dict[int, list[Failure]]:
    """Row index → its failures, each with a message a user can act on; of duplicates the first copy stays."""
    failures: dict[int, list[Failure]] = defaultdict(list)
    first_copy: dict[str, dict[str, int]] = {}
    for outcome in result.results:
        if outcome.success:
            continue
        config = outcome.expectation_config
        column = config.kwargs["column"]
        indices = outcome.result.get("unexpected_index_list") or []
        if not indices:
            # An expectation that raised instead of judging rows: the data is unchecked, so stop here.
            raise RuntimeError(
                f"data check {config.type} on {column!r} failed without naming rows: {outcome.exception_info}"
            )
        if column in ("id", "normalized_id"):
            first_copy[column] = {value: i for i, value in reversed(list(enumerate(frame[column])))}
        for i in indices:
            if column == "normalized_id" and any(f.column == "id" for f in failures[i]):
                continue  # an exact duplicate is named once
            reason = _reason(config.type, column, i, frame, examples, first_copy, max_chars, max_seq_length)
            if reason is not None:
                failures[i].append(Failure(column, config.type, reason))
    return {i: row_failures for i, row_failures in sorted(failures.items()) if row_failures}


def _reason(
    expectation: str,
    column: str,
    i: int,
    frame: pd.DataFrame,
    examples: list[Example],
    first_copy: dict[str, dict[str, int]],
    max_chars: int,
    max_seq_length: int,
) -> str | None:
    value = frame.at[i, column]
    if column == "answer_keys" or expectation == "expect_column_values_to_be_json_parseable":
        # One JSON complaint per answer, and none for a missing or empty one (named as such already).
        answer = frame.at[i, "answer"]
        if not isinstance(answer, str) or not answer.strip():
            return None
        if expectation == "expect_column_values_to_not_be_null" and not _is_json(answer):
            return None
    if column in first_copy:
        first = first_copy[column][value]
        if first == i:
            return None
        how = "exact duplicate" if column == "id" else "duplicate up to case and whitespace"
        return f"{how} of {examples[first].where}"
    messages: dict[tuple[str, str], Callable[[], str]] = {
        ("expect_column_values_to_not_be_null", "prompt"): lambda: "no user turn",
        ("expect_column_values_to_not_be_null", "answer"): lambda: "no assistant turn",
        ("expect_column_values_to_be_null", "first_empty_turn"): lambda: f"empty turn: {value} has no text",
        ("expect_column_values_to_match_regex", "roles"): lambda: (
            f"roles {value}: expected an optional system message, then user/assistant turns alternating, "
            "ending with the assistant"
        ),
        ("expect_column_values_to_be_between", "chars"): lambda: f"{value} characters > max_chars {max_chars}",
        ("expect_column_values_to_be_between", "n_tokens"): lambda: f"{value} tokens > max_seq_length {max_seq_length}",
        ("expect_column_values_to_be_null", "chat_template"): lambda: value,
        ("expect_column_values_to_be_null", "rejected"): lambda: f"rejected answer is {value}",
        ("expect_column_values_to_be_null", "eval_copy"): lambda: (
            f"leakage: the same prompt is in a held-out split ({value}); kept there, set aside here"
        ),
        ("expect_column_values_to_be_json_parseable", "answer"): lambda: f"answer is not valid JSON: {_short(value)!r}",
        ("expect_column_values_to_not_be_null", "answer_keys"): lambda: (
            f"answer is not a JSON object: {_short(frame.at[i, 'answer'])!r}"
        ),
        ("expect_column_values_to_match_regex", "answer_keys"): lambda: (
            f"answer lacks required keys: has {', '.join(str(value).split(KEY_SEPARATOR)) or 'none'}"
        ),
    }
    return messages[(expectation, column)]()


def expectation_summary(result: ExpectationSuiteValidationResult) -> list[dict[str, Any]]:
    return [
        {
            "name": outcome.expectation_config.type,
            "column": outcome.expectation_config.kwargs["column"],
            "expected": outcome.expectation_config.description,
            "success": bool(outcome.success),
            "unexpected_count": int(outcome.result.get("unexpected_count") or 0),
            "unexpected_examples": [
                _short(value) for value in (outcome.result.get("partial_unexpected_list") or [])[:EXAMPLES_SHOWN]
            ],
        }
        for outcome in result.results
    ]


def result_json(result: ExpectationSuiteValidationResult) -> dict[str, Any]:
    """GX's own validation result, as JSON (row index lists included)."""
    return json.loads(json.dumps(result.to_json_dict(), default=str))
