"""The one typed config that drives a tunepipe run, loaded from YAML.

Every stage reads only its own section, so a task's cache key can hash exactly the part of the config
it depends on: changing the `gate` rules does not invalidate training or evaluation.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator


class Section(BaseModel):
    # Unknown keys are typos in a user's YAML: fail loudly instead of ignoring them.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _masked(url: str | None) -> str | None:
    # The config is a flow parameter: Prefect stores its JSON form. Credentials in a URL are masked there (and
    # in MLflow params and cache keys); the running flow keeps the real value.
    from tasks.runtime.redact import redact

    return None if url is None else redact(url)


class DataConfig(Section):
    train: Path = Field(
        description="Training data: a file (JSONL, JSON array, CSV or Parquet), a folder of such files, a glob "
        "(`data/*.jsonl`), or a LLaMA-Factory data folder described by its `dataset_info.json`."
    )
    eval: Path | None = Field(
        None, description="The test split, given like `train`: read only by the gate, the champion comparison, "
        "the report's headline and the served model's parity check; split from train when absent "
        "(`eval_fraction`).",
    )
    validation: Path | None = Field(
        None, description="The validation split, given like `train`: every choice before the gate reads it (best "
        "checkpoint, early stopping, the retrain loop's next attempt); split from train when absent "
        "(`validation_fraction`).",
    )
    shape: Literal["auto", "pairs", "alpaca", "sharegpt", "openai", "trl"] = Field(
        "auto",
        description="Record shape: `auto` detects it per record (`messages`: openai, `conversations`: sharegpt, "
        "`instruction`: alpaca, `input`/`output`: pairs, `prompt` with `completion` (and `label`: KTO) or "
        "`chosen`/`rejected` (DPO): trl); naming one quarantines records of any other shape.",
    )
    datasets: list[str] = Field(
        [], description="Entries of a LLaMA-Factory `dataset_info.json` to load; empty loads every entry."
    )
    eval_fraction: float = Field(
        0.1, gt=0, lt=1, description="Test share of the training rows when `eval` is not given: each question "
        "whose stable hash (of `seed` and the question) falls below it, the same on every run and snapshot.",
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Validation share of the training rows when `validation` is not given: the "
        "questions whose hash falls in the band just above `eval_fraction`'s, so a question keeps its side (train, "
        "validation or test) for good as the data grows.",
    )
    system_prompt: str | None = Field(None, description="System message added to examples that have none.")
    reasoning: Literal["keep", "strip", "wrap"] = Field(
        "keep",
        description="Reasoning text, applied when rows are read so training, evaluation and serving see the "
        "same answers. `keep`: answers as written (a leading `<think>…</think>` block stays; a separate "
        "reasoning field is an error, since it would be lost). `strip`: drop `<think>` blocks and reasoning "
        "fields; the model learns to answer directly. `wrap`: write the reasoning (a reasoning field, or a "
        "`<think>` block already there) as one `<think>\\n…\\n</think>\\n\\n` block before the answer. It also "
        "sets the chat template's `enable_thinking` (off for strip, on for keep and wrap) in every stage: "
        "training, evaluation, parity and the Ollama TEMPLATE.",
    )
    output_format: Literal["json", "text"] = Field(
        "json", description="`json`: the assistant answer must be a JSON object (checked and scored as such)."
    )
    required_keys: list[str] = Field(
        [],
        description="Keys every JSON answer must carry (`output_format: json`); empty: the keys every "
        "training answer shares, required of the eval answers.",
    )
    on_invalid: Literal["quarantine", "fail"] = Field(
        "quarantine",
        description="A row that cannot be used: `quarantine` sets it aside (with file, line or row, field and "
        "reason) and goes on; `fail` stops the run before any model work.",
    )
    max_invalid_fraction: float = Field(
        0.05, ge=0, le=1, description="More quarantined rows than this share of the rows read fails the run."
    )
    min_rows: int = Field(20, ge=1, description="Fewer valid training rows than this fails the data check.")
    max_chars: int = Field(20_000, ge=1, description="Longest allowed example (all messages), in characters.")
    seed: int = 0

    @model_validator(mode="after")
    def _room_for_training(self) -> DataConfig:
        if self.eval is None and self.validation is None and self.eval_fraction + self.validation_fraction >= 1:
            raise ValueError(f"data.eval_fraction {self.eval_fraction} + data.validation_fraction "
                             f"{self.validation_fraction} leave no training rows: together they must stay below 1")
        return self


class ModelConfig(Section):
    base: str = Field(
        description="The base model: a Hugging Face hub id, a local transformers folder, a `.gguf` file, or "
        "`ollama:NAME[:TAG]` (the GGUF that Ollama at `ollama.host` serves, found through its API or its models "
        "folder). A GGUF is dequantized into a transformers folder once, with a tokenizer checked against llama.cpp."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    max_seq_length: int = Field(
        1024, ge=16, description="Longest formatted example, in tokens; longer ones are quarantined, not truncated."
    )
    load_in_4bit: bool = Field(
        False, description="Load the frozen base in 4-bit (QLoRA, CUDA only); `train.mode: qlora` implies it."
    )
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's own.")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="GPU memory the run may use, in GiB (16 for a T4, 24 for an RTX 4090): the run "
        "plan (`tunepipe check`, and the run before its first stage) sizes every stage against it, and the "
        "training and evaluation workers cap their CUDA allocator there. null: the card's free memory.",
    )


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="Rank of the LoRA update matrices.")
    alpha: int = Field(
        32, ge=1, description="LoRA scaling: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input; 0 lets unsloth use its fast path.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module names that get adapters, or `all-linear` for every linear layer but the LM head.",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained with the adapter.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha / sqrt(r), for large ranks.")


class PreferenceConfig(Section):
    """KTO and DPO: the losses as TRL defines them, against reference log-probabilities computed
    once, by the model as it stands when the preference phase starts (the base with adapters off, or the SFT
    result for `sft+kto` / `sft+dpo`)."""

    beta: float = Field(0.1, gt=0, description="How far the policy may move from the reference (TRL's beta).")
    desirable_weight: float = Field(1.0, gt=0, description="KTO: weight of the desirable examples' losses.")
    undesirable_weight: float = Field(
        1.0, gt=0, description="KTO: weight of the undesirable examples' losses; TRL advises weights such that "
        "desirable_weight x desirable rows / (undesirable_weight x undesirable rows) lies in [1, 4/3].",
    )
    max_steps: int = Field(
        50, ge=1, description="Optimizer steps of the preference phase (after SFT's `train.max_steps` when the "
        "objective is `sft+kto` or `sft+dpo`; instead of them for `kto` or `dpo`).",
    )
    learning_rate: float = Field(
        5e-5, gt=0, description="Learning rate of the preference phase (lower than SFT's: it fine-tunes a "
        "model that already answers well).",
    )
    batch_size: int = Field(
        8, ge=2, description="Examples (KTO) or pairs (DPO) per step; KTO's KL estimate needs at least two.",
    )


class EarlyStopping(Section):
    patience: int = Field(
        ge=1, description="Stop after this many evaluations in a row without an improvement of `retrain.metric`."
    )
    min_delta: float = Field(
        0.0, ge=0, description="An evaluation improves only when it beats the best so far by more than this "
        "(the best checkpoint still follows every gain).",
    )


class TrainConfig(Section):
    backend: Literal["auto", "hf", "unsloth"] = Field(
        "auto", description="`auto` uses unsloth when CUDA is available, else transformers + peft."
    )
    objective: Literal["sft", "kto", "dpo", "sft+kto", "sft+dpo"] = Field(
        "sft", description="`sft`: learn the good answers (SFT rows, desirable KTO rows, DPO chosen answers). "
        "`kto`: rated answers, desirable up and undesirable down (unpaired thumbs). `dpo`: chosen over rejected "
        "answers to the same prompt. `sft+kto` / `sft+dpo`: SFT first, then the preference phase, in one run.",
    )
    preference: PreferenceConfig = PreferenceConfig()
    mode: Literal["lora", "qlora", "full"] = Field(
        "lora", description="`lora`: adapter on a 16-bit base; `qlora`: adapter on a 4-bit base (CUDA only); "
        "`full`: train every weight (the output is a whole model, not an adapter).",
    )
    max_steps: int | None = Field(
        100, ge=1, description="Optimizer steps to train; null trains `epochs` passes instead."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training set, used when `max_steps` is null.")
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch on each device.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    optimizer: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="`adamw_8bit` keeps the optimizer state in 8 bits (bitsandbytes, CUDA only)."
    )
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="After `warmup_steps` of linear warm-up: decay linearly or by cosine to zero, or stay."
    )
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null does not clip.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="`auto`: bf16 where the GPU supports it, else fp16 on a GPU, fp32 on the CPU."
    )
    packing: bool = Field(
        True, description="Padding-free batches: a micro-batch's examples are concatenated into one row, each "
        "attending only to itself; no compute is spent on padding.",
    )
    assistant_only_loss: bool = Field(
        True, description="Train on the assistant's answers only; false also trains on system and user turns."
    )
    gradient_checkpointing: bool | Literal["auto", "offload"] = Field(
        "auto", description="Recompute activations in the backward pass: much less memory, slower steps. `auto`: "
        "only when a step's activations would not fit in half the free memory (the environment check's estimate). "
        "`offload` also keeps each layer's saved input in pinned CPU memory (on a GPU; on the CPU it is `true`).",
    )
    cuda_graphs: bool = Field(
        True, description="LoRA on a 16-bit base, one CUDA device, with or without recomputation: replay the "
        "transformer's forward and backward from CUDA graphs for unpadded, unpacked "
        "micro-batches of one repeating shape (a shape is captured when it comes twice in a row), and for "
        "unsloth's packed micro-batches, laid out in one shape for the run (padding included), so a step "
        "launches two graphs instead of thousands of kernels. Other micro-batches run as before; a capture that "
        "fails is reported and training goes on without graphs.",
    )
    save_steps: int = Field(
        50, ge=1, description="Write a checkpoint every this many steps; a killed run resumes from the newest."
    )
    max_oom_retries: int = Field(
        3, ge=0, description="On CUDA out-of-memory, halve the micro-batch and double accumulation, at most this often."
    )
    devices: int = Field(1, ge=1, description="Data-parallel processes (GPUs) to train on, through torchrun.")
    seed: int = 42
    logging_steps: int = Field(
        1, ge=1, description="Log loss, learning rate, grad norm, tokens/s and peak memory every this many steps."
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Every this many steps (and at the last), measure the loss on the validation "
        "split and, when `retrain.metric` is a metric of the answers, that metric on `eval_samples` validation "
        "prompts answered greedily; both reach MLflow as curves (`eval_loss`, `eval_<metric>`). null: none.",
    )
    eval_samples: int = Field(
        16, ge=1, description="Validation prompts (the first ones of the split) answered at each evaluation "
        "during training (train.eval_steps).",
    )
    select: Literal["last", "best"] | None = Field(
        None, description="Which weights the train stage returns, and so what is evaluated, exported and served: "
        "`last` (the last step) or `best` (the evaluation with the best `retrain.metric`; ties: the lower eval "
        "loss). null: `best` when `eval_steps` is set, else `last`.",
    )
    early_stopping: EarlyStopping | None = Field(
        None, description="Stop before `max_steps` once `retrain.metric` has stopped improving (needs `eval_steps`)."
    )

    @property
    def selection(self) -> Literal["last", "best"]:
        return self.select or ("best" if self.eval_steps else "last")

    @model_validator(mode="after")
    def _evaluations_needed(self) -> TrainConfig:
        if self.eval_steps is None and (self.select == "best" or self.early_stopping is not None):
            what = "train.select=best" if self.select == "best" else "train.early_stopping"
            raise ValueError(f"{what} needs held-out evaluations during training: set train.eval_steps")
        return self


# How a judge reads a rubric answer: the default rubric, G-Eval style (criteria, then what each score means).
DEFAULT_RUBRIC = (
    "Correctness and completeness against the reference answer, using only what the question and its context "
    "support.\n"
    "5: says everything the reference says that matters, with nothing wrong or invented.\n"
    "4: correct, but misses a minor point or adds an unneeded detail.\n"
    "3: partly correct: a main point is missing or unclear.\n"
    "2: mostly wrong or off the question, with a fragment of the right answer.\n"
    "1: wrong, invented, or no answer."
)


class JudgeConfig(Section):
    """A second model that judges the answers (prose, where word overlap misleads): pairwise against the
    champion (the base for a first model), asked in both orders, or each answer on a rubric."""

    model: str = Field(
        description="`ollama:NAME[:TAG]` (a model on the Ollama at `base_url`, default `ollama.host`), "
        "`openai:MODEL` (any OpenAI-compatible chat endpoint at `base_url`), or a `.gguf` file, which tunepipe "
        "serves with llama-cpp-python's own OpenAI-compatible server for the evaluation and stops after.",
    )
    base_url: str | None = Field(
        None, description="Ollama: its URL (default: `ollama.host`, $OLLAMA_HOST, http://127.0.0.1:11434). "
        "openai: the API's base URL ending in /v1, e.g. http://gpu-box:8000/v1 (required).",
    )
    _mask_base_url = field_serializer("base_url", when_used="json")(lambda self, value: _masked(value))
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the endpoint's API key, sent as a bearer "
        "token; the key itself is never in the config, the logs or the judge's records.",
    )
    mode: Literal["pairwise", "rubric"] = Field(
        "pairwise", description="`pairwise`: the candidate's answer against the champion's (the base's for a "
        "first model), in both orders; a verdict that flips with the order is a tie. Metric `judge_win_rate` "
        "(win 1, tie 0.5, loss 0). `rubric`: each of the two answers scored 1-5 against the reference by "
        "`rubric`; metric `judge_score`, the score mapped to [0, 1] ((score - 1) / 4).",
    )
    rubric: str = Field(DEFAULT_RUBRIC, description="Rubric mode: what the judge scores and what each score means.")
    structured: bool = Field(
        False, description="Constrain the judge's reply to a JSON verdict (Ollama's `format`, the endpoint's "
        "`response_format` JSON schema): no room for an explanation, but a small judge always answers in the "
        "format. Off: the judge explains, then gives its verdict as [[A]] / [[B]] / [[C]] (or [[1]]-[[5]]).",
    )
    max_tokens: int = Field(512, ge=1, description="Longest reply of the judge, explanation included.")
    timeout_s: float = Field(300, gt=0, description="How long one judge call may take.")
    context_length: int = Field(
        4096, ge=256, description="A `.gguf` judge: the context its server is started with (prompt and reply).",
    )
    max_unparsed: float = Field(
        0.1, ge=0, le=1, description="Largest share of judge calls whose verdict cannot be read even after the "
        "format was restated once; more, and the judge's metrics count as not measured: the run fails naming "
        "the gate rules that could not be measured.",
    )

    max_order_flips: float = Field(
        0.5, ge=0, le=1, description="Pairwise: largest share of examples (of those with both verdicts read) whose "
        "verdict changes with the order of the answers; more, and the judge is judging positions, not answers: its "
        "metric counts as not measured and the run fails naming the gate rules that could not be measured.",
    )

    @model_validator(mode="before")
    @classmethod
    def _model_only(cls, raw: Any) -> Any:
        """`eval.judge: ollama:qwen2.5:7b` names the model and keeps every default."""
        return {"model": raw} if isinstance(raw, str) else raw

    @model_validator(mode="after")
    def _known_kind(self) -> JudgeConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai: judge needs base_url (the API's base URL, ending in /v1)")
        if self.kind == "gguf" and self.base_url:
            raise ValueError("a .gguf judge is served by tunepipe itself: base_url does not apply")
        return self

    @property
    def kind(self) -> Literal["ollama", "openai", "gguf"]:
        if self.model.startswith("ollama:"):
            return "ollama"
        if self.model.startswith("openai:"):
            return "openai"
        if self.model.endswith(".gguf"):
            return "gguf"
        raise ValueError(f"judge model {self.model!r}: expected ollama:NAME, openai:MODEL or a .gguf file")

    @property
    def metric(self) -> str:
        """The metric this judge writes."""
        return JUDGE_METRICS[self.mode]


class RetentionConfig(Section):
    """General prompts outside the task, to measure what fine-tuning made the model forget: the base answers them
    greedily, and the candidate's loss on those answers is set against the base's own (tasks/evaluate/retention.py)."""

    builtin: int = Field(
        16, ge=0, description="How many of the built-in general prompts to ask, in their order, which changes language "
        "from one to the next (English, French, German, Spanish, Chinese, ...: general chat, instructions, a little "
        "arithmetic and knowledge); 0: none.",
    )
    prompts: Path | None = Field(
        None, description="Your own general prompts, asked after the built-in ones: JSONL, one per line, "
        '`{"prompt": "..."}` or `{"messages": [...]}` ending with a user turn (an `id` and a `language` may be given).',
    )
    max_new_tokens: int = Field(
        64, ge=1, description="Longest answer the base and the candidate give to a general prompt.",
    )

    @model_validator(mode="after")
    def _prompts_readable(self) -> RetentionConfig:
        # A bad prompts file fails when the config loads, before any training, naming its file and line.
        from tasks.evaluate.general_prompts import read_prompts

        read_prompts(self)
        return self


class EvalConfig(Section):
    # Retention is a stage of its own, and the judge reads the answers the evaluation wrote: changing either
    # never generates them again.
    cache_exclude: ClassVar[set[str]] = {"retention", "judge"}

    max_samples: int = Field(64, ge=1, description="Examples of each split (validation, test) used for generation metrics.")
    max_new_tokens: int = Field(128, ge=1, description="Longest answer generated; one cut here has not stopped.")
    batch_size: int = Field(
        16, ge=1, description="Prompts answered at once (and rows per eval-loss batch); on a GPU 64-128 is fastest."
    )
    probes: list[str] = Field(
        [], description="Fixed user prompts (the data's system prompt is added) answered by base, champion and "
        "candidate side by side, written to the evaluation's probes.jsonl.",
    )
    retention: RetentionConfig = Field(
        RetentionConfig(), description="General prompts outside the task, answered by base and candidate: what "
        "the candidate forgot (gate.retention decides on it).",
    )
    judge: JudgeConfig | None = Field(
        None, description="A second model that judges the test answers (`ollama:NAME`, `openai:MODEL` with "
        "base_url, or a .gguf file; a string sets only the model); its metric (`judge_win_rate` or `judge_score`) "
        "can then be gated like any other. null: no judge.",
    )


# Metrics the evaluate stage reports (tasks/evaluate/metrics.py), by the name a gate rule uses. Checked when the config
# loads, so a typo fails before training, not after it.
JSON_METRICS = {"valid_json_rate", "exact_match", "field_accuracy", "key_precision", "key_recall", "key_f1",
                "required_keys_rate"}
TEXT_METRICS = {"exact_match", "rouge_l", "chrf"}
COMMON_METRICS = {"eval_loss", "stop_rate"}
# Written by the judge (eval.judge), by its mode; only for the test report the gate reads.
JUDGE_METRICS = {"pairwise": "judge_win_rate", "rubric": "judge_score"}
LOWER_IS_BETTER = {"eval_loss"}


class MetricRule(Section):
    """Limits on one metric of the candidate. Unset limits are not checked."""

    min: float | None = Field(None, description="The candidate's value must be at least this.")
    max: float | None = Field(None, description="The candidate's value must be at most this.")
    min_improvement_over_base: float | None = Field(
        None, description="The candidate must beat the base model by more than this, in the metric's better "
        "direction (for eval_loss, base loss minus candidate loss; for the others, candidate minus base): the lower "
        "end of the paired interval (`gate.confidence`) of the per-example differences must be above it.",
    )


class RetentionRule(Section):
    """The candidate must still find the base's answers to general prompts about as likely as the base does."""

    max_loss_increase: float = Field(
        0.5, ge=0, description="Largest rise allowed, in nats per token, of the candidate's mean token loss on the "
        "base's own greedy answers to the general prompts over the base's loss on them. A rise of d means the "
        "candidate finds what the base would say exp(d) times less likely per token (0.5: about 1.6 times).",
    )


