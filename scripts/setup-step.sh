#!/usr/bin/env bash
# One step of `make setup`, so a long install never looks hung and a failed one says what to do:
#   ==> [3/5] what it installs and why it may take a while
#       ... 2m30s  [ 45%] Building CXX object ...      (a heartbeat every HEARTBEAT_S seconds)
#       done in 5m43s
# The command's own output goes to LOG; on failure the step prints the log's tail and how to retry.
# usage: setup-step.sh STEP LOG "what and why" COMMAND [ARG...]
set -uo pipefail
step=$1 log=$2 what=$3
shift 3
heartbeat=${HEARTBEAT_S:-30}

mkdir -p "$(dirname "$log")"
echo "==> [$step] $what"
start=$SECONDS
"$@" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; exit 130' INT TERM

elapsed() { printf '%dm%02ds' $(( (SECONDS - start) / 60 )) $(( (SECONDS - start) % 60 )); }
# What the command is doing now: a compile's last progress mark (make's [ 45%], ninja's [45/120]), or else
# its last unindented log line (pip's "Collecting x", "Installing collected packages: ...").
progress() {
    local mark
    mark=$(grep -aoE '\[ *[0-9]{1,3}%\]|\[[0-9]+/[0-9]+\]' "$log" 2>/dev/null | tail -n 1)
    if [ -n "$mark" ]; then echo "compiling $mark"; else grep -a '^[^[:space:]]' "$log" 2>/dev/null | tail -n 1 | cut -c1-90; fi
}

next=$heartbeat
while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS - start >= next )); then
        echo "    ... $(elapsed)  $(progress)"
        next=$(( next + heartbeat ))
    fi
done
wait "$pid"
status=$?
trap - INT TERM

if (( status != 0 )); then
    echo "    FAILED: step [$step] after $(elapsed) (exit status $status). Last lines of $log:" >&2
    tail -n 25 "$log" | sed 's/^/    | /' >&2
    echo "    Fix the cause above, then run \`make setup\` again: it resumes at step [$step]." >&2
    exit "$status"
fi
echo "    done in $(elapsed)"
