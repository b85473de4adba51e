"""The run report: one Markdown page with PNG plots that says what was trained, how it scored and why it
passed or failed the gate.

Sections: the decision on the test split and one line per gate rule (differences with their intervals and n); the
metrics of base / champion / candidate on validation and on test side by side (table; bar chart of test); every
attempt of the retrain loop with its settings, its loss curve and its gate rules on validation; the regressions
(test examples the champion, else the base, had right and the candidate has wrong); the candidate's worst test
examples with expected and actual answers; with a judge (eval.judge), the examples it says the candidate lost, with the
judge's replies; the probes answered side by side; retention: the
general prompts outside the task answered by base and candidate, with their losses on the base's answers.
Cached like the other stages: a re-run with nothing changed does not import matplotlib.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from prefect import task

from tunepipe.tasks.evaluate.results import Attempt, EvalReport, GateDecision, ModelScores, RetentionScores, RunReport
from tunepipe.tasks.runtime.caching import STAGE_CACHE, stage_dir
from tunepipe.tasks.runtime.config import LOWER_IS_BETTER

WORST_EXAMPLES = 5
REGRESSIONS_SHOWN = 20  # all of them are in MLflow's eval/regressions.json
# The per-example score that ranks the worst examples: the first of these the answers were scored on.
RANKING_METRICS = ("field_accuracy", "rouge_l", "chrf", "exact_match")
TEXT_LIMIT = 600  # characters of a prompt or answer shown in the report
# What fine-tuning changed, base → candidate, in the run report's first lines and the CLI's summary (after
# the metrics the gate checked): the task's own scores first, then whether answers end, then the loss.
HEADLINE_METRICS = ("valid_json_rate", "field_accuracy", "exact_match", "rouge_l", "chrf", "stop_rate", "eval_loss")


def write_report(
    title: str, attempts: list[Attempt], report: EvalReport, decision: GateDecision, outcome: str, out_dir: Path
) -> RunReport:
    """`report` and `decision`: the final candidate on the test split and the gate's verdict on it; each attempt
    carries its own validation report and the gate's rules applied to it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    out_dir.mkdir(parents=True, exist_ok=True)
    final = attempts[-1]
    lines = [
        f"# Run report: {title}",
        "",
        f"**{'Passed' if decision.passed else 'Failed'}** the gate on the test split; the retrain loop: {outcome}.",
        "",
        f"Base → candidate on {report.n_samples} test examples: "
        + ", ".join(base_to_candidate(report, [c.metric for c in decision.checks]))
        + ".",
        "",
        f"## Gate on the test split (attempt {final.plan.number}'s candidate)",
        "",
        *(
            [f"- {'pass' if c.passed else '**FAIL**'}: {c.reason}" for c in decision.checks]
            or ["- no rules configured"]
        ),
        "",
        "## Metrics",
        "",
        f"Validation ({final.report.n_samples} examples) chose the checkpoint and the attempt; test "
        f"({report.n_samples} examples) was read once, by the gate. A validation score above the test score is "
        "what choosing on validation adds to it.",
        "",
        *_metrics_table(final.report, report),
        "",
        f"![metrics of base, champion and candidate]({_plot_metrics(report, out_dir / 'metrics.png').name})",
        "",
        "## Attempts",
        "",
        *_attempts_table(attempts),
        "",
        f"![training loss per attempt]({_plot_losses(attempts, out_dir / 'loss_curves.png').name})",
        "",
        *_regressions(report, decision),
        *_worst_examples(report.samples_path),
        *_judge_losses(report),
        *_probes(report.probes_path),
        *retention_section(report.retention),
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return RunReport(folder=out_dir, path=path, attempts=len(attempts), outcome=outcome)


def models(report: EvalReport) -> list[ModelScores]:
    """base, champion (when there is one), candidate: the order every table and plot uses."""
    return [scores for scores in (report.base, report.champion, report.candidate) if scores is not None]


def base_to_candidate(report: EvalReport, gated: list[str]) -> list[str]:
    """`metric base → candidate` for the gated metrics, then the headline ones, where both models have them."""
    names = dict.fromkeys([*gated, *HEADLINE_METRICS])
    return [
        f"{name} {report.base.metrics[name]:.3f} → {report.candidate.metrics[name]:.3f}"
        for name in names
        if name in report.base.metrics and name in report.candidate.metrics
    ]


def label(scores: ModelScores) -> str:
    return scores.name if scores.version is None else f"{scores.name} v{scores.version}"


def _metrics_table(validation: EvalReport, test: EvalReport) -> list[str]:
    """Each model's metrics on validation and on test, side by side."""
    columns = [scores for test_scores in models(test) for scores in (_same_model(validation, test_scores), test_scores)]
    header = [f"{label(scores)} {split}" for scores in models(test) for split in ("validation", "test")]
    names = sorted({name for scores in columns if scores is not None for name in scores.metrics})
    rows = ["| metric | " + " | ".join(header) + " |", "|---|" + "---:|" * len(columns)]
    for name in names:
        values = [None if scores is None else scores.metrics.get(name) for scores in columns]
        better = " (lower is better)" if name in LOWER_IS_BETTER else ""
        rows.append(f"| {name}{better} | " + " | ".join("" if v is None else f"{v:.4g}" for v in values) + " |")
    return rows


def _same_model(report: EvalReport, scores: ModelScores) -> ModelScores | None:
    """The scores of the model `scores` belongs to in another report (another split), if it has them."""
    return next(
        (other for other in models(report) if (other.name, other.version) == (scores.name, scores.version)), None
    )


def _attempts_table(attempts: list[Attempt]) -> list[str]:
    rows = [
        "| attempt | change | steps | learning rate | LoRA r | continued | gate's rules on validation |",
        "|---:|---|---:|---:|---:|---|---|",
    ]
    for attempt in attempts:
        plan = attempt.plan
        change = json.dumps(plan.change.model_dump(exclude_defaults=True)) if plan.change else "as configured"
        change = f"`{change}`" + (f" ({plan.reason})" if plan.reason else "")
        gate = "passed" if attempt.decision.passed else "failed: " + "; ".join(attempt.decision.reasons)
        rows.append(
            f"| {plan.number} | {_cell(change)} | {attempt.trained.steps} | {plan.train.learning_rate:g} | "
            f"{plan.lora.r} | {'yes' if plan.init_from else 'no'} | {_cell(gate)} |"
        )
    return rows


def _plot_metrics(report: EvalReport, path: Path) -> Path:
    import matplotlib.pyplot as plt

    columns = models(report)
    # Rates in [0, 1] share one axis; eval loss gets its own. Per-field accuracies stay in the table.
    rates = sorted({n for s in columns for n in s.metrics if "." not in n and n not in LOWER_IS_BETTER})
    fig, (ax_rates, ax_loss) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [4, 1]})
    width = 0.8 / len(columns)
    for i, scores in enumerate(columns):
        ax_rates.bar(
            [x + i * width for x in range(len(rates))],
            [scores.metrics.get(n, 0.0) for n in rates],
            width,
            label=label(scores),
        )
        ax_loss.bar(i, scores.metrics.get("eval_loss", 0.0), 0.8, label=label(scores))
    ax_rates.set_xticks([x + width * (len(columns) - 1) / 2 for x in range(len(rates))], rates, rotation=30, ha="right")
    ax_rates.set_ylim(0, 1.05)
    ax_rates.set_title("task metrics (higher is better)")
    ax_rates.legend()
    ax_loss.set_xticks(range(len(columns)), [label(s) for s in columns], rotation=30, ha="right")
    ax_loss.set_title("eval loss (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_losses(attempts: list[Attempt], path: Path) -> Path:
    """Train loss of each attempt; an attempt that continued another starts where that one ended."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ends: dict[Path, int] = {}  # adapter folder -> the cumulative step it ended at
    for attempt in attempts:
        offset = ends.get(attempt.plan.init_from, 0) if attempt.plan.init_from else 0
        history = attempt.trained.loss_history
        ax.plot(
            [offset + p.step for p in history],
            [p.loss for p in history],
            marker=".",
            label=f"attempt {attempt.plan.number}",
        )
        ends[attempt.trained.adapter_dir] = offset + attempt.trained.steps
    ax.set_xlabel("step (continued attempts start where they continued from)")
    ax.set_ylabel("train loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _regressions(report: EvalReport, decision: GateDecision) -> list[str]:
    reference = report.champion or report.base
    found = decision.regressions
    lines = [f"## Regressions against {label(reference)}: {len(found)} of {report.n_samples} examples", ""]
    if not found:
        return lines + [f"None: the candidate has right every example and field {label(reference)} had right.", ""]
    lines += [
        f"Examples {label(reference)} matched exactly that the candidate does not, or whose JSON fields it had "
        "right that the candidate has wrong."
        + (
            f" The first {REGRESSIONS_SHOWN}; all are in MLflow's eval/regressions.json."
            if len(found) > REGRESSIONS_SHOWN
            else ""
        ),
        "",
    ]
    for regression in found[:REGRESSIONS_SHOWN]:
        broken = (["no longer exactly right"] if regression.exact else []) + (
            [f"fields now wrong: {', '.join(regression.fields)}"] if regression.fields else []
        )
        lines += [
            f"### {regression.id} ({regression.source}): {'; '.join(broken)}",
            "",
            "Prompt:",
            *_block(regression.prompt),
            "Expected:",
            *_block(regression.expected),
            f"{label(reference).capitalize()}:",
            *_block(regression.reference_answer),
            "Candidate:",
            *_block(regression.answer),
        ]
    return lines


def _worst_examples(samples_path: Path) -> list[str]:
    rows = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not rows:
        return []
    ranking = next((m for m in RANKING_METRICS if m in rows[0]["candidate"]["scores"]), None)
    if ranking is None:
        return []
    worst = sorted(rows, key=lambda row: row["candidate"]["scores"][ranking])[:WORST_EXAMPLES]
    lines = [f"## The {len(worst)} worst test examples (candidate's {ranking})", ""]
    for row in worst:
        lines += [
            f"### {row['id']} ({row['source']}): {ranking} {row['candidate']['scores'][ranking]:.3g}",
            "",
            "Prompt:",
            *_block(row["prompt"]),
            "Expected:",
            *_block(row["expected"]),
        ]
        for who in ("candidate", "champion", "base"):
            if who in row:
                ending = "" if row[who]["stopped"] else " (cut at the length limit)"
                lines += [f"{who.capitalize()}{ending}:", *_block(row[who]["answer"])]
    return lines


def _judge_losses(report: EvalReport) -> list[str]:
    """Who judged and how it went, then the examples the judge says the candidate lost (pairwise), or those it
    scored below its opponent (rubric), each with both answers and the judge's raw replies."""
    judge = report.judge
    if judge is None:
        return []
    rows = [json.loads(line) for line in judge.judgments_path.read_text(encoding="utf-8").splitlines() if line]
    if judge.mode == "pairwise":
        lost = [row for row in rows if row["result"] == "loss"]
        title = f"## Examples the judge says the candidate lost ({len(lost)} of {judge.n})"
    else:
        lost = [row for row in rows if (row["ratings"]["candidate"] or 3) < (row["ratings"][judge.opponent] or 3)]
        title = f"## Examples the judge scores the candidate below {judge.opponent} ({len(lost)} of {judge.n})"
    flips = judge.order_flip_rate
    lines = [
        title,
        "",
        f"Judge: {judge.line()}.",
        *(
            [
                f"Order flips: {flips:.0%} of the examples with both verdicts read (counted as ties; a judge that "
                "flips often is not judging the answers)."
            ]
            if flips is not None
            else []
        ),
        "",
    ]
    for row in lost[:WORST_EXAMPLES]:
        lines += [
            f"### {row['id']} ({row['source']})",
            "",
            "Prompt:",
            *_block(row["prompt"]),
            "Expected:",
            *_block(row["expected"]),
            "Candidate:",
            *_block(row["candidate"]),
            f"{judge.opponent.capitalize()}:",
            *_block(row[judge.opponent]),
        ]
        for judgment in row["judgments"]:
            lines += [f"Judge, {judgment['asked']} (verdict {judgment['verdict']}):", *_block(judgment["replies"][-1])]
    if len(lost) > WORST_EXAMPLES:
        lines += [f"The other {len(lost) - WORST_EXAMPLES}: eval/{judge.judgments_path.name} in MLflow.", ""]
    return lines


def _probes(probes_path: Path) -> list[str]:
    probes = [json.loads(line) for line in probes_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not probes:
        return []
    who = [name for name in ("base", "champion", "candidate") if any(name in p for p in probes)]
    lines = ["## Probes", "", "| prompt | " + " | ".join(who) + " |", "|---|" + "---|" * len(who)]
    lines += ["| " + " | ".join(_cell(p.get(name) or "") for name in ("prompt", *who)) + " |" for p in probes]
    return lines + [""]


def retention_section(scores: RetentionScores | None) -> list[str]:
    """The general prompts outside the task: both models' answers side by side, and their loss on the base's."""
    if scores is None:
        return []
    rows = scores.rows()
    lines = [
        "## Retention: general prompts outside the task",
        "",
        f"Mean token loss on the base's own greedy answers to {scores.n_prompts} general prompts: base "
        f"{scores.base_loss:.3f}, candidate {scores.candidate_loss:.3f} nats per token "
        f"({scores.loss_increase:+.3f}: the candidate finds what the base would say "
        f"{math.exp(scores.loss_increase):.2f} times {'less' if scores.loss_increase >= 0 else 'more'} likely "
        "per token, where the base's figure is 1).",
        "",
        "| prompt | base | candidate | base loss | candidate loss |",
        "|---|---|---|---:|---:|",
    ]
    for row in rows:
        cut = {who: "" if row[who]["stopped"] else " *(cut at the length limit)*" for who in ("base", "candidate")}
        lines.append(
            f"| {_cell(row['prompt'])} | {_cell(row['base']['answer'])}{cut['base']} | "
            f"{_cell(row['candidate']['answer'])}{cut['candidate']} | {_loss(row['base']['loss'])} | "
            f"{_loss(row['candidate']['loss'])} |"
        )
    return lines + [""]


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"  # None: an empty answer cut at the limit, nothing to score


def _block(text: str) -> list[str]:
    shown = text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + f" [... {len(text) - TEXT_LIMIT} more characters]"
    return ["```", shown.replace("```", "'''"), "```", ""]


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    shown = text if len(text) <= TEXT_LIMIT else text[:TEXT_LIMIT] + " ..."
    return shown.replace("|", "\\|").replace("\n", "<br>")


@task(name="report", cache_policy=STAGE_CACHE, persist_result=True)
def run_report(
    title: str, attempts: list[Attempt], report: EvalReport, decision: GateDecision, outcome: str, workdir: Path
) -> RunReport:
    return write_report(
        title,
        attempts,
        report,
        decision,
        outcome,
        stage_dir(workdir, "report", title, attempts, report, decision, outcome),
    )
