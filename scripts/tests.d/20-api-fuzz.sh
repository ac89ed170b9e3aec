#!/usr/bin/env bash
# Schema-driven fuzzing of the HTTP API (issue 19): schemathesis (PyPI)
# generates requests from GET /v1/openapi.json, valid and invalid, and sends
# them to a real `tvm serve`. Every answer must be documented for its
# operation, match its response schema and content type, and no answer may
# be a 5xx; invalid requests must be refused. So the document and the server
# cannot drift apart. Bounded: a few dozen examples per operation, a one-VM
# server whose queue turns extra runs into a quick (documented) 429, and a
# hard time limit. Then the server is stopped and no VM may be left.
set -uo pipefail
cd "$(dirname "$0")/../.."

VENV=target/fuzz-venv
SCHEMATHESIS_VERSION="4.32.5"
if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  python3 -m venv "$VENV" && "$VENV/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION" || {
    echo "api-fuzz: cannot install schemathesis"; echo "0 passed, 1 failed"; exit 1; }
fi

RUNTIME_DIR=$(mktemp -d)
LOG=$(mktemp)
REPORT=$(mktemp -d)
KEY="fuzz-key-$$"
TVM_BIN=${TVM_BIN:-target/release/tvm}
server=""
stop_server() {
  [ -n "$server" ] || return 0
  kill -TERM "$server" 2>/dev/null
  local stopped=1
  for _ in $(seq 1 300); do kill -0 "$server" 2>/dev/null || { stopped=0; break; }; sleep 0.2; done
  kill -KILL "$server" 2>/dev/null
  wait "$server" 2>/dev/null
  local code=$?
  server=""
  [ "$stopped" -eq 0 ] && [ "$code" -eq 0 ]
}
cleanup() {
  stop_server
  rm -rf "$RUNTIME_DIR" "$LOG" "$REPORT"
}
trap cleanup EXIT

# start_server [FLAGS]: a one-VM server whose queue turns extra runs into a quick 429.
start_server() {
  : >"$LOG"
  TVM_RUNTIME_DIR="$RUNTIME_DIR" TVM_API_KEYS="$KEY" TVM_LOG=warn "$TVM_BIN" serve \
    --listen 127.0.0.1:0 --max-vms 1 --queue 1 --queue-timeout 2s --no-build-images "$@" 2>>"$LOG" &
  server=$!
  addr=""
  for _ in $(seq 1 600); do
    addr=$(sed -n 's/.*listening on http:\/\/\([^ ]*\).*/\1/p' "$LOG" | head -n1)
    [ -n "$addr" ] && return 0
    kill -0 "$server" 2>/dev/null || break
    sleep 0.1
  done
  echo "api-fuzz: server did not start"; cat "$LOG"; return 1
}

# Checks: no 5xx, documented status, schema-conforming bodies, content types and
# headers, invalid data refused, a missing API key refused.
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,ignored_auth
fuzz() {
  timeout --signal=INT "$1" "$VENV/bin/schemathesis" run "http://$addr/v1/openapi.json" \
    --header "Authorization: Bearer $KEY" --checks "$checks" --seed 19 --workers 2 \
    --request-timeout 120 --no-color --warnings off --report junit --report-dir "$REPORT" "${@:2}"
}

failed=0
passed=0
verdict() { if [ "$1" -eq 0 ]; then passed=$((passed + 1)); else echo "api-fuzz: $2"; failed=$((failed + 1)); fi; }

# 1. Every operation, generated and boundary requests. A guest-RAM budget
# smaller than any VM refuses every run before a VM (422 exceeds_capacity).
start_server --memory-budget 128M || { echo "0 passed, 1 failed"; exit 1; }
echo "api-fuzz: tvm serve on $addr (128 MiB budget: no VM boots)"
fuzz 150 --phases coverage,fuzzing --max-examples 25
verdict $? "schemathesis found failures (generated requests)"
stop_server; verdict $? "server did not stop cleanly"

# 2. The documented examples with the real images: a handful of real runs (200 and event-stream answers).
start_server || { echo "$passed passed, $((failed + 1)) failed"; exit 1; }
echo "api-fuzz: tvm serve on $addr (real images: the examples run in VMs)"
fuzz 150 --phases examples --include-method POST
verdict $? "schemathesis found failures (documented examples)"
stop_server; verdict $? "server did not stop cleanly"

left=$(find "$RUNTIME_DIR" -mindepth 1 -maxdepth 1 | wc -l)
vmms=$(pgrep -f -- "$RUNTIME_DIR" | wc -l)
[ "$left" -eq 0 ] && [ "$vmms" -eq 0 ]
verdict $? "$left run dirs and $vmms VMM processes left"
grep -E "panicked" "$LOG" | head -n 20
echo "api-fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
