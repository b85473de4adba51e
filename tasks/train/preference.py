"""Preference tuning in the training worker (issue 22): KTO and DPO steps after (or instead of) the SFT steps.

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

This module holds the rows and the losses; the phase's steps are in the training loop
(tasks/train/loop.py: `train_preference`), which shares its batches, checkpoints and resume with SFT.
Imported by the training worker only (it imports torch at module level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tasks.data.format import IGNORE

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
        raise PreferenceDataError(f"train.objective={objective} needs good answers to learn (SFT rows, desirable "
                                  "rows or DPO pairs); the training data has none")
    if method == "kto" and not preference:
        raise PreferenceDataError("train.objective=kto needs rated rows (TRL's prompt/completion/label, a kto_tag, "
                                  "or RAG rows with rag.max_bad_rating); the training data has none")
    if method == "dpo" and not preference:
        raise PreferenceDataError("train.objective=dpo needs pairs (prompt/chosen/rejected, a ranking dataset, or "
                                  "RAG questions with a good and a bad rated answer); the training data has none")
    return sft, preference


# ------------------------------------------------------------------------------------------------ the losses


def kto_loss(policy_logps, reference_logps, desirable, policy_kl_logps, reference_kl_logps, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """TRL's KTO loss (Eq. 7 of the KTO paper) and its logged metrics, for one batch.

    `desirable` is a boolean tensor per example; the KL log-probabilities are those of mismatched pairs.
    """
    kl = (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)
    logratios = policy_logps - reference_logps
    chosen, rejected = logratios[desirable], logratios[~desirable]
    losses = torch.cat((desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))))
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
    return loss, {"rewards_chosen": chosen.mean().item(), "rewards_rejected": rejected.mean().item(),
                  "rewards_margin": (chosen - rejected).mean().item(),
                  "rewards_accuracy": (chosen > rejected).float().mean().item()}


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
        out.append({"id": f"{row['id']}|kl:{rows[i - 1]['id']}", "input_ids": prompt + answer,
                    "labels": [IGNORE] * len(prompt) + answer})
    return out
