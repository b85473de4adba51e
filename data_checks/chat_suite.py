"""The Great Expectations suite for canonical chat examples, and the quarantine and report it drives.

Every row that fails an expectation is moved, with its reason, to a quarantine file; the rest go on to
training. Only when too few rows survive does the check fail, and its error points at the quarantine.
Great Expectations and pandas are imported inside the functions: importing them costs seconds, and a
cached re-run that never checks data must not pay for that.
"""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel

from tasks.config import DataConfig
from tasks.examples import Example, read_examples, write_jsonl
from tasks.load_data import Rejection

if TYPE_CHECKING:
    import pandas as pd
    from great_expectations import ExpectationSuite
    from great_expectations.core import ExpectationSuiteValidationResult

ROLES_REGEX = r"^(?:system,)?(?:user,assistant,)*user,assistant$"
JSON_OBJECT_REGEX = r"^\s*\{"
COLUMN_TYPES = {
    "id": "str",
    "source": "str",
    "line": "int64",
    "n_messages": "int64",
    "chars": "int64",
    "answer": "str",
    "roles": "str",
}
EXAMPLES_SHOWN = 5  # unexpected values per expectation in the report summary


class DataCheckError(ValueError):
    """Too few rows passed the data check; `report` says which expectations failed and where rows went."""

    def __init__(self, message: str, report: DataCheckReport) -> None:
        super().__init__(message)
        self.report = report


class Failure(NamedTuple):
    column: str
    expectation: str
    reason: str


class DataCheckReport(BaseModel):
    success: bool  # every expectation passed on every row (nothing quarantined)
    n_checked: int
    n_passed: int
    n_quarantined: int
    expectations: list[dict[str, Any]]
    clean_path: Path
    quarantine_path: Path
    report_json: Path
    report_html: Path


def examples_frame(examples: list[Example]) -> pd.DataFrame:
    """One row per example, in order, with the columns the suite checks."""
    import pandas as pd

    rows = [
        {
            "id": example.id,
            "source": example.source,
            "line": example.line,
            "n_messages": len(example.messages),
            "chars": sum(len(message.content) for message in example.messages),
            "answer": example.answer,
            "roles": ",".join(message.role for message in example.messages),
        }
        for example in examples
    ]
    # Explicit types so that an empty frame still has string columns for the regex expectations.
    return pd.DataFrame(rows, columns=list(COLUMN_TYPES)).astype(COLUMN_TYPES)


def build_suite(cfg: DataConfig) -> ExpectationSuite:
    """The expectations for `cfg`; each `description` is the reason given for a quarantined row."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    expectations = [
        gxe.ExpectColumnValuesToBeUnique(
            column="id", description="each conversation appears once (the first copy is kept)"
        ),
        gxe.ExpectColumnValuesToBeBetween(
            column="chars",
            min_value=1,
            max_value=cfg.max_chars,
            description=f"all messages together between 1 and {cfg.max_chars} characters (data.max_chars)",
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="answer", description="an assistant answer is present"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="answer", min_value=1, description="the answer is not empty"),
        gxe.ExpectColumnValuesToMatchRegex(
            column="roles",
            regex=ROLES_REGEX,
            description="an optional system message, then alternating user/assistant turns ending with the assistant",
        ),
    ]
    if cfg.output_format == "json":
        expectations += [
            gxe.ExpectColumnValuesToBeJsonParseable(
                column="answer", description="the answer is valid JSON (data.output_format: json)"
            ),
            gxe.ExpectColumnValuesToMatchRegex(
                column="answer",
                regex=JSON_OBJECT_REGEX,
                description="the answer is a JSON object, not an array or a scalar (data.output_format: json)",
            ),
        ]
    return gx.ExpectationSuite(name="tunepipe_chat_examples", expectations=expectations)


def run_suite(frame: pd.DataFrame, cfg: DataConfig) -> ExpectationSuiteValidationResult:
    """Validate `frame` in a throwaway GX context; failed expectations list every offending row index."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # GX's own tqdm bars would interleave with the pipeline's output.
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    batch = (
        context.data_sources.add_pandas("examples")
        .add_dataframe_asset("examples")
        .add_batch_definition_whole_dataframe("all_rows")
    )
    suite = context.suites.add(build_suite(cfg))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name="chat_examples", data=batch, suite=suite)
    )
    return validation.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")


def _short(value: object, limit: int = 80) -> object:
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "…"
    return value


