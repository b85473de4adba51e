#!/usr/bin/env bash
# Go's own text/template renders Ollama templates in the tests (tasks/integrations/ollama/render.py): install Debian's
# golang-go when no `go` is on PATH; a machine that has Go already keeps its own.
set -euo pipefail
if command -v go >/dev/null; then
    echo "using $(command -v go): $(go version)"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "no go on PATH and no apt-get here: install Go (https://go.dev/doc/install) and run make again" >&2
    exit 1
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then as_root=(sudo); fi
"${as_root[@]}" apt-get update
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y --no-install-recommends golang-go
go version
