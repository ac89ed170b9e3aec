#!/usr/bin/env bash
# Real, unmodified Piston and Judge0 clients against a real `tvm serve`
# (target/release/tvm): the official Judge0 Python SDK runs its own tests from
# its sdist plus a TVM-specific SDK test, and npm piston-client lists the
# runtimes and runs a program in every language. Versions are pinned.
# Bounded: the server and every client call have timeouts; ~3 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."

JUDGE0_SDK=0.0.8
PYTEST=8.3.3
PISTON_CLIENT=1.0.2

work=target/compat-clients
mkdir -p "$work"
work=$(cd "$work" && pwd)
here=$(cd scripts/tests.d/compat && pwd)

# Python: a venv under target/ with the SDK and pytest; the SDK's own tests from its sdist.
[ -x "$work/venv/bin/python" ] || python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "judge0==$JUDGE0_SDK" "pytest==$PYTEST"
sdk="$work/judge0-$JUDGE0_SDK"
if [ ! -d "$sdk/tests" ]; then
  "$work/venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    "judge0==$JUDGE0_SDK" -d "$work/dist"
  tar -xzf "$work/dist/judge0-$JUDGE0_SDK.tar.gz" -C "$work"
fi
# The sdist ships the tests without the conftest that provides their `ce_client` fixture; ours points it at TVM.
cp "$here/conftest.py" "$sdk/tests/conftest.py"

# Node: piston-client into target/.
if [ ! -d "$work/npm/node_modules/piston-client" ]; then
  npm install --silent --no-audit --no-fund --prefix "$work/npm" "piston-client@$PISTON_CLIENT" >/dev/null
fi

# The server: its own runtime dir, images already built by test.sh, no pool.
tvm=${TVM_BIN:-target/release/tvm}
rundir=$(mktemp -d)
log="$work/serve.log"
TVM_RUNTIME_DIR="$rundir" TVM_LOG=info "$tvm" serve --listen 127.0.0.1:0 --no-build-images 2>"$log" &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$rundir"
}
trap cleanup EXIT
addr=""
for _ in $(seq 1 600); do
  addr=$(sed -n 's/.*listening on http:\/\/\([^ ]*\).*/\1/p' "$log" | head -n1)
  [ -n "$addr" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "tvm serve exited" >&2; exit 1; }
  sleep 0.2
done
[ -n "$addr" ] || { cat "$log" >&2; echo "tvm serve did not start" >&2; exit 1; }
url="http://$addr"

passed=0
failed=0
count() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi; }

# The SDK's own tests. Deselected, because the SDK maps its language aliases to
# Judge0 1.14's ids of versions TVM does not have (TVM lists only what it runs):
#   test_status_before_and_after_submission, test_is_done, and every test_api_test_cases
#   test that runs code (test_test_cases_from_run, test_no_test_cases, test_batched_test_cases):
#     LanguageAlias.PYTHON is id 113, Python 3.14.0 (TVM has 3.9, 3.11, 3.13: ids 1001, 92, 109);
#   test_language_before_and_after_execution: LanguageAlias.JAVA is id 62, OpenJDK 13.0.1 (TVM: 11, 17, 21);
#   test_language_executable: LanguageAlias.EXECUTABLE is id 44, a raw ELF upload, which TVM has no runtime for.
# test_tvm_sdk.py runs the same SDK paths (run, wait, test cases, batches of more than 20) with TVM's ids.
export JUDGE0_CE_ENDPOINT="$url" JUDGE0_CE_AUTH_HEADERS='{}'
sdk_tests() {
  (cd "$sdk" && timeout 600 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir . \
    tests/test_submission.py tests/test_api_test_cases.py \
    --deselect tests/test_submission.py::test_status_before_and_after_submission \
    --deselect tests/test_submission.py::test_is_done \
    --deselect tests/test_submission.py::test_language_before_and_after_execution \
    --deselect tests/test_submission.py::test_language_executable \
    --deselect tests/test_api_test_cases.py::test_test_cases_from_run \
    --deselect tests/test_api_test_cases.py::test_no_test_cases \
    --deselect tests/test_api_test_cases.py::test_batched_test_cases)
}
count sdk_tests
cp "$here/conftest.py" "$work/conftest.py"
cp "$here/test_tvm_sdk.py" "$work/test_tvm_sdk.py"
count timeout 600 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$work" "$work/test_tvm_sdk.py"

# piston-client: list runtimes, run a program in each language.
cp "$here/piston_client.mjs" "$work/npm/piston_client.mjs"
count timeout 600 node "$work/npm/piston_client.mjs" "$url"

echo "compat-clients: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
