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
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$server" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$server" 2>/dev/null
  fi
  rm -rf "$RUNTIME_DIR" "$LOG" "$REPORT"
}
trap cleanup EXIT

TVM_RUNTIME_DIR="$RUNTIME_DIR" TVM_API_KEYS="$KEY" TVM_LOG=warn target/release/tvm serve \
  --listen 127.0.0.1:0 --max-vms 1 --queue 1 --queue-timeout 2s --no-build-images 2>"$LOG" &
server=$!
addr=""
for _ in $(seq 1 600); do
  addr=$(sed -n 's/.*listening on http:\/\/\([^ ]*\).*/\1/p' "$LOG" | head -n1)
  [ -n "$addr" ] && break
  kill -0 "$server" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$addr" ]; then
  echo "api-fuzz: server did not start"; cat "$LOG"; echo "0 passed, 1 failed"; exit 1
fi
echo "api-fuzz: tvm serve on $addr"

# Checks: no 5xx, documented status, schema-conforming bodies, content types and
# headers, invalid data refused, a missing API key refused.
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,ignored_auth
timeout --signal=INT 200 "$VENV/bin/schemathesis" run "http://$addr/v1/openapi.json" \
  --header "Authorization: Bearer $KEY" \
  --checks "$checks" \
  --phases examples,coverage,fuzzing \
  --max-examples 25 \
  --workers 2 \
  --seed 19 \
  --request-timeout 60 \
  --no-color \
  --report junit --report-dir "$REPORT" \
  --warnings off
fuzz=$?

# Drain: the server stops cleanly and leaves no VM behind.
kill -TERM "$server"
stopped=1
for _ in $(seq 1 300); do kill -0 "$server" 2>/dev/null || { stopped=0; break; }; sleep 0.2; done
wait "$server" 2>/dev/null
exit_code=$?
server=""
left=$(find "$RUNTIME_DIR" -mindepth 1 -maxdepth 1 | wc -l)
vmms=$(pgrep -f -- "$RUNTIME_DIR" | wc -l)
grep -E "panicked|ERROR" "$LOG" | head -n 20

failed=0
[ "$fuzz" -eq 0 ] || { echo "api-fuzz: schemathesis found failures (exit $fuzz)"; failed=$((failed + 1)); }
[ "$stopped" -eq 0 ] && [ "$exit_code" -eq 0 ] || { echo "api-fuzz: server did not stop cleanly (exit $exit_code)"; failed=$((failed + 1)); }
[ "$left" -eq 0 ] && [ "$vmms" -eq 0 ] || { echo "api-fuzz: $left run dirs and $vmms VMM processes left"; failed=$((failed + 1)); }
echo "api-fuzz: $((3 - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
