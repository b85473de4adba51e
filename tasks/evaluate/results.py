"""What the evaluation stages hand on: the scores, the gate's decision, the retrain loop's attempts, the report.

Plain models that import no stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tunepipe.tasks.evaluate.paired import MeanInterval, PairedDifference
from tunepipe.tasks.runtime.config import LoraConfig, RetrainChange, TrainConfig
from tunepipe.tasks.runtime.records import Record, flatten
from tunepipe.tasks.train.results import TrainResult


class ModelScores(BaseModel):
    """One model's split scores: `eval_loss`, `stop_rate` and the `tunepipe.tasks.chat.metrics` names."""

    name: str  # "candidate" | "base" | "champion"
    version: str | None = None  # the champion's registry version
    metrics: dict[str, float]


class RetentionScores(BaseModel):
    """What the candidate kept of the base's general ability: the mean token loss of both models on the base's own
    greedy answers to general prompts outside the task (eval.retention); the candidate's rising above the base's
    is what it forgot."""

    n_prompts: int
    base_loss: float  # nats per answer token, token-weighted over the prompts
    candidate_loss: float
    path: Path  # JSONL per prompt: id, source, language, prompt, tokens, {base, candidate: {answer, stopped, loss}}

    @property
    def loss_increase(self) -> float:
        return self.candidate_loss - self.base_loss

    def rows(self) -> list[dict]:
        """The per-prompt rows of `path`."""
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def scores(self) -> Record:
        return Record(
            metrics={
                "base.retention_loss": self.base_loss,
                "candidate.retention_loss": self.candidate_loss,
                "retention.loss_increase": self.loss_increase,
            }
        )

    def record(self) -> Record:
        rows = self.rows()
        columns = {
            "id": [r["id"] for r in rows],
            "language": [r["language"] for r in rows],
            "prompt": [r["prompt"] for r in rows],
            "tokens": [r["tokens"] for r in rows],
        }
        for who in ("base", "candidate"):
            columns |= {f"{who}.{field}": [r[who][field] for r in rows] for field in ("answer", "stopped", "loss")}
        return self.scores() + Record(files=[(self.path, "eval")], tables={"eval/retention.json": columns})


class JudgeSummary(BaseModel):
    """What the judge (eval.judge) did: who judged, how often it was asked, how its verdicts came out."""

    model: str
    digest: str | None  # `sha256:…` of its weights; None where the endpoint names none (an OpenAI-compatible API)
    endpoint: str  # where it answered (credentials masked)
    mode: Literal["pairwise", "rubric"]
    metric: str  # judge_win_rate | judge_score
    opponent: str  # the model the candidate is compared with: champion, else base
    n: int  # test examples judged
    questions: int  # judgments in all (pairwise: two per example, one per order)
    asked: int  # of them asked in this run; the rest came from the cache
    restated: int  # judgments whose first reply had no readable verdict, so the format was restated once
    unparsed: int  # judgments without a readable verdict even then (counted as neutral)
    seconds: float  # spent asking, in this run
    wins: int = 0  # pairwise, per example: the same verdict in both orders
    ties: int = 0
    losses: int = 0
    order_flips: int = 0  # the verdict changed with the order of the answers: counted as a tie
    identical: int = 0  # both models gave the same answer: a tie, the judge not asked
    judgments_path: Path  # JSONL per example: both answers, and per judgment the messages, raw replies, verdict

    @property
    def order_flip_rate(self) -> float | None:
        """Share of examples whose two verdicts disagree, among those where both were read."""
        read = self.wins + self.ties + self.losses + self.order_flips
        return self.order_flips / read if self.mode == "pairwise" and read else None

    def line(self) -> str:
        """One sentence: who judged, and how."""
        who = f"{self.model} ({self.digest[:19] if self.digest else 'no digest'}) at {self.endpoint}"
        outcome = (
            f"candidate against {self.opponent}: {self.wins} won, {self.ties} tied, {self.losses} lost, "
            f"{self.order_flips} flipped with the order, {self.identical} identical"
            if self.mode == "pairwise"
            else f"candidate and {self.opponent} scored on the rubric"
        )
        return (
            f"{who}, {self.mode}, {self.n} examples: {outcome}; {self.questions} judgments "
            f"({self.asked} asked now, {self.restated} restated, {self.unparsed} unreadable)"
        )

    def record(self) -> Record:
        rows = [json.loads(line) for line in self.judgments_path.read_text(encoding="utf-8").splitlines() if line]
        table = {
            "id": [r["id"] for r in rows],
            "result": [r.get("result") or json.dumps(r.get("ratings")) for r in rows],
            "verdicts": [json.dumps([j["verdict"] for j in r["judgments"]]) for r in rows],
            "replies": [json.dumps([j["replies"] for j in r["judgments"]], ensure_ascii=False) for r in rows],
        }
        return Record(
            metrics={
                "judge.order_flip_rate": self.order_flip_rate,
                "judge.unparsed": self.unparsed,
                "judge.restated": self.restated,
                "judge.questions": self.questions,
                "judge.asked": self.asked,
                "judge.seconds_per_asked": self.seconds / self.asked if self.asked else None,
            },
            tags={
                "judge.model": self.model,
                "judge.digest": self.digest or "",
                "judge.mode": self.mode,
                "judge.endpoint": self.endpoint,
                "judge.opponent": self.opponent,
            },
            files=[(self.judgments_path, "eval")],
            tables={"eval/judge.json": table},
        )


