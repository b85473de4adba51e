"""Preference tuning in the training worker: KTO and DPO steps after (or instead of) the SFT steps.

The losses are TRL's (`KTOTrainer`, loss_type "kto"; `DPOTrainer`, loss_type "sigmoid"), on the summed
log-probabilities of each answer (its final assistant turn: TRL's completion), and tests/test_preference.py
compares them with TRL's own trainers on fixed inputs. Why in tunepipe's loop and not TRL's trainers: the
phase runs in the same worker right after SFT (one model load), with the loop's exact resume, checkpoints,
packing, live metrics and environment check on both backends; TRL would need a second process and model load
per phase and its own Trainer state, and the train stage's resume would not cover it.

The reference is the model as the phase starts: for `kto`/`dpo` with LoRA, the base with the adapters disabled
(`disable_adapter`: no second copy); after SFT (`sft+kto`, `sft+dpo`) the SFT result, as TRL and the DPO paper
use the SFT model as the reference. Its log-probabilities are computed once, before the first preference step,
and kept per example in `reference_logps.json` (keyed by the row's id, and for KTO by the id of the row whose
answer is its KL sample), so a resumed run reuses them instead of needing the reference weights again.
KTO's KL term follows TRL: each prompt is paired with the answer of the row before it (data order) and
KL = mean(policy - reference log-probabilities of those mismatched pairs), detached and clamped at 0.

This module holds the rows, the losses and the phase's steps (`train_preference`), which share the SFT steps'
batches, checkpoints and resume. Imported by the training worker only (it imports torch at module level).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tunepipe.tasks.data.format import IGNORE
from tunepipe.tasks.train.batching import ExampleOrder
from tunepipe.tasks.train.checkpoints import TrainingState, resume, save_checkpoint
from tunepipe.tasks.train.progress import LossLog
from tunepipe.tasks.train.stepper import Stepper, finish_step, loss_hidden, make_optimizer, make_scheduler
from tunepipe.tasks.train.task import TrainRequest

HEAD_CHUNK = 1024  # answer positions whose logits exist at once (each chunk's are recomputed in the backward pass)


class PreferenceDataError(ValueError):
    """The data has no rows the objective can learn from."""


def phase_rows(rows: list[dict], objective: str) -> tuple[list[dict], list[dict]]:
    """(SFT rows, preference rows) of the formatted train split for `train.objective`.

    SFT learns good answers only: SFT rows, desirable KTO rows and DPO chosen answers, each distinct token
    sequence once (a good answer is often both a KTO row and a pair's chosen one). KTO learns from the rated
    rows (desirable and undesirable), DPO from the pairs.
    """
    sft, seen = [], set()
    for row in rows:
        key = tuple(row["input_ids"])
        if row.get("kind", "sft") != "undesirable" and key not in seen:
            seen.add(key)
            sft.append({"id": row["id"], "input_ids": row["input_ids"], "labels": row["labels"]})
    preference_kinds = {"kto": ("desirable", "undesirable"), "dpo": ("pair",)}
    method = objective.removeprefix("sft+")
    preference = [row for row in rows if row.get("kind") in preference_kinds.get(method, ())]
    if objective.startswith("sft") and not sft:
        raise PreferenceDataError(
            f"train.objective={objective} needs good answers to learn (SFT rows, desirable "
            "rows or DPO pairs); the training data has none"
        )
    if method == "kto" and not preference:
        raise PreferenceDataError(
            "train.objective=kto needs rated rows (TRL's prompt/completion/label, a kto_tag, "
            "or RAG rows with rag.max_bad_rating); the training data has none"
        )
    if method == "dpo" and not preference:
        raise PreferenceDataError(
            "train.objective=dpo needs pairs (prompt/chosen/rejected, a ranking dataset, or "
            "RAG questions with a good and a bad rated answer); the training data has none"
        )
    return sft, preference


# ------------------------------------------------------------------------------------------------ the losses


def kto_loss(
    policy_logps,
    reference_logps,
    desirable,
    policy_kl_logps,
    reference_kl_logps,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """TRL's KTO loss (Eq. 7 of the KTO paper) and its logged metrics, for one batch.

    `desirable` is a boolean tensor per example; the KL log-probabilities are those of mismatched pairs.
    """
    kl = (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)
    logratios = policy_logps - reference_logps
    chosen, rejected = logratios[desirable], logratios[~desirable]
    losses = torch.cat(
        (
            desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
            undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected))),
        )
    )
    metrics = {"kl": kl.item()}
    if len(chosen):
        metrics["rewards_chosen"] = (beta * chosen.detach()).mean().item()
    if len(rejected):
        metrics["rewards_rejected"] = (beta * rejected.detach()).mean().item()
    if len(chosen) and len(rejected):
        metrics["rewards_margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
    return losses.nanmean(), metrics


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float):
    """TRL's DPO loss (loss_type "sigmoid", no label smoothing) and its logged metrics, for one batch of pairs."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    return loss, {
        "rewards_chosen": chosen.mean().item(),
        "rewards_rejected": rejected.mean().item(),
        "rewards_margin": (chosen - rejected).mean().item(),
        "rewards_accuracy": (chosen > rejected).float().mean().item(),
    }


