"""What each stage of a run needs of the machine, against what the machine has: GPU memory for training, the
evaluations during training and the evaluate stage; host memory and disk for export and parity.

Estimates come from the model's config alone (a meta-device skeleton: no weights read) and the run's settings,
at the longest sequence the run can meet (the formatted data's longest row, or `model.max_seq_length` before
the data is formatted: longer rows are quarantined). A stage that adapts (training halves its micro-batch on
out-of-memory up to `train.max_oom_retries` times; evaluation sizes its batch to the memory left) is refused
only when its smallest batch cannot fit; `WillNotFit` names the stage and the setting to change.

The evaluate stage loads one model at a time, as training loaded the base: 4-bit (NF4) with the adapter beside
it for a QLoRA run, else 16-bit (bf16, or fp16 on a GPU without bf16).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tunepipe.tasks.runtime.config import TrainConfig

GIB = 2**30
# NF4 with double quantization: 4 bits a weight, one 8-bit scale per 64 weights and their fp32 scales per 256
# blocks (bitsandbytes' layout); embeddings and the LM head stay 16-bit.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# The allocator's fragmentation and the CUDA context's own buffers: a stage keeps this share of the budget free.
HEADROOM = 0.1
# GGUF bytes per weight of each type (llama.cpp's block layouts; the K-quant mixes as llama.cpp assigns them).
GGUF_BYTES = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q6_k": 210 / 256, "q5_k_m": 0.69, "q4_k_m": 0.61}


class WillNotFit(RuntimeError):
    """A stage of the run needs more than the machine has; raised before any stage runs."""


class ModelShape(BaseModel):
    """The sizes the estimates need, from the model's transformers config."""

    params: int
    linear_params: int  # in the decoder layers' linear layers: what 4-bit quantizes
    largest_tensor: int  # elements (the embedding, usually)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_per_token: int  # cached key and value elements per token, all layers
    linear_widths: dict[str, int]  # by module name (q_proj, ...): in + out features summed over the layers


def model_shape(hf_config) -> ModelShape:
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    hf_config = copy.deepcopy(hf_config)
    hf_config.__dict__.pop("quantization_config", None)  # a loaded 4-bit model's: the skeleton is the plain model's
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    linears = [
        (name.split(".")[-1], module)
        for name, module in skeleton.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    ]
    widths: dict[str, int] = {}
    for short, module in linears:
        widths[short] = widths.get(short, 0) + module.in_features + module.out_features
    return ModelShape(
        linear_widths=widths,
        params=sum(p.numel() for p in skeleton.parameters()),
        linear_params=sum(module.weight.numel() for _, module in linears),
        largest_tensor=max(p.numel() for p in skeleton.parameters()),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        vocab=text.vocab_size,
        kv_per_token=2 * text.num_hidden_layers * kv_heads * head_dim,
    )


def weights_bytes(shape: ModelShape, four_bit: bool, dtype_bytes: int = 2) -> float:
    """The model's weights on the device: 16-bit (or `dtype_bytes`), or 4-bit linear layers and 16-bit rest."""
    if four_bit:
        return shape.linear_params * NF4_BYTES + (shape.params - shape.linear_params) * 2
    return shape.params * dtype_bytes


def lora_params(shape: ModelShape, lora) -> int:
    """The parameters of a LoRA adapter (`lora`: the config's section) on the model: r x (in + out) a module."""
    targets = lora.target_modules
    return lora.r * sum(
        width for name, width in shape.linear_widths.items() if targets == "all-linear" or name in targets
    )


def generation_row_bytes(shape: ModelShape, length: int, dtype_bytes: int) -> float:
    """One greedy-decoding row: its static KV cache over `length` positions, the prefill's activations (one
    layer's at a time) and the last position's logits in fp32."""
    cache = shape.kv_per_token * length * dtype_bytes
    prefill = length * (6 * shape.hidden + 3 * shape.intermediate) * dtype_bytes
    return cache + prefill + shape.vocab * 4


def loss_row_bytes(shape: ModelShape, length: int, dtype_bytes: int, answer_share: float = 1.0) -> float:
    """One row of the eval loss: a layer's activations, and the logits of its answer positions (16-bit, and the
    fp32 copy the loss reads)."""
    activations = length * (6 * shape.hidden + 3 * shape.intermediate) * dtype_bytes
    return activations + length * answer_share * shape.vocab * (dtype_bytes + 4)


