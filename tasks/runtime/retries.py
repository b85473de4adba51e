"""Retries with backoff for the tasks that talk to the network, and only for the failures worth retrying.

A nightly run meets a hub hiccup, an Ollama restart or an MLflow server blip; each of those tasks is retried
(`retry.attempts`, waits of `retry.backoff_s` doubling each time, with jitter) when its failure was transient:
no HTTP answer (refused, cut off, timed out) or HTTP 429/5xx. A definite answer (a missing model, a failed
smoke test, a gated repo) fails at once. Every such task is idempotent, so a retry after a half-done attempt
finishes it instead of doing it twice (see tasks/serve/task.py and tasks/integrations/model_registry.py).
"""

from __future__ import annotations

from typing import Any

from tunepipe.tasks.runtime.config import RetryConfig

TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}
# MLflow's error codes for a server that is overloaded or failing rather than refusing the request.
TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "INTERNAL_ERROR"}


class TransientError(RuntimeError):
    """A failure of the network or of the server that the same request may not meet again."""


def is_transient(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, is a transient network or server failure."""
    import httpx
    import requests
    from mlflow.exceptions import MlflowException

    from tunepipe.tasks.integrations.ollama.client import OllamaConnectionError, OllamaError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(
            exc,
            TransientError
            | OllamaConnectionError
            | httpx.TransportError
            | ConnectionError
            | TimeoutError
            | requests.ConnectionError
            | requests.Timeout,
        ):
            return True
        if isinstance(exc, OllamaError) and exc.status in TRANSIENT_STATUS:
            return True
        # An HTTP error with its answer: httpx's, requests' and the hub client's carry `response`.
        if getattr(getattr(exc, "response", None), "status_code", None) in TRANSIENT_STATUS:
            return True
        if isinstance(exc, MlflowException) and exc.error_code in TRANSIENT_MLFLOW_CODES:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _retry_if_transient(task, task_run, state) -> bool:
    return is_transient(state.result(raise_on_failure=False))


def network_retries(cfg: RetryConfig) -> dict[str, Any]:
    """`Task.with_options` arguments: `cfg.attempts` tries, exponential backoff, transient failures only."""
    retries = cfg.attempts - 1
    return dict(
        retries=retries,
        retry_delay_seconds=[cfg.backoff_s * 2**n for n in range(retries)] or 0,
        retry_jitter_factor=0.5 if cfg.backoff_s else None,
        retry_condition_fn=_retry_if_transient,
    )
