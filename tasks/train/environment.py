"""Set-up of a training worker: its place among the ranks, the backend, and the machine checked against the config
before any model is loaded (device, precision, free memory against an estimate of what the run needs)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from tunepipe.tasks.runtime.memory_plan import available_host_memory_gib
from tunepipe.tasks.train.results import Backend
from tunepipe.tasks.train.task import TrainRequest

GIB = 2**30
# `gradient_checkpointing: auto` recomputes only when a step's activations would not fit in this share of the
# free memory: on a GPU with room, a step is faster without (benchmarks/RESULTS.md, training speed).
AUTO_CHECKPOINTING_SHARE = 0.5


class TrainingEnvironmentError(RuntimeError):
    """The config asks for something this machine cannot do; raised before any model is loaded."""


class EnvironmentReport(BaseModel):
    device: str
    precision: str
    free_gib: float | None
    estimate_gib: float
    estimate: dict[str, float]  # GiB per part: weights, gradients, optimizer, activations, logits
    gradient_checkpointing: bool | Literal["offload"]  # `auto` resolved


@dataclass
class Rank:
    index: int = 0
    world: int = 1
    local: int = 0

    def device(self):
        import torch

        return torch.device(f"cuda:{self.local}" if torch.cuda.is_available() else "cpu")


def set_up(request: TrainRequest) -> tuple[Rank, Backend, EnvironmentReport]:
    """This worker's rank, its backend and its checked environment, announced; the seed set. Unsloth is
    imported here when it trains, before anything imports transformers: it patches transformers on import."""
    import torch

    from tunepipe.tasks.runtime.memory_plan import cap_gpu_memory
    from tunepipe.tasks.runtime.worker import emit_event

    cfg = request.cfg
    rank = init_distributed()
    backend = choose_backend(cfg.backend, cfg.mode, cfg.devices)
    if backend == "unsloth":
        import unsloth  # noqa: F401
    cap_gpu_memory(request.model_cfg.gpu_memory_gib, rank.local)
    env = check_environment(request, backend, rank)
    emit_event("started", pid=os.getpid(), backend=backend, **env.model_dump())
    print(
        f"train: {backend} backend, {cfg.mode} on {env.device}, {env.precision}; memory estimate "
        f"{env.estimate_gib:.2f} GiB {env.estimate} of {env.free_gib} GiB free",
        flush=True,
    )
    torch.manual_seed(cfg.seed)
    return rank, backend, env


def init_distributed() -> Rank:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Rank()
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Rank(index=torch.distributed.get_rank(), world=world, local=local)


def barrier(rank: Rank) -> None:
    if rank.world > 1:
        import torch

        torch.distributed.barrier()


def dtype_of(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def choose_backend(requested: str, mode: str = "lora", devices: int = 1) -> Backend:
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "unsloth":
        if not has_cuda:
            raise TrainingEnvironmentError(
                "train.backend=unsloth needs a CUDA GPU; use backend: hf (or auto) on this machine"
            )
        if mode == "full" or devices > 1:
            raise TrainingEnvironmentError(
                "train.backend=unsloth trains adapters on one GPU here; use backend: hf (or auto) for "
                "train.mode=full or train.devices > 1"
            )
        return "unsloth"
    if requested == "auto":
        usable = has_cuda and mode != "full" and devices == 1 and importlib.util.find_spec("unsloth")
        return "unsloth" if usable else "hf"
    return "hf"


def check_environment(request: TrainRequest, backend: Backend, rank: Rank) -> EnvironmentReport:
    """Device, precision and free memory against an estimate of what the config needs; fail before loading."""
    import torch
    from transformers import AutoConfig

    cfg, model_cfg = request.cfg, request.model_cfg
    cuda = torch.cuda.is_available()
    four_bit = cfg.mode == "qlora" or model_cfg.load_in_4bit
    if four_bit and not cuda:
        raise TrainingEnvironmentError(
            "train.mode=qlora (a 4-bit base, bitsandbytes) needs a CUDA GPU and this machine has none; "
            "use train.mode: lora"
        )
    if cfg.optimizer == "adamw_8bit" and not cuda:
        raise TrainingEnvironmentError("train.optimizer=adamw_8bit (bitsandbytes) needs a CUDA GPU; use adamw")
    if cfg.objective != "sft" and cfg.devices > 1:
        raise TrainingEnvironmentError(
            f"train.objective={cfg.objective} trains on one device here; set train.devices: 1"
        )
    if cuda and cfg.devices > torch.cuda.device_count():
        raise TrainingEnvironmentError(
            f"train.devices={cfg.devices} but this machine has {torch.cuda.device_count()} CUDA GPU(s)"
        )
    precision = cfg.precision
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise TrainingEnvironmentError("train.precision=fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")

    config = AutoConfig.from_pretrained(request.base.name_or_path, revision=request.base.revision)
    if cuda:
        from tunepipe.tasks.runtime.memory_plan import free_gpu_bytes

        free = free_gpu_bytes(rank.local, model_cfg.gpu_memory_gib) / GIB
        device = f"cuda ({torch.cuda.get_device_name(rank.local)}) x{rank.world}"
    else:
        free = available_host_memory_gib()
        device = f"cpu x{rank.world}"
    checkpointing = cfg.gradient_checkpointing
    auto = checkpointing == "auto"
    estimate = estimate_memory(config, request, precision, four_bit, False if auto else checkpointing)
    if auto:
        checkpointing = free is None or sum(estimate.values()) > AUTO_CHECKPOINTING_SHARE * free
        if checkpointing:  # it would not fit without recomputation: estimate with it
            estimate = estimate_memory(config, request, precision, four_bit, True)
    need = sum(estimate.values())
    if free is not None and need > free:
        parts = ", ".join(f"{name} {gib:.2f}" for name, gib in estimate.items())
        raise TrainingEnvironmentError(
            f"this training needs about {need:.1f} GiB ({parts}) and {device} has {free:.1f} GiB free; "
            "try train.mode: qlora or lora, a smaller train.batch_size with more gradient_accumulation_steps, "
            "train.gradient_checkpointing: true, or a shorter model.max_seq_length"
        )
    return EnvironmentReport(
        device=device,
        precision=precision,
        free_gib=None if free is None else round(free, 2),
        estimate_gib=round(need, 2),
        estimate={k: round(v, 3) for k, v in estimate.items()},
        gradient_checkpointing=checkpointing,
    )


def estimate_memory(
    config, request: TrainRequest, precision: str, four_bit: bool, checkpointing: bool | Literal["offload"]
) -> dict[str, float]:
    """GiB by part, from the model's config alone (a meta-device model: no weights are read)."""
    from tunepipe.tasks.runtime.memory_plan import model_shape, training_memory

    data = request.data
    return training_memory(
        model_shape(config),
        request.cfg,
        request.lora,
        request.cfg.batch_size * data.max_tokens,
        data.n_trained_tokens / max(data.n_tokens, 1),
        precision,
        four_bit,
        checkpointing,
    )
