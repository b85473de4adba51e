"""`tunepipe check`: load, check and format the data exactly as a run would, and say what the run would do.

The stages run as plain functions (no Prefect server, no MLflow run, no model weights) into the same stage
folders the flow uses, so a check costs seconds and its outputs are what the run will read.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from pydantic import BaseModel

from tunepipe.tasks.data.check import check_data
from tunepipe.tasks.data.format import format_data
from tunepipe.tasks.data.load import data_fingerprint, load_data
from tunepipe.tasks.data.results import CheckedData, FormattedData
from tunepipe.tasks.evaluate.paired import POWER, detectable_difference
from tunepipe.tasks.model.base import resolve_base_model
from tunepipe.tasks.runtime.base_model import BaseModelRef
from tunepipe.tasks.runtime.config import LOWER_IS_BETTER, GateConfig, PipelineConfig
from tunepipe.tasks.runtime.memory_plan import MemoryPlan, run_memory_plan
from tunepipe.tasks.train.environment import EnvironmentReport

# Going over the same rows more often than this mostly teaches the model to recite them.
MANY_EPOCHS = 50
# Before any model has answered, how often candidate and champion disagree on a right/wrong metric: one test
# example in five, the middle of what the gate-power benchmark covers (benchmarks/RESULTS.md).
DISAGREEMENT = 0.2
# A margin-0 champion rule on a test split that cannot show a 5-point gain keeps most real gains out: say so.
FINE_DIFFERENCE = 0.05


class TimeEstimate(BaseModel):
    """The training steps' time at the speed an earlier training of the same base model reached here."""

    seconds: float  # the steps only: loading the model comes on top
    tokens_per_s: float  # the median of that training's logged rates
    measured_in: Path  # that training's stage folder


class RunPlan(BaseModel):
    train_rows: int
    validation_rows: int
    eval_rows: int  # the test split's
    train_tokens: int
    train_trained_tokens: int  # tokens that carry the loss (answers only, unless train.assistant_only_loss is off)
    validation_tokens: int
    eval_tokens: int
    longest_example_tokens: int
    examples_per_step: int  # train.batch_size × train.gradient_accumulation_steps × train.devices
    steps_per_epoch: int
    steps: int  # train.max_steps, or train.epochs over the training rows
    epochs: float  # how many times the steps go over the training rows
    environment: EnvironmentReport  # training's own check: device, precision, memory estimate against free memory
    time_estimate: TimeEstimate | None  # None until this base model has trained on this device in the workdir
    memory: MemoryPlan | None = None  # every stage's GPU memory, host memory and disk against this machine's
    warnings: list[str] = []  # what would not stop the run but is probably not what was meant


def plan_run(
    cfg: PipelineConfig, base: BaseModelRef, formatted: FormattedData, environment: EnvironmentReport
) -> RunPlan:
    rows = formatted.train.n_rows
    per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * cfg.train.devices
    steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * rows / per_step)  # as the training loop counts
    epochs = steps * per_step / rows
    tokens_to_train = steps * per_step * formatted.train.n_tokens / rows
    warnings = []
    if epochs > MANY_EPOCHS:
        setting = (
            f"train.max_steps={cfg.train.max_steps}" if cfg.train.max_steps else f"train.epochs={cfg.train.epochs}"
        )
        warnings.append(
            f"{setting} goes over the {rows} training rows {epochs:.0f} times (more than {MANY_EPOCHS}): "
            "the model will likely learn them by heart; use more rows or fewer steps"
        )
    warnings += detection_warnings(cfg.gate, min(formatted.eval.n_rows, cfg.eval.max_samples))
    return RunPlan(
        train_rows=formatted.train.n_rows,
        validation_rows=formatted.validation.n_rows,
        eval_rows=formatted.eval.n_rows,
        train_tokens=formatted.train.n_tokens,
        train_trained_tokens=formatted.train.n_trained_tokens,
        validation_tokens=formatted.validation.n_tokens,
        eval_tokens=formatted.eval.n_tokens,
        longest_example_tokens=max(
            formatted.train.max_tokens, formatted.validation.max_tokens, formatted.eval.max_tokens
        ),
        examples_per_step=per_step,
        steps_per_epoch=max(1, math.ceil(rows / per_step)),
        steps=steps,
        epochs=epochs,
        environment=environment,
        warnings=warnings,
        time_estimate=estimate_training_time(cfg, base, environment.device, tokens_to_train),
    )