def rows_that_fit(budget_bytes: float, fixed_bytes: float, row_bytes: float, requested: int) -> int:
    """The most rows (at most `requested`) whose memory fits `budget_bytes` after `fixed_bytes`; 0 if none."""
    room = budget_bytes * (1 - HEADROOM) - fixed_bytes
    return max(0, min(requested, int(room // row_bytes)))


def cap_gpu_memory(gib: float | None, device: int = 0) -> None:
    """Cap this process's CUDA allocator at `gib` (`model.gpu_memory_gib`): on a larger card a stage then runs
    within the card the run was planned for, out-of-memory errors included."""
    import torch

    if gib is not None and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), device)


def free_gpu_bytes(device: int = 0, cap_gib: float | None = None) -> int:
    """What this process can still allocate on `device`: the card's free memory plus what its allocator holds
    unused, within the cap."""
    import torch

    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if cap_gib is not None:
        free = min(free, int(cap_gib * GIB) - torch.cuda.memory_allocated(device))
    return max(0, free)


class StageNeed(BaseModel):
    stage: str  # train, evaluations during training, evaluate, export, parity
    resource: Literal["GPU memory", "host memory", "disk"]
    need_gib: float  # at the smallest batch the stage can fall back to
    parts: dict[str, float]  # GiB by part
    available_gib: float | None  # None: unknown (no GPU found, say)
    setting: str  # what to change when it does not fit
    note: str = ""  # e.g. the batch the stage will size itself to

    @property
    def fits(self) -> bool:
        return self.available_gib is None or self.need_gib <= self.available_gib * (1 - HEADROOM)

    def problem(self) -> str:
        parts = ", ".join(f"{name} {gib:.1f}" for name, gib in self.parts.items())
        usable = self.available_gib * (1 - HEADROOM)
        return (
            f"will not fit: {self.stage} needs about {self.need_gib:.1f} GiB of {self.resource} ({parts}) and "
            f"{usable:.1f} GiB of {self.available_gib:.1f} is usable (a tenth is left to the allocator): set "
            f"{self.setting}"
        )


class MemoryPlan(BaseModel):
    gpu: str  # the budget the GPU stages were sized against, in words
    stages: list[StageNeed]

    def problems(self) -> list[str]:
        return [stage.problem() for stage in self.stages if not stage.fits]

    def check(self) -> MemoryPlan:
        """Raise WillNotFit naming every stage that does not fit; else return the plan."""
        problems = self.problems()
        if problems:
            raise WillNotFit("\n".join(problems))
        return self


class Machine(BaseModel):
    gpu_gib: float | None  # the GPU memory a stage may use (free, or `model.gpu_memory_gib`); None: no GPU
    gpu_name: str
    bf16: bool = True  # whether the GPU computes in bf16 (a T4 does not: fp16)
    host_gib: float | None
    disk_gib: float | None  # free under the workdir


def available_host_memory_gib() -> float | None:
    """MemAvailable of /proc/meminfo: what the host can give without swapping; None where there is none."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    match = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
    return int(match.group(1)) / 2**20 if match else None


# The LM head's loss runs in chunks of positions (tasks/train/head_loss.py): a chunk's 16-bit logits and their
# fp32 copy.
BYTES_PER_LOGIT = 6


def chunk_positions(vocab_size: int, memory_is_tight: bool) -> int:
    """Positions per LM-head chunk: about 64 MiB of temporaries when memory is tight (activations are being
    recomputed), 512 MiB when it is not: no more than unsloth's own fused cross-entropy holds at the peak
    (`benchmarks/head_loss.py` measures both), in chunks few enough that their launches stay a small part of a
    step (a small model's step is bound by launches)."""
    budget = 2**26 if memory_is_tight else 2**29
    return max(16, budget // (vocab_size * BYTES_PER_LOGIT))


def training_memory(
    shape: ModelShape,
    cfg: TrainConfig,
    lora,
    tokens: int,
    loss_share: float,
    precision: str,
    four_bit: bool,
    checkpointing: bool | Literal["offload"],
) -> dict[str, float]:
    """GiB by part of a training step over `tokens` tokens a micro-batch, `loss_share` of them carrying the loss."""
    trainable = shape.params if cfg.mode == "full" else lora_params(shape, lora)
    half = precision in ("bf16", "fp16")
    act_bytes = 2 if half else 4
    hidden, layers, inner = shape.hidden, shape.layers, shape.intermediate
    per_layer = tokens * (10 * hidden + 4 * inner) * act_bytes  # inputs kept for the backward pass
    kept = {True: tokens * hidden * act_bytes * layers, "offload": 0}  # each layer's input, if on the GPU
    activations = kept[checkpointing] + per_layer if checkpointing else per_layer * layers
    loss_tokens = tokens * loss_share
    # Full fine-tuning keeps fp32 master weights; QLoRA's base is 4-bit but for its embeddings and LM head.
    weights = weights_bytes(shape, four_bit, 4 if cfg.mode == "full" or not half else 2)
    return {
        "weights": weights / GIB,
        "gradients": trainable * 4 / GIB,
        "optimizer": trainable * (2 if cfg.optimizer == "adamw_8bit" else 8) / GIB,
        "activations": activations / GIB,
        # One LM-head chunk at a time, at loss positions only: 16-bit logits and their fp32 copy; and the
        # gradient of every loss position's hidden state (tasks/train/head_loss.py).
        "logits": (
            min(loss_tokens, chunk_positions(shape.vocab, bool(checkpointing))) * shape.vocab * BYTES_PER_LOGIT
            + loss_tokens * hidden * act_bytes
        )
        / GIB,
    }


def this_machine(workdir: Path, gpu_memory_gib: float | None) -> Machine:
    """GPU memory from `nvidia-smi` (no CUDA context in this process: it would take memory from the stages'
    workers), capped at `gpu_memory_gib`; host memory and the workdir's free disk."""
    gpu, name, bf16 = None, "no CUDA GPU", True
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.free,compute_cap", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            name, free, capability = (field.strip() for field in out.stdout.splitlines()[0].split(","))
            gpu, bf16 = int(free) / 1024, float(capability) >= 8.0
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    if gpu_memory_gib is not None:
        name = (
            f"{name}, capped at {gpu_memory_gib:g} GiB (model.gpu_memory_gib)"
            if gpu is not None
            else f"a GPU of {gpu_memory_gib:g} GiB (model.gpu_memory_gib; none on this machine)"
        )
        gpu = gpu_memory_gib if gpu is None else min(gpu, gpu_memory_gib)
    folder = Path(workdir).resolve()
    while not folder.exists():
        folder = folder.parent
    return Machine(
        gpu_gib=gpu,
        gpu_name=name,
        bf16=bf16,
        host_gib=available_host_memory_gib(),
        disk_gib=shutil.disk_usage(folder).free / GIB,
    )


def plan_memory(
    cfg, shape: ModelShape, machine: Machine, longest_tokens: int, loss_share: float, training_estimate
) -> MemoryPlan:
    """Each stage's need against `machine`. `longest_tokens`: the longest row (prompt and answer); `loss_share`:
    the share of tokens that carry the loss; `training_estimate(batch_size, checkpointing) -> {part: GiB}` is the
    train stage's own estimate."""
    train, ev = cfg.train, cfg.eval
    four_bit = train.mode == "qlora" or cfg.model.load_in_4bit
    on_gpu = machine.gpu_gib is not None
    dtype_bytes = 2 if on_gpu else 4
    gpu_budget = machine.gpu_gib if on_gpu else machine.host_gib
    resource = "GPU memory" if on_gpu else "host memory"
    stages = []

    # Training, at the smallest micro-batch its out-of-memory retries reach, with recomputation when `auto`
    # would turn it on (it does when memory is short).
    smallest = max(1, train.batch_size >> train.max_oom_retries)
    checkpointing = True if train.gradient_checkpointing == "auto" else train.gradient_checkpointing
    parts = training_estimate(smallest, checkpointing)
    stages.append(
        StageNeed(
            stage="train",
            resource=resource,
            need_gib=sum(parts.values()),
            parts=parts,
            available_gib=gpu_budget,
            setting="train.mode: qlora (a 4-bit base)"
            if not four_bit and train.mode != "full"
            else "a smaller model.base, or train.mode: qlora"
            if train.mode == "full"
            else "a shorter model.max_seq_length, or a smaller model.base",
            note=f"micro-batch {train.batch_size}, halved on out-of-memory down to {smallest}",
        )
    )

    # The evaluations during training run on the training model, its optimizer state still held.
    if train.eval_steps:
        held = {k: v for k, v in parts.items() if k in ("weights", "gradients", "optimizer")}
        row = (
            max(
                generation_row_bytes(shape, longest_tokens + ev.max_new_tokens, dtype_bytes),
                loss_row_bytes(shape, longest_tokens, dtype_bytes, loss_share),
            )
            / GIB
        )
        stages.append(
            StageNeed(
                stage="evaluations during training",
                resource=resource,
                need_gib=sum(held.values()) + row,
                parts={**held, "one eval row": row},
                available_gib=gpu_budget,
                setting="a smaller eval.max_new_tokens, or train.eval_steps: null",
                note=f"eval.batch_size {ev.batch_size}, halved on out-of-memory",
            )
        )

    # The evaluate stage: one model at a time, loaded as training loaded the base.
    weights = weights_bytes(shape, four_bit, dtype_bytes) / GIB
    adapter = lora_params(shape, cfg.lora) * 4 / GIB if train.mode != "full" else 0.0  # fp32, as peft keeps it
    row_bytes = max(
        generation_row_bytes(shape, longest_tokens + ev.max_new_tokens, dtype_bytes),
        loss_row_bytes(shape, longest_tokens, dtype_bytes, loss_share),
    )
    fitting = (
        rows_that_fit(gpu_budget * GIB, (weights + adapter) * GIB, row_bytes, ev.batch_size)
        if gpu_budget
        else ev.batch_size
    )
    stages.append(
        StageNeed(
            stage="evaluate",
            resource=resource,
            need_gib=weights + adapter + row_bytes / GIB,
            parts={
                "weights (4-bit)" if four_bit else "weights": weights,
                "adapter": adapter,
                "one row (KV cache, logits)": row_bytes / GIB,
            },
            available_gib=gpu_budget,
            setting="train.mode: qlora (evaluation then loads the base in 4-bit)"
            if not four_bit
            else "a shorter eval.max_new_tokens or model.max_seq_length",
            note=f"batch of {fitting} of eval.batch_size {ev.batch_size}" if fitting < ev.batch_size else "",
        )
    )

    # Export on the host: an adapter's merge reads and writes one tensor at a time (a full fine-tune is exported
    # from its own folder); the GGUF converter maps its input.
    types = cfg.export.gguf_types
    float_source = "bf16" if "bf16" in types and "f16" not in types else "f16"
    files = {f"GGUF {t}": shape.params * GGUF_BYTES[t] / GIB for t in dict.fromkeys([float_source, *types])}
    if train.mode != "full":
        merge_parts = {"largest tensor, read and merged": 2 * shape.largest_tensor * 2 / GIB, "adapter": adapter}
        stages.append(
            StageNeed(
                stage="export (merge)",
                resource="host memory",
                need_gib=sum(merge_parts.values()),
                parts=merge_parts,
                available_gib=machine.host_gib,
                setting="a machine with more memory",
            )
        )
        files = {"merged model (16-bit)": shape.params * 2 / GIB, **files}
        if cfg.export.lora_gguf:
            files["adapter GGUF"] = adapter / 2
    stages.append(
        StageNeed(
            stage="export (files)",
            resource="disk",
            need_gib=sum(files.values()),
            parts=files,
            available_gib=machine.disk_gib,
            setting="fewer export.gguf_types, or a workdir on a larger disk",
        )
    )
    # Parity: llama.cpp maps each GGUF in turn (the largest decides) and keeps a KV cache for one prompt.
    largest_gguf = max(shape.params * GGUF_BYTES[t] / GIB for t in types)
    cache = shape.kv_per_token * (longest_tokens + ev.max_new_tokens) * 2 / GIB
    stages.append(
        StageNeed(
            stage="parity",
            resource="host memory",
            need_gib=largest_gguf + cache,
            parts={"largest GGUF": largest_gguf, "KV cache": cache},
            available_gib=machine.host_gib,
            setting="smaller export.gguf_types (q4_k_m), or a machine with more memory",
        )
    )
    budget = (
        f"{machine.gpu_gib:.1f} GiB of {machine.gpu_name}"
        if on_gpu
        else f"no CUDA GPU: the model stages run on the CPU in {machine.host_gib or 0:.1f} GiB of host memory"
    )
    return MemoryPlan(
        gpu=budget,
        stages=[
            s.model_copy(
                update={"need_gib": round(s.need_gib, 2), "parts": {k: round(v, 2) for k, v in s.parts.items()}}
            )
            for s in stages
        ],
    )


def base_shape(base) -> ModelShape:
    """The shape of the base model `base` (a BaseModelRef) from its config, kept in the shared cache under its
    fingerprint: a re-run plans without importing torch or transformers' models."""
    import hashlib

    from tunepipe.tasks.integrations.llama_cpp import cache_root

    key = hashlib.sha256(f"{base.fingerprint}\n{base.revision}".encode()).hexdigest()[:24]
    path = cache_root() / "model-shapes" / f"{key}.json"
    if path.is_file():
        return ModelShape.model_validate_json(path.read_text())
    from transformers import AutoConfig

    shape = model_shape(AutoConfig.from_pretrained(base.name_or_path, revision=base.revision))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(shape.model_dump_json())
    partial.replace(path)
    return shape


def run_memory_plan(cfg, base, longest_tokens: int, loss_share: float) -> MemoryPlan:
    """The plan of `cfg`'s run on this machine for the base model `base` (a BaseModelRef): its config is read,
    no weights. Before the data is formatted, `longest_tokens` is `model.max_seq_length` and `loss_share` 1."""
    shape = base_shape(base)
    machine = this_machine(cfg.workdir, cfg.model.gpu_memory_gib)
    precision = cfg.train.precision
    if precision == "auto":
        precision = ("bf16" if machine.bf16 else "fp16") if machine.gpu_gib is not None else "fp32"
    four_bit = cfg.train.mode == "qlora" or cfg.model.load_in_4bit

    def training_estimate(batch_size: int, checkpointing) -> dict[str, float]:
        return training_memory(
            shape, cfg.train, cfg.lora, batch_size * longest_tokens, loss_share, precision, four_bit, checkpointing
        )

    return plan_memory(cfg, shape, machine, longest_tokens, loss_share, training_estimate)