class EvalReport(BaseModel):
    # Which held-out split was scored: `validation` (the retrain loop's choices) or `test` (the gate, the champion
    # comparison, the headline, parity). MLflow keeps the test scores under the names they always had.
    split: Literal["validation", "test"] = "test"
    n_samples: int
    candidate: ModelScores
    base: ModelScores
    champion: ModelScores | None  # None until a model was promoted
    samples_path: Path  # JSONL per held-out example: id, source, prompt, expected, {model: {answer, stopped, scores}}
    n_undesirable: int = 0  # held-out rated-bad examples scored
    undesirable_path: Path | None = None  # JSONL per one: prompt, the rated-bad answer, {model: {answer, close}}
    probes_path: Path  # JSONL per probe: prompt and the answer of base / champion / candidate
    retention: RetentionScores | None = None  # general prompts outside the task; None: not measured
    judge: JudgeSummary | None = None  # eval.judge's verdicts, when a judge was configured

    @property
    def prefix(self) -> str:
        """What MLflow names start with: nothing for test (`candidate.<metric>`, as always), `validation.` else."""
        return "" if self.split == "test" else f"{self.split}."

    def scores(self) -> Record:
        """Each model's metrics (`candidate.<metric>`, `base.<metric>`, `champion.<metric>`; on validation
        `validation.candidate.<metric>` ...)."""
        models = [scores for scores in (self.candidate, self.base, self.champion) if scores is not None]
        return Record(
            metrics={
                f"{self.prefix}{scores.name}.{name}": value
                for scores in models
                for name, value in scores.metrics.items()
            },
            tags={"champion.version": self.champion.version or ""} if self.champion is not None else {},
        ) + (self.retention.scores() if self.retention is not None else Record())

    def record(self) -> Record:
        """The scores, and the per-example answers and probes as files and as MLflow tables (under `eval/`, the
        validation split's under `eval/validation/`)."""
        folder = "eval" if self.split == "test" else f"eval/{self.split}"
        probes = [json.loads(line) for line in self.probes_path.read_text().splitlines() if line.strip()]
        tables = {f"{folder}/examples.json": per_example_table(self.samples_path)}
        if probes:
            tables[f"{folder}/probes.json"] = {
                column: [probe.get(column) for probe in probes]
                for column in ("prompt", "base", "champion", "candidate")
            }
        files = [(self.samples_path, folder), (self.probes_path, folder)]
        if self.undesirable_path is not None:
            files.append((self.undesirable_path, folder))
        retention = self.retention.record() if self.retention is not None else Record()
        judged = self.judge.record() if self.judge is not None else Record()
        return self.scores() + Record(files=files, tables=tables) + retention + judged