# --------------------------------------------------------------------------------------- log-probabilities


def chunk_logps(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def rejected_row(row: dict) -> dict:
    return {"id": row["id"], "input_ids": row["rejected_input_ids"], "labels": row["rejected_labels"]}


def kl_rows(rows: list[dict]) -> list[dict]:
    """Row i's prompt with row i-1's answer (TRL's mismatched pairs for the KL estimate), by data order."""

    def split(row):
        first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE)
        return row["input_ids"][:first], row["input_ids"][first:]

    out = []
    for i, row in enumerate(rows):
        prompt, _ = split(row)
        _, answer = split(rows[i - 1])
        out.append(
            {
                "id": f"{row['id']}|kl:{rows[i - 1]['id']}",
                "input_ids": prompt + answer,
                "labels": [IGNORE] * len(prompt) + answer,
            }
        )
    return out


def sequence_logps(stepper: Stepper, rows: list[dict]):
    """Summed log-probability of each row's labelled tokens (its answer), differentiable where grad is on.

    The base transformer runs once over the batch (packed as in SFT); the LM head runs at the answer positions
    only, a chunk at a time, each chunk's logits recomputed in the backward pass instead of kept.
    """
    from torch.utils.checkpoint import checkpoint

    batch = stepper.batch(rows)
    with stepper.autocast():
        hidden, head = loss_hidden(stepper.model, batch, stepper.backend)
        targets = batch["loss_targets"]
        parts = []
        for start in range(0, len(targets), HEAD_CHUNK):
            part = slice(start, start + HEAD_CHUNK)
            args = (hidden[part], head.weight, head.bias, targets[part])
            parts.append(
                checkpoint(chunk_logps, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_logps(*args)
            )
    token_logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return token_logps.new_zeros(len(rows)).index_add(0, batch["loss_example"], token_logps)


def reference_logps(
    stepper: Stepper, sequences: list[dict], path: Path, from_base: bool, batch_size: int
) -> dict[str, float]:
    """Log-probability of every sequence under the reference, by sequence id; what `path` holds is reused."""
    cached = json.loads(path.read_text()) if path.is_file() else {}
    missing = [row for row in sequences if row["id"] not in cached]
    if missing:
        model = stepper.model
        model.eval()
        # The base as reference: the same weights with the adapters off, no second copy of the model.
        off = model.disable_adapter() if from_base and hasattr(model, "disable_adapter") else contextlib.nullcontext()
        with torch.no_grad(), off:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                cached.update(zip((row["id"] for row in chunk), sequence_logps(stepper, chunk).tolist()))
        model.train()
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(cached))
        os.replace(partial, path)
        print(
            f"train: reference log-probabilities of {len(missing)} answers computed "
            f"({'base, adapters off' if from_base else 'the model as the phase starts'}), kept in {path}",
            flush=True,
        )
    return {row["id"]: cached[row["id"]] for row in sequences}


