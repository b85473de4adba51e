"""Run the Great Expectations suite on both splits; rows that fail go to quarantine, not to training."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from pydantic import BaseModel

from data_checks.chat_suite import DataCheckReport, check_examples
from tasks.caching import STAGE_CACHE, stage_dir
from tasks.config import DataConfig
from tasks.load_data import LoadedData


class CheckedData(BaseModel):
    train: DataCheckReport
    eval: DataCheckReport


def check_dataset(loaded: LoadedData, cfg: DataConfig, out_dir: Path) -> CheckedData:
    return CheckedData(
        train=check_examples(loaded.train_path, cfg, out_dir, split="train"),
        eval=check_examples(loaded.eval_path, cfg, out_dir, split="eval"),
    )


@task(name="check_data", cache_policy=STAGE_CACHE, persist_result=True)
def check_data(loaded: LoadedData, cfg: DataConfig, workdir: Path) -> CheckedData:
    return check_dataset(loaded, cfg, stage_dir(workdir, "check_data", loaded, cfg))