def per_example_table(samples_path: Path) -> dict[str, list]:
    """The per-example JSONL as columns: id, source, prompt, expected, then answer, stopped and each score per model."""
    rows = [json.loads(line) for line in samples_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    models = [who for who in ("base", "champion", "candidate") if rows and who in rows[0]]
    scores = {who: sorted({name for row in rows for name in row[who]["scores"]}) for who in models}
    columns = [
        ("id", lambda row: row["id"]),
        ("source", lambda row: row["source"]),
        ("prompt", lambda row: row["prompt"]),
        ("expected", lambda row: row["expected"]),
    ]
    for who in models:
        columns += [
            (f"{who}.answer", lambda row, who=who: row[who]["answer"]),
            (f"{who}.stopped", lambda row, who=who: row[who]["stopped"]),
        ]
        columns += [
            (f"{who}.{name}", lambda row, who=who, name=name: row[who]["scores"].get(name)) for name in scores[who]
        ]
    return {name: [value(row) for row in rows] for name, value in columns}


class Check(BaseModel):
    metric: str  # "regressions" for the max_regressions rule
    kind: Literal["min", "max", "over_base", "over_champion", "regressions"]
    # The candidate's value, its improvement over base / champion (the paired mean difference), or the number of
    # regressions; None: not measured.
    value: float | None
    limit: float  # the limit, the required margin, or the most regressions allowed
    passed: bool
    reason: str  # what was checked and how it came out, in words
    # over_base / over_champion: the paired difference with its interval, which decides; min / max: the interval
    # of the candidate's value, which is reported (the value decides).
    interval: PairedDifference | MeanInterval | None = None
    n: int | None = None  # the test examples the check read


class Regression(BaseModel):
    """A test example the reference model (the champion, else the base) had right and the candidate now has wrong."""

    id: str
    source: str
    prompt: str
    expected: str
    versus: str  # "champion" | "base"
    reference_answer: str  # the reference model's answer
    answer: str  # the candidate's
    exact: bool  # the reference's answer matched exactly (exact_match 1), the candidate's does not
    fields: list[str]  # JSON fields the reference had right (field_accuracy.<key> 1) that the candidate has wrong


class GateDecision(BaseModel):
    passed: bool
    checks: list[Check]
    regressions: list[Regression] = []  # against the champion, else the base; gated by gate.max_regressions

    @property
    def reasons(self) -> list[str]:
        """One sentence per failing rule."""
        return [check.reason for check in self.checks if not check.passed]

    def summary(self) -> str:
        if not self.checks:
            return "passed (no rules configured)"
        if self.passed:
            return f"passed all {len(self.checks)} rules"
        return f"failed {len(self.reasons)} of {len(self.checks)} rules: " + "; ".join(self.reasons)

    def record(self) -> Record:
        """The decision; a failed gate ends the run FAILED."""
        tables = {"eval/regressions.json": regressions_table(self.regressions)} if self.regressions else {}
        return Record(
            texts={"eval/gate.json": self.model_dump_json(indent=2)},
            gate_failed=not self.passed,
            metrics={"gate.regressions": len(self.regressions)},
            tables=tables,
            tags={
                "gate": "passed" if self.passed else "failed",
                "gate.summary": self.summary()[:5000],
                "gate.reasons": "\n".join(self.reasons)[:5000],
                "gate.checks": "\n".join(check.reason for check in self.checks)[:5000],
            },
        )


def regressions_table(regressions: list[Regression]) -> dict[str, list]:
    """The regressions as columns (MLflow's table view): one row per example, the broken fields joined."""
    columns = ("id", "source", "prompt", "expected", "versus", "reference_answer", "answer", "exact", "fields")
    return {
        column: [", ".join(r.fields) if column == "fields" else getattr(r, column) for r in regressions]
        for column in columns
    }


class AttemptPlan(BaseModel):
    number: int  # 1 for the first attempt
    lora: LoraConfig
    train: TrainConfig
    init_from: Path | None  # the earlier attempt's adapter this one continues, None: fresh from the base model
    change: RetrainChange | None  # what differs from the attempt before; None for the first
    reason: str | None = None  # why `change` is not the plan's own step (retrain.past_best), if it is not

    def record(self) -> Record:
        """An attempt's own run: which attempt, and the settings it trains with."""
        change = self.change.model_dump(mode="json", exclude_defaults=True) if self.change else {}
        return Record(
            tags={
                "retrain.attempt": str(self.number),
                "retrain.init_from": str(self.init_from or ""),
                "retrain.reason": self.reason or "",
            },
            params=flatten(
                {
                    "train": self.train.model_dump(mode="json"),
                    "lora": self.lora.model_dump(mode="json"),
                    "change": change,
                }
            ),
        )


class Attempt(BaseModel):
    plan: AttemptPlan
    trained: TrainResult
    report: EvalReport  # on the validation split: what the retrain loop decides by
    decision: GateDecision  # the gate's rules applied to `report`: whether to try again, never whether to promote


class RunReport(BaseModel):
    folder: Path  # report.md and its PNGs, logged to MLflow as one folder
    path: Path  # report.md
    attempts: int  # of the retrain loop
    outcome: str  # how the loop ended (retrain_plan.outcome)

    def record(self) -> Record:
        return Record(
            metrics={"retrain.attempts": self.attempts},
            tags={"retrain.outcome": self.outcome},
            files=[(self.folder, "report")],
        )