class GateConfig(Section):
    """What a candidate must reach to be exported: rules on its metrics and, once a champion exists, on it."""

    rules: dict[str, MetricRule] = Field(
        default_factory=dict,
        description="Rules per metric name: eval_loss, stop_rate; JSON answers: valid_json_rate, exact_match, "
        "field_accuracy, field_accuracy.<key>, key_precision, key_recall, key_f1, required_keys_rate; "
        "text answers: exact_match, rouge_l, chrf; with eval.judge: judge_win_rate (pairwise) or judge_score (rubric).",
    )
    must_beat_champion_by: dict[str, float] = Field(
        default_factory=dict,
        description="When a champion exists, on each metric named here and on every metric that has a rule "
        "(margin 0 for those not named), the lower end of the paired interval (`gate.confidence`) of candidate "
        "minus champion, per test example, must be above the margin. A positive margin: better by more than it; "
        "0: shown better (a candidate no better than the champion keeps it serving); negative: not worse by that "
        "much. Better means higher, except for eval_loss (lower).",
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Confidence of the intervals the base and champion rules decide on (two-"
        "sided: at 0.95 an equal candidate passes a margin-0 rule at most 2.5% of the time).",
    )
    max_regressions: int | float | None = Field(
        None, description="The most test examples that may regress against the champion (against the base before "
        "the first promotion): examples it matched exactly that the candidate does not, or JSON fields it had right "
        "that the candidate has wrong. A whole number is a count (0: none); a number between 0 and 1 a share of the "
        "test examples (0.02: 2%). null: regressions are listed, not gated.",
    )

    @model_validator(mode="after")
    def _regressions_are_a_count_or_a_share(self) -> GateConfig:
        allowed = self.max_regressions
        if isinstance(allowed, float) and not 0 < allowed < 1 or isinstance(allowed, int) and allowed < 0:
            raise ValueError(f"max_regressions: {allowed} is neither a count (a whole number, at least 0) nor a share "
                             "of the test examples (a number between 0 and 1)")
        return self

    retention: RetentionRule | None = Field(
        RetentionRule(),
        description="What the candidate may forget of the base's general ability (eval.retention's prompts); "
        "null: no rule.",
    )

    def champion_margins(self) -> dict[str, float]:
        return {**{metric: 0.0 for metric in self.rules}, **self.must_beat_champion_by}


class RetrainChange(Section):
    """How one retry differs from the attempt before it. Unset fields keep that attempt's values."""

    continue_training: bool = Field(
        False, description="Start from the previous attempt's trained weights instead of the base model; "
        "max_steps (or epochs) then counts the new steps only.",
    )
    max_steps: int | None = Field(None, ge=1, description="Training steps of this attempt.")
    epochs: float | None = Field(
        None, gt=0, description="Passes over the training set instead of a step count (train.epochs with "
        "train.max_steps null).",
    )
    max_steps_factor: float | None = Field(
        None, gt=0, description="Train this share of the steps the previous attempt trained (at least one), e.g. "
        "0.5; instead of max_steps or epochs.",
    )
    learning_rate_factor: float | None = Field(None, gt=0, description="Multiply the learning rate, e.g. 0.5.")
    lora_r: int | None = Field(
        None, ge=1, description="LoRA rank of this attempt; alpha keeps its ratio to the rank. Not with "
        "continue_training (the trained adapter has the old rank).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> RetrainChange:
        if self.model_dump(exclude_defaults=True) == {}:
            raise ValueError("this step changes nothing: the attempt would repeat the one before it")
        if sum(value is not None for value in (self.max_steps, self.epochs, self.max_steps_factor)) > 1:
            raise ValueError("give one of max_steps, epochs and max_steps_factor")
        if self.continue_training and self.lora_r is not None:
            raise ValueError("continue_training keeps the trained adapter's rank; lora_r cannot change with it")
        return self


class RetrainConfig(Section):
    """The bounded retrain loop: when the gate fails, train again following `plan`, at most max_attempts times."""

    max_attempts: int = Field(1, ge=1, description="Training attempts in all, the first included; 1: no retry.")
    plan: list[RetrainChange] = Field(
        default_factory=lambda: [RetrainChange(continue_training=True)],
        description="Changes for attempt 2, 3, ... in order; the last one repeats when the plan is shorter "
        "than max_attempts - 1.",
    )
    metric: str = Field(
        "eval_loss", description="The metric an attempt must improve; the loop stops early when it does not.",
    )
    min_improvement: float = Field(
        0.0, ge=0, description="An attempt improves when it beats the best earlier attempt on `metric` by more "
        "than this.",
    )
    past_best: RetrainChange | None = Field(
        default_factory=lambda: RetrainChange(continue_training=True, learning_rate_factor=0.5,
                                              max_steps_factor=0.5),
        description="Used instead of the plan's step when that step would only train longer (it changes neither "
        "the learning rate nor the rank) and the previous attempt's held-out curve (train.eval_steps) peaked "
        "before its last evaluation, so more of the same would go further past the best. The default continues "
        "from the returned weights (the best checkpoint with train.select best) at half the learning rate for "
        "half the steps. null: always follow the plan.",
    )


GgufType = Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"]


class ExportConfig(Section):
    # Export writes files; the parity limits only decide which of them are served.
    cache_exclude: ClassVar[set[str]] = {"max_drop", "max_drop_by_type"}

    gguf_types: list[GgufType] = Field(
        ["q8_0"], min_length=1,
        description="GGUF types to export; each is re-evaluated (parity) and the smallest one within "
                    "`max_drop` is registered in Ollama. Replaces the old single `gguf_quantization`.",
    )
    lora_gguf: bool = Field(
        True, description="Also write the LoRA adapter as a GGUF (llama.cpp's convert_lora_to_gguf.py) with a "
                          "`Modelfile.adapter` for Ollama's FROM base + ADAPTER route (LoRA training only).",
    )
    max_drop: dict[str, float] = Field(
        {"exact_match": 0.02, "valid_json_rate": 0.02, "stop_rate": 0.02},
        description="Parity: the largest drop of each metric (tasks/evaluate/metrics.py names) a GGUF may show against "
                    "the PyTorch model on the held-out examples; a GGUF over any limit is not registered.",
    )
    max_drop_by_type: dict[GgufType, dict[str, float]] = Field(
        {}, description="Per-type parity limits overriding `max_drop` metric by metric, e.g. "
                        "{q4_k_m: {exact_match: 0.05}}.",
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate_gguf_quantization(cls, raw: Any) -> Any:
        """Configs written before `gguf_types` named one type as `gguf_quantization`; read it as a list of one."""
        if isinstance(raw, dict) and "gguf_quantization" in raw:
            raw = dict(raw)
            old = raw.pop("gguf_quantization")
            if "gguf_types" in raw:
                raise ValueError("set `gguf_types` only; `gguf_quantization` is its old single-type form")
            warnings.warn("export.gguf_quantization is deprecated: write `gguf_types: [" + str(old) + "]`",
                          DeprecationWarning, stacklevel=2)
            raw["gguf_types"] = [old]
        return raw

    def drop_limits(self, gguf_type: str) -> dict[str, float]:
        return {**self.max_drop, **self.max_drop_by_type.get(gguf_type, {})}


class OllamaConfig(Section):
    model_name: str = Field(description="Name registered in Ollama (a `:latest` tag is implied).")
    host: str | None = Field(None, description="Ollama base URL; defaults to $OLLAMA_HOST or http://127.0.0.1:11434.")
    _mask_host = field_serializer("host", when_used="json")(lambda self, value: _masked(value))
    num_ctx: int = Field(4096, ge=256)
    temperature: float = Field(0.0, ge=0)
    timeout_s: float = Field(600, gt=0, description="How long a blob upload or create may take.")
    template: str | None = Field(
        None, description="Ollama Go TEMPLATE overriding the one derived from the chat template."
    )
    system: str | None = Field(
        None, description="System prompt written into the Modelfile (SYSTEM); defaults to `data.system_prompt`, "
                          "the one the model was trained with, else the chat template's own default.",
    )
    smoke_examples: int = Field(
        5, ge=0, description="Held-out examples asked through /api/chat after registration (with the probes); "
                             "each answer must parse as the task demands and end by a stop, or nothing is promoted.",
    )
    adapter_base: str | None = Field(
        None, description="FROM line of `Modelfile.adapter` (an Ollama model such as qwen2.5:0.5b-instruct, or a "
                          "path); defaults to the base model's local folder, which Ollama imports as safetensors.",
    )

    def modelfile_settings(self) -> dict[str, Any]:
        """What the Modelfile takes from this section, as `modelfile_spec`'s keywords."""
        return {"template": self.template, "system": self.system,
                "parameters": {"num_ctx": self.num_ctx, "temperature": self.temperature}}


class TrackingConfig(Section):
    uri: str = Field("sqlite:///runs/mlflow.db", description="MLflow tracking URI.")
    _mask_uri = field_serializer("uri", when_used="json")(lambda self, value: _masked(value))
    experiment: str = "tunepipe"
    artifact_location: str = Field("runs/mlartifacts", description="Where a new experiment stores artifacts.")


class RagColumns(Section):
    """Where each field of a logged RAG example lives: a column of the SQL table or a key of a JSONL record."""

    id: str = Field("id", description="Unique, increasing row id (the watermark when `watermark_on: id`).")
    question: str = Field("question", description="The user's question.")
    context: str | None = Field("context", description="Retrieved passages shown to the model; null: none logged.")
    answer: str = Field("answer", description="The answer given (the training target).")
    rating: str | None = Field(
        "rating", description="Rating or feedback: a number, a boolean, or a word from `feedback_values`; null: none."
    )
    created_at: str = Field("created_at", description="When the example was logged.")


class RagConfig(Section):
    """Accumulated RAG Q&A that the retrain flow folds into the training set, each row exactly once."""

    sql_url: str | None = Field(
        None, description="SQLAlchemy URL of the log database, e.g. sqlite:///rag.db or "
        "postgresql+psycopg://user@host/db (the password from the environment, never in this file).",
    )
    _mask_url = field_serializer("sql_url", when_used="json")(lambda self, value: _masked(value))
    table: str = Field("rag_examples", description="Table (or view) holding the logged examples.")
    jsonl_dir: Path | None = Field(
        None, description="Folder of JSONL drops (`*.jsonl`, one record per line, keys named as in `columns`). "
        "Files may grow; only complete lines are read, so write drops by appending whole lines.",
    )
    columns: RagColumns = RagColumns()
    watermark_on: Literal["id", "created_at"] = Field(
        "id", description="What the SQL watermark follows: rows with a larger id (or a later created_at, ties "
        "broken by id) than the last consumed one are new. It must grow in commit order.",
    )
    state_dir: Path | None = Field(
        None, description="Where the watermark and the dataset snapshots live; default `<workdir>/rag`. Keep it "
        "on persistent storage: it is what makes ingestion exactly-once.",
    )
    min_rating: float | None = Field(
        None, description="Drop rated examples below this rating; with `max_bad_rating`, the rows at or above "
        "it are the desirable (KTO) and chosen (DPO) answers.",
    )
    max_bad_rating: float | None = Field(
        None, description="Keep rows rated at or below this as undesirable answers (KTO; DPO's rejected answer "
        "where the question also has a good one) instead of dropping them; null: no preference rows. Some of "
        "the rated questions are held out (data.eval_fraction) so evaluation sees rated-bad answers it never "
        "trained on.",
    )
    keep_unrated: bool = Field(True, description="Keep examples without a rating (false: only rated ones).")
    feedback_values: dict[str, float] = Field(
        {"up": 1.0, "down": 0.0, "good": 1.0, "bad": 0.0, "positive": 1.0, "negative": 0.0},
        description="Feedback words (case-insensitive) and the rating each stands for.",
    )
    dedupe: Literal["question", "conversation", "off"] = Field(
        "question", description="Drop a new example whose question (`question`) or whole conversation "
        "(`conversation`) is already in the base set or was ingested before; the first one wins.",
    )
    context_mode: Literal["user", "system", "omit"] = Field(
        "user", description="Where retrieved context enters the prompt: before the question in the user turn, "
        "appended to the system prompt, or left out. Match what your RAG app sends at inference.",
    )
    context_template: str = Field(
        "Context:\n{context}", description="How the context block is written; `{context}` is replaced."
    )
    min_new_examples: int = Field(
        50, ge=1, description="Fewer new (not yet trained on) examples than this: the run ends as nothing to do.",
    )

    @model_validator(mode="after")
    def _bad_below_good(self) -> RagConfig:
        if None not in (self.min_rating, self.max_bad_rating) and self.max_bad_rating >= self.min_rating:
            raise ValueError(f"max_bad_rating ({self.max_bad_rating}) must be below min_rating ({self.min_rating}): "
                             "a rating cannot be both good and bad")
        return self


class RetryConfig(Section):
    """Retries of the tasks that talk to the network: hub resolution, Ollama and the MLflow model registry."""

    attempts: int = Field(
        4, ge=1, description="Tries in all of such a task when its call failed transiently (no answer, a "
                             "connection cut off, HTTP 429 or 5xx); 1: no retry. Each task is safe to repeat.")
    backoff_s: float = Field(
        5.0, ge=0, description="Wait before the first retry, in seconds; each later one waits twice as long.")


class PipelineConfig(Section):
    name: str = Field(description="Name of this pipeline; MLflow run names start with it.")
    workdir: Path = Field(Path("runs"), description="Root of every output: stage results, exports, quarantine.")
    data: DataConfig
    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    retrain: RetrainConfig = RetrainConfig()
    export: ExportConfig = ExportConfig()
    ollama: OllamaConfig
    tracking: TrackingConfig = TrackingConfig()
    retry: RetryConfig = RetryConfig()
    rag: RagConfig | None = Field(None, description="Accumulated RAG examples for scheduled retraining.")

    @model_validator(mode="after")
    def _full_fine_tuning_needs_a_16_bit_base(self) -> PipelineConfig:
        if self.model.load_in_4bit and self.train.mode == "full":
            raise ValueError("model.load_in_4bit cannot train every weight: use train.mode qlora (or lora)")
        return self

    @model_validator(mode="after")
    def _gate_metrics_exist(self) -> PipelineConfig:
        """Every metric a rule or the retrain loop names must be one the evaluation reports for this data."""
        known = COMMON_METRICS | (JSON_METRICS if self.data.output_format == "json" else TEXT_METRICS)
        judged = {self.eval.judge.metric} if self.eval.judge is not None else set()
        named = [*((f"gate.rules.{m}", m) for m in self.gate.rules),
                 *((f"gate.must_beat_champion_by.{m}", m) for m in self.gate.must_beat_champion_by)]
        for where, metric in named:
            per_field = self.data.output_format == "json" and metric.startswith("field_accuracy.")
            if metric not in known | judged and not per_field:
                raise ValueError(f"{where}: unknown metric {metric!r} for {self.data.output_format} answers; "
                                 f"known: {', '.join(sorted(known | judged))}, field_accuracy.<key>"
                                 + _judge_hint(metric, self.eval.judge))
        metric = self.retrain.metric
        if metric not in known and not (self.data.output_format == "json" and metric.startswith("field_accuracy.")):
            # The judge measures only the report the gate reads, never the attempts the loop compares.
            raise ValueError(f"retrain.metric: unknown metric {metric!r} for {self.data.output_format} answers; "
                             f"known: {', '.join(sorted(known))}, field_accuracy.<key>")
        return self


    @model_validator(mode="after")
    def _retention_rule_has_prompts(self) -> PipelineConfig:
        if self.gate.retention is not None and self.eval.retention.builtin == 0 and self.eval.retention.prompts is None:
            raise ValueError("gate.retention needs general prompts to decide on: set eval.retention.builtin above 0 "
                             "or eval.retention.prompts, or set gate.retention to null")
        return self


def _judge_hint(metric: str, judge: JudgeConfig | None) -> str:
    """Why a judge metric is unknown: no judge, or a judge of the other mode."""
    modes = {name: mode for mode, name in JUDGE_METRICS.items()}
    if metric not in modes:
        return ""
    if judge is None:
        return f" ({metric} is the judge's: set eval.judge)"
    return f" ({metric} is written in eval.judge.mode {modes[metric]}; this judge's mode is {judge.mode})"


class ConfigError(ValueError):
    """A config file that cannot be used, with the YAML path of every offending key."""


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Read YAML from `path`, apply `section.key=value` overrides, and validate."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()]
        raise ConfigError(f"{path}: invalid config\n" + "\n".join(problems)) from None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """`train.max_steps=20` sets raw['train']['max_steps'] = 20; the value is parsed as YAML."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. train.max_steps=20")
    *parents, leaf = key.strip().split(".")
    node = raw
    for i, part in enumerate(parents):
        if node.get(part) is None:  # absent, or a key whose lines are all commented out
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(parents[: i + 1])} is not a section")
    node[leaf] = yaml.safe_load(value)


def json_schema() -> str:
    """JSON schema of the config, for editor completion and validation of YAML files."""
    return json.dumps(PipelineConfig.model_json_schema(), indent=2) + "\n"