def _failed_rows(result: ExpectationSuiteValidationResult, frame: pd.DataFrame) -> dict[int, list[Failure]]:
    """Row index → its failures, for every failed expectation; of duplicates only the later copies fail."""
    first_of_id = {id_: i for i, id_ in reversed(list(enumerate(frame["id"])))}
    failures: dict[int, list[Failure]] = defaultdict(list)
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
        for i in indices:
            if column == "id":
                first = first_of_id[frame.at[i, "id"]]
                if first == i:
                    continue
                detail = f"duplicate of line {frame.at[first, 'line']}"
                if frame.at[first, "source"] != frame.at[i, "source"]:
                    detail += f" of {frame.at[first, 'source']}"
            else:
                detail = f"got {_short(frame.at[i, column])!r}"
            reason = f"{config.type} (expected: {config.description}): {detail}"
            failures[i].append(Failure(column, config.type, reason))
    return dict(sorted(failures.items()))


def _expectation_summary(result: ExpectationSuiteValidationResult) -> list[dict[str, Any]]:
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


def _html_report(title: str, report: DataCheckReport, quarantined: list[Rejection]) -> str:
    def cell(value: object) -> str:
        return f"<td>{html.escape(str(value))}</td>"

    expectation_rows = "".join(
        "<tr class='{}'>{}</tr>".format(
            "pass" if e["success"] else "fail",
            "".join(
                cell(v)
                for v in (
                    e["name"],
                    e["column"],
                    e["expected"],
                    "pass" if e["success"] else "FAIL",
                    e["unexpected_count"],
                    ", ".join(repr(x) for x in e["unexpected_examples"]),
                )
            ),
        )
        for e in report.expectations
    )
    quarantine_rows = "".join(
        "<tr>{}</tr>".format("".join(cell(v) for v in (r.source, r.line, r.field, r.reason, _short(r.raw, 300))))
        for r in quarantined
    ) or "<tr><td colspan='5'>none</td></tr>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
td {{ font-family: monospace; white-space: pre-wrap; max-width: 40em; }}
tr.fail td {{ background: #fde2e2; }}
tr.pass td {{ background: #e6f4e6; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{report.n_checked} rows checked, {report.n_passed} passed, {report.n_quarantined} quarantined.</p>
<p>Clean rows: {html.escape(str(report.clean_path))}<br>Quarantine: {html.escape(str(report.quarantine_path))}</p>
<h2>Expectations</h2>
<table><tr><th>expectation</th><th>column</th><th>expected</th><th>result</th><th>unexpected</th><th>examples</th></tr>
{expectation_rows}</table>
<h2>Quarantined rows</h2>
<table><tr><th>source</th><th>line</th><th>field</th><th>reason</th><th>row</th></tr>
{quarantine_rows}</table>
</body></html>
"""


def check_examples(examples_path: Path, cfg: DataConfig, out_dir: Path, split: str = "train") -> DataCheckReport:
    """Validate `examples_path`, split it into clean and quarantined rows, write reports; raise if too few pass."""
    examples = list(read_examples(examples_path))
    frame = examples_frame(examples)
    result = run_suite(frame, cfg)
    failures = _failed_rows(result, frame)

    quarantined = [
        Rejection(
            source=examples[i].source,
            line=examples[i].line,
            field=",".join(dict.fromkeys(failure.column for failure in row_failures)),
            reason=" | ".join(failure.reason for failure in row_failures),
            raw=examples[i].model_dump_json(),
        )
        for i, row_failures in failures.items()
    ]
    clean = [example for i, example in enumerate(examples) if i not in failures]

    out_dir.mkdir(parents=True, exist_ok=True)
    report = DataCheckReport(
        success=bool(result.success),
        n_checked=len(examples),
        n_passed=len(clean),
        n_quarantined=len(quarantined),
        expectations=_expectation_summary(result),
        clean_path=out_dir / f"{split}_clean.jsonl",
        quarantine_path=out_dir / f"{split}_quarantine.jsonl",
        report_json=out_dir / f"{split}_report.json",
        report_html=out_dir / f"{split}_report.html",
    )
    write_jsonl(report.clean_path, clean)
    write_jsonl(report.quarantine_path, quarantined)
    report.report_json.write_text(
        json.dumps(
            {"summary": report.model_dump(mode="json"), "great_expectations": result.to_json_dict()},
            indent=2,
            ensure_ascii=False,
        )
        + "\n",
        encoding="utf-8",
    )
    title = f"tunepipe data check: {examples_path} ({split})"
    report.report_html.write_text(_html_report(title, report, quarantined), encoding="utf-8")

    needed = cfg.min_rows if split == "train" else 1
    if len(clean) < needed:
        counts = Counter((f.expectation, f.column) for row_failures in failures.values() for f in row_failures)
        top = ", ".join(f"{name} on {column} ({n} rows)" for (name, column), n in counts.most_common(3))
        raise DataCheckError(
            f"{examples_path}: only {len(clean)} of {len(examples)} {split} rows passed the data check, "
            f"at least {needed} needed{' (data.min_rows)' if split == 'train' else ''}. "
            f"Top reasons: {top or 'no rows to check'}. Rejected rows with their reasons: {report.quarantine_path} "
            f"(report: {report.report_html})",
            report,
        )
    return report