# ----------------------------------------------------------------------------------------------- the phase


def train_preference(
    request: TrainRequest,
    stepper: Stepper,
    rows: list[dict],
    state: TrainingState,
    first_step: int,
    last_step: int,
    resumed_from: int,
    started: float,
) -> str:
    """The preference steps `first_step + 1` … `last_step` on `rows` (phase_rows), from the model in `stepper` as SFT
    left it, resumed from a checkpoint in that range; `started`: perf_counter at training start, less the time of
    earlier runs (resume). Returns what the phase did, for the run's selection sentence."""
    cfg = request.cfg
    pref, checkpoints = cfg.preference, request.out_dir / "checkpoints"
    method = cfg.objective.removeprefix("sft+")
    model = stepper.model
    optimizer = make_optimizer(model, cfg.model_copy(update={"learning_rate": pref.learning_rate}))
    n_steps = last_step - first_step
    scheduler = make_scheduler(cfg, optimizer, min(cfg.warmup_steps, n_steps // 10), n_steps)
    if resumed_from > first_step:  # the checkpoint holds this phase's optimizer and schedule
        resume(checkpoints, model, optimizer, scheduler, stepper.scaler, state)
    from_base = first_step == 0 and request.init_from is None  # the reference is the base: adapters disabled

    if method == "kto":
        others = kl_rows(rows)
    else:  # chosen and rejected share the row's id: the rejected one is cached under its own
        others = [{**rejected_row(row), "id": row["id"] + "|rejected"} for row in rows]
    reference = reference_logps(
        stepper, rows + others, request.out_dir / "reference_logps.json", from_base, pref.batch_size
    )
    partner = dict(zip((row["id"] for row in rows), others))
    trainable = [p for p in model.parameters() if p.requires_grad]
    order = ExampleOrder(len(rows), cfg.seed)
    model.train()
    log = LossLog(state, stepper.device, started)
    for step in range(max(resumed_from, first_step) + 1, last_step + 1):
        picked = [rows[i] for i in order.step(step - first_step, pref.batch_size)]
        matched = [partner[row["id"]] for row in picked]
        ref = torch.tensor([reference[row["id"]] for row in picked], device=stepper.device)
        ref_matched = torch.tensor([reference[row["id"]] for row in matched], device=stepper.device)
        if method == "kto":
            logps = sequence_logps(stepper, picked)
            with torch.no_grad():  # TRL computes the KL samples' log-probabilities without gradient
                kl_logps = sequence_logps(stepper, matched)
            desirable = torch.tensor([row["kind"] == "desirable" for row in picked], device=stepper.device)
            loss, metrics = kto_loss(
                logps, ref, desirable, kl_logps, ref_matched, pref.beta, pref.desirable_weight, pref.undesirable_weight
            )
        else:
            chosen, rejected = sequence_logps(stepper, picked + matched).split(len(picked))
            loss, metrics = dpo_loss(chosen, rejected, ref, ref_matched, pref.beta)
        stepper.scaler.scale(loss).backward()
        grad_norm = finish_step(
            trainable,
            optimizer,
            scheduler,
            stepper.scaler,
            cfg.max_grad_norm,
            set_to_none=not stepper.gradients_in_graphs,
        )
        log.count(picked + matched)
        if step % cfg.logging_steps == 0 or step == last_step:
            log.record(step, loss, scheduler.get_last_lr()[0], grad_norm, phase=method, **metrics)
        if step % cfg.save_steps == 0 and step < last_step:
            state.elapsed_s = log.elapsed()
            save_checkpoint(checkpoints, step, model, optimizer, scheduler, stepper.scaler, state, stepper.rank)
    return f"then {method} steps {first_step + 1}-{last_step} from it"