def detection_warnings(gate: GateConfig, n_test: int) -> list[str]:
    """When the gate's champion rules ask for finer differences than `n_test` test examples can tell from noise: a
    candidate must then be truly much better than the margin says (at margin 0: better by more than
    FINE_DIFFERENCE) to be promoted.

    The true gain needed is the one the gate's exact interval shows `POWER` of the time on a right/wrong metric
    (`tunepipe.tasks.evaluate.paired.detectable_difference`: the numbers of the gate-power benchmark)."""
    by_margin: dict[float, list[str]] = {}
    for metric, margin in gate.champion_margins().items():
        if metric not in LOWER_IS_BETTER:  # a loss is on another scale than a share of right answers
            by_margin.setdefault(margin, []).append(metric)
    how = (
        f"at {gate.confidence:.0%} confidence, if candidate and champion disagree on {DISAGREEMENT:.0%} of the "
        "examples of a right/wrong metric"
    )
    warnings = []
    for margin, metrics in by_margin.items():
        needed = detectable_difference(n_test, DISAGREEMENT, gate.confidence, margin=margin)
        rule = f"the champion rule on {', '.join(metrics)} (margin {margin:g})"
        if needed == float("inf"):
            warnings.append(
                f"the test split's {n_test} examples are too few for {rule}: no candidate passes it "
                f"{POWER:.0%} of the time, however good ({how}); use more test examples"
            )
        elif needed > max(2 * margin, FINE_DIFFERENCE):
            warnings.append(
                f"the test split's {n_test} examples are too few to detect the margin of {rule}: a "
                f"candidate passes it {POWER:.0%} of the time only when it is truly {needed:+.2f} or more "
                f"better ({how}); use more test examples for finer decisions"
            )
    return warnings


def estimate_training_time(cfg: PipelineConfig, base: BaseModelRef, device: str, tokens: float) -> TimeEstimate | None:
    """`tokens` at the speed of the newest finished training of `base` in the same mode on `device`, read from
    the train stage folders of `cfg.workdir`; None when there is none."""
    from tunepipe.tasks.train.results import TrainResult
    from tunepipe.tasks.train.task import TrainRequest

    measured = []
    for result_path in (cfg.workdir / "train").glob("*/worker-result.json"):
        try:
            result = TrainResult.model_validate_json(result_path.read_text())
            request = TrainRequest.model_validate_json((result_path.parent / "worker-request.json").read_text())
        except (OSError, ValueError):  # half written, or written by another version of tunepipe
            continue
        rates = [point.tokens_per_s for point in result.loss_history if point.tokens_per_s]
        if (
            rates
            and result.device == device
            and request.base.fingerprint == base.fingerprint
            and request.cfg.mode == cfg.train.mode
        ):
            measured.append((result_path.stat().st_mtime, statistics.median(rates), result_path.parent))
    if not measured:
        return None
    _, rate, folder = max(measured)
    return TimeEstimate(seconds=tokens / rate, tokens_per_s=rate, measured_in=folder)


def training_environment(cfg: PipelineConfig, base: BaseModelRef, formatted: FormattedData) -> EnvironmentReport:
    """Training's environment check on this machine, from the model's config alone (no weights are read).

    Raises TrainingEnvironmentError when the run would fail for want of a device or memory.
    """
    from tunepipe.tasks.train.environment import Rank, check_environment, choose_backend
    from tunepipe.tasks.train.task import TrainRequest

    request = TrainRequest(
        data=formatted.train,
        base=base,
        model_cfg=cfg.model,
        lora=cfg.lora,
        cfg=cfg.train,
        out_dir=cfg.workdir / "train",
    )
    backend = choose_backend(cfg.train.backend, cfg.train.mode, cfg.train.devices)
    return check_environment(request, backend, Rank())


def check_run(cfg: PipelineConfig) -> tuple[CheckedData, RunPlan]:
    """Load, check and format the data, and check every stage's needs against this machine; raises
    DataFileError, DataCheckError, WillNotFit (a stage's memory or disk) or TrainingEnvironmentError when a run
    would fail."""
    base = resolve_base_model(cfg.model, cfg.ollama)
    loaded = load_data.fn(cfg.data, data_fingerprint(cfg.data), cfg.workdir)
    checked = check_data.fn(loaded, cfg.data, base, cfg.model, cfg.workdir)
    formatted = format_data.fn(checked, base, cfg.model, cfg.train.assistant_only_loss, cfg.workdir)
    longest = max(formatted.train.max_tokens, formatted.eval.max_tokens)
    loss_share = formatted.train.n_trained_tokens / max(formatted.train.n_tokens, 1)
    memory = run_memory_plan(cfg, base, longest, loss_share).check()  # every stage, before training's own check
    plan = plan_run(cfg, base, formatted, training_environment(cfg, base, formatted))
    return checked, plan.model_copy(update={"memory": memory})
