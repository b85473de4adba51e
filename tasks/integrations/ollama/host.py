"""Where Ollama listens: the base URL a client connects to."""

from __future__ import annotations

import ipaddress
import os
import urllib.parse

DEFAULT_HOST = "http://127.0.0.1:11434"
DEFAULT_PORT = 11434


def ollama_host(configured: str | None) -> str:
    """Base URL of the Ollama server: `configured` (`ollama.host`), else $OLLAMA_HOST, else http://127.0.0.1:11434.

    Both accept Ollama's own forms (`host`, `host:port`, `scheme://host:port/path`); a bind-all address such as
    0.0.0.0 (how servers are often told to listen) is replaced by loopback, since a client cannot connect to it.
    """
    raw = (configured or os.environ.get("OLLAMA_HOST", "")).strip().strip("\"'")
    if not raw:
        return DEFAULT_HOST
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "http", raw
    default_port = {"http": 80, "https": 443}.get(scheme, DEFAULT_PORT) if sep else DEFAULT_PORT
    url = urllib.parse.urlsplit(f"{scheme}://{rest}")
    try:
        port = url.port or default_port
    except ValueError as exc:
        raise ValueError(f"Ollama host {raw!r}: {exc}") from None
    host = url.hostname or "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None  # a host name
    if address is not None and address.is_unspecified:
        address = ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
    if address is not None:
        host = f"[{address}]" if address.version == 6 else str(address)
    return f"{scheme}://{host}:{port}{url.path.rstrip('/')}"
