"""One redaction for everything tunepipe logs, tracks or prints: credentials never leave the process.

Secrets reach tunepipe in three ways, each covered here: inside URLs (`postgresql://user:PASSWORD@host/db`,
`https://host/path?token=TOKEN`), as Hugging Face tokens (`hf_…`), and as the values of environment variables
whose names say they are secrets (HF_TOKEN, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, …), which may be
quoted anywhere, e.g. in an error message.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"

# scheme://user:password@host → scheme://user:***@host (a user name alone is not a secret).
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/:@?#]*:)[^\s/@?#]+(@)")
# ?token=…, &api_key=…, &X-Amz-Signature=…: a URL query parameter named like a credential.
_QUERY_CREDENTIAL = re.compile(
    r"(?i)([?&;][\w.\-]*(?:token|password|passwd|pwd|secret|key|sig|signature|credential|auth)[\w.\-]*=)[^\s&;#'\"<>]+"
)
# password=… (libpq DSNs, log lines), "token": "…" (JSON): a whole-word credential name and its value.
_NAMED_CREDENTIAL = re.compile(
    r"(?i)(\b(?:password|passwd|pwd|secret|token|access_token|api_key|apikey)\b[\"']?\s*[=:]\s*[\"']?)[^\s&;,'\"<>]+"
)
_BEARER = re.compile(r"(?i)(\bBearer\s+)[A-Za-z0-9._~+/=\-]+")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
# Environment variables whose values are credentials, whatever they look like.
_SECRET_ENV_NAME = re.compile(r"(?i)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|CREDENTIALS?|CONNECTION_STRING)")
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask ordinary text


def redact(text: str) -> str:
    """`text` with every credential replaced by ***."""
    for value in _secret_env_values():
        text = text.replace(value, MASK)
    text = _URL_PASSWORD.sub(rf"\1{MASK}\2", text)
    text = _QUERY_CREDENTIAL.sub(rf"\1{MASK}", text)
    text = _NAMED_CREDENTIAL.sub(rf"\1{MASK}", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    return _HF_TOKEN.sub(f"hf_{MASK}", text)


def error_line(exc: BaseException) -> str:
    """An exception as one short, redacted line for a message to the user."""
    return redact((str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])


def _secret_env_values() -> list[str]:
    # By name, then .get: another thread (MLflow's telemetry) may remove a variable while we read them.
    secret_names = [name for name in list(os.environ) if _SECRET_ENV_NAME.search(name)]
    values = {value for value in map(os.environ.get, secret_names) if value and len(value) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # a longer secret first, in case one contains another


class RedactingFilter(logging.Filter):
    """Redacts a log record's message and traceback before any handler formats or ships it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001  (a malformed record is logging's to report, not ours to raise)
            return True
        record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_logs() -> None:
    """Attach RedactingFilter to every log handler configured so far: Prefect's console and API handlers (the
    Prefect UI's run logs), MLflow's, the root logger's. A filter on a handler also sees records from child
    loggers, which a filter on a logger would not. Idempotent; call it once Prefect is imported."""
    loggers = [
        logging.getLogger(),
        *(logger for logger in list(logging.Logger.manager.loggerDict.values()) if isinstance(logger, logging.Logger)),
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
