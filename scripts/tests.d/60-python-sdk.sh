#!/usr/bin/env bash
# The Python SDK (sdk/python): unit tests (httpx mock transport) and integration tests against a
# real `tvm serve` with real VMs, on the system Python 3 and on the newest CPython found on the
# machine (pyenv, /usr/bin) when it is a different version. Each Python gets its own venv under target/.
set -euo pipefail
cd "$(dirname "$0")/../.."
export TVM_BIN="$PWD/target/release/tvm"
pythons=(python3)
newest=""
# pyenv's shims answer `command -v` for every installed version but run only the selected
# ones, so each candidate is tried by running it, and pyenv's own version dirs are tried too.
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
for v in 3.14 3.13 3.12; do
  for cand in "python$v" "$pyenv_root"/versions/"$v"*/bin/"python$v"; do
    if "$cand" -c 'import venv, ensurepip' >/dev/null 2>&1; then newest="$cand"; break 2; fi
  done
done
if [ -n "$newest" ] && [ "$("$newest" -c 'import sys; print(sys.version_info[:2])')" != "$(python3 -c 'import sys; print(sys.version_info[:2])')" ]; then
  pythons+=("$newest")
fi
status=0
for py in "${pythons[@]}"; do
  ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  venv="target/sdk-venv-$ver"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check './sdk/python[test]'
  echo "--- Python $ver"
  # Integration tests only once (they boot VMs); unit tests on every Python.
  if [ "$py" = python3 ]; then sel=(sdk/python/tests); else sel=(sdk/python/tests/test_unit.py sdk/python/tests/test_sessions_unit.py); fi
  # -p no:cacheprovider: nothing written into the source tree. Exit 5 (no tests) is a failure here too.
  "$venv/bin/python" -m pytest -p no:cacheprovider -q "${sel[@]}" || status=1
done
exit $status
